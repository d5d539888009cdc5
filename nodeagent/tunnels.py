"""The glue between the control loop and the data plane: views to routes, keys to SAs.

The control loop (nodeagent/agent.py) owns the bus connection; the data plane
(nodeagent/dataplane.py) owns the packets; the key ring (nodeagent/keys.py)
owns the schedule. This object is what the loop calls, so that each of those
three stays ignorant of the others: it hands views to the data plane and the
key ring, runs the key ring's requests to keydist, and copies the SAs the
ring wants into the data plane after every change.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from bus.client import Client
from bus.errors import BusError
from bus.messages import Message
from bus.messages.sync import NodeView
from nodeagent.dataplane import DataPlane
from nodeagent.keys import REKEY_GRACE, REKEY_LEAD, KeyRing, Timing
from nodeagent.natprobe import NatProbe, NatReport

log = logging.getLogger(__name__)

KEY_TICK = 0.5  # seconds between key ring ticks (rotation, republish, fetch, SA switch-over)
ENDPOINT_REFRESH = 10.0  # seconds between re-reads of the local addresses (roaming)


def timing_for(rekey_interval: float) -> Timing:
    """The key schedule for a rekey interval: lead and grace shrink with short intervals (tests, paranoia)."""
    return Timing(
        rekey_interval=rekey_interval,
        lead=min(REKEY_LEAD, rekey_interval / 4),
        grace=min(REKEY_GRACE, rekey_interval / 2),
    )


class Tunnels:
    def __init__(self, dataplane: DataPlane, keyring: KeyRing) -> None:
        self.dataplane = dataplane
        self.keyring = keyring
        self._next_tick = 0.0
        self._endpoints: list[str] = []
        self._endpoints_at = float("-inf")
        self.dataplane.nat_probe = self.nat_probe = NatProbe()
        self.reflector: tuple[str, int] | None = None

    @classmethod
    def create(cls, dataplane: DataPlane, node: str, identity: Any, timing: Timing | None = None) -> Tunnels:
        return cls(dataplane, KeyRing(node, identity, time.time(), timing=timing))

    def start(self) -> None:
        self.dataplane.start()

    def close(self) -> None:
        self.dataplane.close()

    def apply_view(self, view: NodeView) -> None:
        """A new view: peers gone lose their SAs now (removal takes effect at the next packet)."""
        self.dataplane.apply_view(view)
        dropped = self.keyring.set_peers({name: peer.sign_key for name, peer in view.peers.items()}, time.time())
        if dropped:
            log.info("peers removed from the view, SAs dropped: %s", ", ".join(sorted(dropped)))
        self._install()

    def on_connect(self) -> None:
        self.keyring.on_connect(time.time())
        self._next_tick = 0.0

    def on_push(self, message: Message) -> None:
        if self.keyring.on_push(message, time.time()):
            self._install()

    def set_reflector(self, address: str) -> None:
        """The server's UDP reflector ("host:port", from its heartbeat answers); probing starts once known."""
        host, _, port = address.rpartition(":")
        new = (host, int(port)) if host and port.isdigit() else None
        if new != self.reflector:
            self.reflector = new
            self.nat_probe = self.dataplane.nat_probe = NatProbe()  # a new server: probe afresh

    def nat_report(self) -> NatReport:
        return self.nat_probe.report

    def _probe(self, now: float) -> None:
        if self.reflector is None:
            return
        for tunnel in list(self.dataplane.tunnels.values()):
            if tunnel.path == "punch" and not tunnel.last_received and 0 < tunnel.punch_until < now:
                tunnel.punch_until = -1.0  # once per punch: the next view change starts another
                log.info("hole punching to %s got no answer; probing our mapping again", tunnel.peer)
                self.nat_probe.soon()
        if self.nat_probe.conclude(now):
            report = self.nat_probe.report
            log.info("NAT discovery: mapped %s, filtering %s", report.mapped or "-", report.filtering)
        if self.nat_probe.due(now):
            self.dataplane.wire.send_udp(self.nat_probe.start(now), self.reflector)

    def tick(self, client: Client) -> None:
        """Run the key ring's schedule: publish, fetch, switch SAs; at most every KEY_TICK seconds."""
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + KEY_TICK
        self._probe(now)
        for request in self.keyring.tick(time.time()):
            reply: Message | BusError
            try:
                reply = client.request("keydist", request)
            except BusError as exc:
                reply = exc
                log.debug("keydist: %s", exc)
            self.keyring.on_reply(request, reply, time.time())
        self._install()

    def _install(self) -> None:
        now = time.time()
        for name, state in self.keyring.peers.items():
            self.dataplane.install(name, self.keyring.outbound(name, now), list(state.inbound.values()))

    def endpoints(self) -> list[str]:
        if time.monotonic() - self._endpoints_at >= ENDPOINT_REFRESH:
            try:
                self._endpoints = self.dataplane.endpoints()
            except OSError as exc:
                log.warning("cannot read local addresses: %s", exc)
            self._endpoints_at = time.monotonic()
        return self._endpoints

    def status(self) -> dict[str, Any]:
        doc = self.dataplane.status()
        keys = self.keyring.status(time.time())
        for name, peer in doc["peers"].items():
            peer["keys"] = keys.get(name, {})
        doc["key_counters"] = dict(self.keyring.counters)
        doc["nat"] = {"mapped": self.nat_probe.report.mapped, "filtering": self.nat_probe.report.filtering}
        return doc
