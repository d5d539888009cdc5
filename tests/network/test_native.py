"""Native addressing through NAT and PAT, RNAT, and the PAT-ambiguity port overloading (issue 6; D12, D13).

R is the internet (the server listens on R's loopback); each node sits at a
site behind a box of its kind (compose/topologies.py sites_behind). The VPN
is created with ``--addressing native``: no virtual IPs, every application
uses real addresses. The tests check that the netmap gives each node the
address it reaches its peer at, that ping and a TCP connection to that
address work both ways, and that the accepting side sees the connecting
node at the address its own netmap gives (RNAT corrected the inner
header; the kernel accepted the checksums, or no connection would complete).

PAT ambiguity (compose/labs/pat-ambiguity.toml's shape): two nodes behind
one PAT connect from the same source port to the same port of the public
node at the same time; each gets back the hash of exactly its own data, and
the public node sees two connections from the PAT's address on distinct
ports (the agent's port overloading).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from compose.coterie_lab import start_server
from compose.netns import Host, Lab
from compose.topologies import sites_behind
from tests.conftest import wait_until
from tests.network.overlay import SUBNET, Overlay

pytestmark = pytest.mark.timeout(600)  # real processes in namespaces, on a shared 2-core machine

MB = 1 << 20
PORT = 5201

# Accepts *count* connections (one thread each); answers each with the SHA-256 of what it read, and
# records per connection the peer address and port the kernel reports and that hash.
SERVER = r"""
import hashlib, json, os, socket, sys, threading
addr, port, count, out, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((addr, port)); s.listen(8)
s.settimeout(limit)
print("listening", flush=True)
seen, lock = [], threading.Lock()
def serve(c, peer):
    c.settimeout(limit)
    h, n = hashlib.sha256(), 0
    while True:
        d = c.recv(1 << 16)
        if not d: break
        h.update(d); n += len(d)
    c.sendall(h.hexdigest().encode()); c.close()
    with lock: seen.append({"peer": peer[0], "port": peer[1], "bytes": n, "sha256": h.hexdigest()})
threads = []
for _ in range(count):
    c, peer = s.accept()
    t = threading.Thread(target=serve, args=(c, peer)); t.start(); threads.append(t)
for t in threads: t.join(limit)
open(out + ".tmp", "w").write(json.dumps(seen)); os.replace(out + ".tmp", out)
"""

# Connects (from *sport* if not 0), sends *total* random bytes, reads the server's hash of them.
CLIENT = r"""
import hashlib, json, os, socket, sys
addr, port, total, sport, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if sport: s.bind(("0.0.0.0", sport))
s.settimeout(limit); s.connect((addr, port))
h, n = hashlib.sha256(), 0
while n < total:
    d = os.urandom(min(1 << 16, total - n)); s.sendall(d); h.update(d); n += len(d)
s.shutdown(socket.SHUT_WR)
answer = b""
while True:
    d = s.recv(128)
    if not d: break
    answer += d
print(json.dumps({"bytes": n, "sha256": h.hexdigest(), "answer": answer.decode(), "local": s.getsockname()}))
"""


def native_overlay(lab: Lab, hosts: dict[str, Host], server_host: Host, listen: str) -> Overlay:
    """Server, one native VPN "lab" with every host's node in it, agents started."""
    server = start_server(server_host, lab.workdir, listen=listen)
    server.vpn_create("lab", SUBNET, "--addressing", "native")
    overlay = Overlay(lab, server, hosts)
    joins = {name: server.node_add(name, ["lab"]) for name in hosts}
    for name in hosts:
        overlay.start(name, joins[name])
    return overlay


def addresses_settle(overlay: Overlay, expected: dict[str, dict[str, str]], own: dict[str, str]) -> None:
    """Wait until each node's view gives itself *own* and each peer the address in *expected*."""

    def seen() -> dict[str, object]:
        found: dict[str, object] = {}
        for name in expected:
            status = overlay.status(name)
            found[name] = (
                status["vpns"].get("lab", {}).get("vip"),
                {p: v["vips"].get("lab") for p, v in status["peers"].items()},
            )
        return found

    wanted = {name: (own[name], expected[name]) for name in expected}
    assert wait_until(lambda: seen() == wanted, 90, interval=1.0), f"{seen()} != {wanted}"


def serve(host: Host, addr: str, count: int, out: Path, limit: float = 120):  # type: ignore[no-untyped-def]
    proc = host.spawn([sys.executable, "-c", SERVER, addr, str(PORT), str(count), str(out), str(limit)], "native-srv")
    assert wait_until(lambda: "listening" in Path(proc.log_path).read_text(errors="replace"), 15), proc.log_tail()
    return proc


def connect(host: Host, addr: str, total: int, sport: int = 0, limit: float = 120) -> dict:
    done = host.run(
        [sys.executable, "-c", CLIENT, addr, str(PORT), str(total), str(sport), str(limit)], timeout=limit + 30
    )
    return dict(json.loads(done.stdout))


def results(out: Path, count: int) -> list[dict]:
    assert wait_until(lambda: out.exists(), 60), "the server never wrote its results"
    found = list(json.loads(out.read_text()))
    assert len(found) == count, found
    return found


@pytest.mark.parametrize("kind", ["nat", "pat"])
def test_native_addressing_across_nat(lab: Lab, kind: str) -> None:
    sites = sites_behind(lab, ["public", kind])
    x, y = sites[0], sites[1]
    hosts = {"x": x.hosts[0], "y": y.hosts[0]}
    overlay = native_overlay(lab, hosts, sites.r, sites.server_addr)
    overlay.wait_synced("x", ["y"])
    # x reaches y at y's public mapping; y reaches x at x's own (public) address; each keeps its own.
    addresses_settle(
        overlay,
        {"x": {"y": y.public[0]}, "y": {"x": x.addrs[0]}},
        {"x": x.addrs[0], "y": y.addrs[0]},
    )
    overlay.wait_ping("y", x.addrs[0])
    overlay.wait_ping("x", y.public[0])
    # (the counters come from the agents' periodic status reports: polled)
    assert wait_until(lambda: overlay.counters("x").get("in_rnat", 0) > 0, 20), "y's source corrected at x"
    assert wait_until(lambda: overlay.counters("y").get("in_rnat", 0) > 0, 20), "x's destination corrected at y"

    # y -> x: 20 MB; x's application sees y at the address x's netmap gives for y.
    out = lab.workdir / "to-x.json"
    serve(hosts["x"], x.addrs[0], 1, out)
    sent = connect(hosts["y"], x.addrs[0], 20 * MB)
    assert sent["answer"] == sent["sha256"], "the data arrived whole"
    [accepted] = results(out, 1)
    assert accepted["peer"] == y.public[0] and accepted["bytes"] == 20 * MB and accepted["sha256"] == sent["sha256"]
    assert sent["local"][0] == y.addrs[0], "y's application uses its own address"

    # x -> y, to y's public mapping; y's application sees x at x's address, and y listens on its own.
    out = lab.workdir / "to-y.json"
    serve(hosts["y"], y.addrs[0], 1, out)
    sent = connect(hosts["x"], y.public[0], 2 * MB)
    assert sent["answer"] == sent["sha256"]
    [accepted] = results(out, 1)
    assert accepted["peer"] == x.addrs[0] and accepted["sha256"] == sent["sha256"]
    # The agents' own encapsulated packets were not captured again (no loop): the path is the expected one.
    assert overlay.dataplane("x")["peers"]["y"]["path"] == ("esp" if kind == "nat" else "udp")


def test_pat_ambiguity_same_source_port_to_the_same_port(lab: Lab) -> None:
    sites = sites_behind(lab, ["public", "pat"], hosts_per_site=2)
    pub, pat = sites[0], sites[1]
    hosts = {"a": pub.hosts[0], "b1": pat.hosts[0], "b2": pat.hosts[1]}
    overlay = native_overlay(lab, hosts, sites.r, sites.server_addr)
    overlay.wait_synced("a", ["b1", "b2"])
    shared = pat.public[0]
    addresses_settle(
        overlay,
        {"a": {"b1": shared, "b2": shared}, "b1": {"a": pub.addrs[0], "b2": pat.addrs[1]}},
        {"a": pub.addrs[0], "b1": pat.addrs[0]},
    )
    overlay.wait_ping("b1", pub.addrs[0])
    overlay.wait_ping("b2", pub.addrs[0])

    out = lab.workdir / "ambiguity.json"
    serve(hosts["a"], pub.addrs[0], 2, out)
    answers: dict[str, dict] = {}

    def client(name: str) -> None:
        answers[name] = connect(hosts[name], pub.addrs[0], 4 * MB, sport=40000)

    threads = [threading.Thread(target=client, args=(name,)) for name in ("b1", "b2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(200)
    assert set(answers) == {"b1", "b2"}, answers
    for name in ("b1", "b2"):
        assert answers[name]["local"] == [hosts[name].addrs("eth0")[0], 40000], "the same source port on both"
        assert answers[name]["answer"] == answers[name]["sha256"], f"{name} got back the hash of its own data"
    assert answers["b1"]["sha256"] != answers["b2"]["sha256"]
    accepted = results(out, 2)
    assert {c["peer"] for c in accepted} == {shared}, "both seen at the PAT's address, as the netmap gives"
    ports = sorted(c["port"] for c in accepted)
    assert len(set(ports)) == 2 and 40000 in ports, f"distinct overloaded ports: {ports}"
    assert {c["sha256"] for c in accepted} == {answers["b1"]["sha256"], answers["b2"]["sha256"]}
    mapped = [m for m in overlay.dataplane("a").get("portmap", []) if m["proto"] == 6 and m["original"] == 40000]
    assert sorted(m["public"] for m in mapped) == ports and {m["peer"] for m in mapped} == {"b1", "b2"}
