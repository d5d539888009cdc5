"""One data plane with fixed keys, run inside a test's network namespace.

The pipeline tests exercise TUN, sockets, ESP, routing and ACLs without the
control plane: the view comes from a JSON file and each pair's SAs from a
seed both ends know. (The agent derives them through keydist instead; the
agent tests cover that path.) Counters and status go to a JSON file on
SIGUSR1 and at exit, so the test can read what was dropped and why.

    python3 -m tests.helpers.dataplane_node CONFIG.json
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
from pathlib import Path

from bus.messages.sync import NodeView
from nodeagent.dataplane import DataPlane
from nodeagent.esp import InboundSA, OutboundSA
from nodeagent.transport import Wire
from nodeagent.tun import Tun


def pair_sas(seed: str, me: str, peer: str) -> tuple[OutboundSA, InboundSA]:
    """Directional SAs for the pair from a shared seed: mine outbound is the peer's inbound."""

    def material(sender: str, receiver: str) -> tuple[int, bytes, bytes]:
        digest = hashlib.sha512(f"{seed}|{sender}->{receiver}".encode()).digest()
        spi = 0x1000 + int.from_bytes(digest[:3], "big")
        return spi, digest[8:40], digest[40:44]

    out_spi, out_key, out_salt = material(me, peer)
    in_spi, in_key, in_salt = material(peer, me)
    return OutboundSA(out_spi, out_key, out_salt), InboundSA(in_spi, in_key, in_salt)


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    view = NodeView.model_validate(config["view"])
    wire = Wire(config.get("port", 7871), raw_esp=True)
    tun = Tun(config.get("tun", "cot0"), 1400, offload=config.get("offload", True))
    plane = DataPlane(wire, tun, path=config.get("path", "udp"), partial_checksums=config.get("partial", True))
    plane.apply_view(view)
    for peer in view.peers:
        outbound, inbound = pair_sas(config.get("seed", "test"), view.node, peer)
        plane.install(peer, outbound, [inbound])
    status_path = Path(config["status"])
    done = threading.Event()

    def dump(*_: object) -> None:
        status_path.with_suffix(".tmp").write_text(json.dumps(plane.status()))
        status_path.with_suffix(".tmp").replace(status_path)

    def apply(*_: object) -> None:  # SIGHUP: re-read the view (ACL changes without a restart)
        plane.apply_view(NodeView.model_validate(json.loads(Path(sys.argv[1]).read_text())["view"]))

    signal.signal(signal.SIGUSR1, dump)
    signal.signal(signal.SIGHUP, apply)
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    plane.start()
    Path(config["ready"]).write_text("ready")
    while not done.wait(0.5):
        pass
    dump()
    plane.close()


if __name__ == "__main__":
    main()
