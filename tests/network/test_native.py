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
import time
from pathlib import Path

import pytest

from compose.coterie_lab import coterie, start_server
from compose.netns import Host, Lab
from compose.topologies import readdress, sites_behind
from tests.conftest import wait_until
from tests.network.overlay import SUBNET, Overlay

pytestmark = pytest.mark.timeout(600)  # real processes in namespaces, on a shared 2-core machine

MB = 1 << 20
PORT = 5201

# Accepts *count* connections (one thread each); answers each with the SHA-256 of what it read, and
# records per connection the peer address and port the kernel reports and that hash.
SERVER = r"""
import hashlib, json, os, socket, sys, threading, time
addr, port, count, out, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((addr, port)); s.listen(8)
s.settimeout(limit)
print("listening", flush=True)
seen, lock = [], threading.Lock()
def serve(c, peer):
    c.settimeout(limit)
    h, n, start = hashlib.sha256(), 0, time.monotonic()
    while True:
        d = c.recv(1 << 16)
        if not d: break
        h.update(d); n += len(d)
    seconds = time.monotonic() - start
    c.sendall(h.hexdigest().encode()); c.close()
    with lock: seen.append({"peer": peer[0], "port": peer[1], "bytes": n, "sha256": h.hexdigest(), "s": seconds})
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
    for host in hosts.values():  # strict reverse-path filtering, as on RHEL: the capture must not trip it
        for conf in ("all", "default", *(["wan"] if host is x.hosts[0] else ["eth0"])):
            host.sysctl(f"net.ipv4.conf.{conf}.rp_filter", 1)
    overlay = native_overlay(lab, hosts, sites.r, sites.server_addr)
    started = time.monotonic()
    if kind == "nat":  # raw ESP, which offloading agents would not take by themselves (paths.py): its own rule
        overlay.server.cli("node", "set", "y", "--path", "esp")
    overlay.wait_synced("x", ["y"])
    # x reaches y at y's public mapping; y reaches x at x's own (public) address; each keeps its own.
    addresses_settle(
        overlay,
        {"x": {"y": y.public[0]}, "y": {"x": x.addrs[0]}},
        {"x": x.addrs[0], "y": y.addrs[0]},
    )
    overlay.wait_ping("y", x.addrs[0])
    first_ping = time.monotonic() - started
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
    mbit = accepted["bytes"] * 8 / accepted["s"] / 1e6
    print(f"native across {kind}: first ping {first_ping:.1f}s after agent start, 20 MB at {mbit:.0f} Mbit/s")

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
        answers[name] = connect(hosts[name], pub.addrs[0], 16 * MB, sport=40000)  # > 10k packets each (D12)

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
    shown = coterie(hosts["a"], "agent", "status", "--state-dir", str(overlay.state_dir("a"))).stdout
    assert f"vpn lab: {pub.addrs[0]} (member), native addressing" in shown, shown
    assert "port 40000 seen here as" in shown, shown


def test_rnat_two_sites_with_the_same_private_addresses(lab: Lab) -> None:
    """D13's shape: two sites both numbered 10.1.0.0/25, a host at 10.1.0.10 in each, behind two PATs.

    Both send with inner source 10.1.0.10; the public node must see them at their two public
    mappings, and the two of them reach each other at those mappings too (replies reverse-mapped).
    """
    sites = sites_behind(lab, ["public", "pat", "pat"])
    for index in (1, 2):
        site = sites[index]
        assert site.box is not None
        site.box.run(["ip", "addr", "del", f"192.168.{index}.1/24", "dev", "br0"])
        site.box.run(["ip", "addr", "add", "10.1.0.1/25", "dev", "br0"])
        readdress(site.hosts[0], "eth0", f"{site.addrs[0]}/24", "10.1.0.10/25", "10.1.0.1")
    hosts = {"a": sites[0].hosts[0], "b1": sites[1].hosts[0], "b2": sites[2].hosts[0]}
    overlay = native_overlay(lab, hosts, sites.r, sites.server_addr)
    overlay.wait_synced("a", ["b1", "b2"])
    a_addr, b1_seen, b2_seen = sites[0].addrs[0], sites[1].public[0], sites[2].public[0]
    addresses_settle(
        overlay,
        {"a": {"b1": b1_seen, "b2": b2_seen}, "b1": {"a": a_addr, "b2": b2_seen}, "b2": {"a": a_addr, "b1": b1_seen}},
        {"a": a_addr, "b1": "10.1.0.10", "b2": "10.1.0.10"},
    )
    for name in ("b1", "b2"):
        overlay.wait_ping(name, a_addr)
    overlay.wait_ping("a", b1_seen)
    overlay.wait_ping("a", b2_seen)
    overlay.wait_ping("b1", b2_seen, timeout=60)  # between the two sites (hole punching), both ends rewritten

    out = lab.workdir / "overlap.json"
    serve(hosts["a"], a_addr, 2, out)
    sent = {name: connect(hosts[name], a_addr, 1 * MB) for name in ("b1", "b2")}
    accepted = {c["peer"]: c for c in results(out, 2)}
    assert set(accepted) == {b1_seen, b2_seen}, "the same private source, two mapped addresses"
    for name, seen in (("b1", b1_seen), ("b2", b2_seen)):
        assert sent[name]["local"][0] == "10.1.0.10"
        assert sent[name]["answer"] == sent[name]["sha256"] == accepted[seen]["sha256"]

    out = lab.workdir / "b1-to-b2.json"
    serve(hosts["b2"], "10.1.0.10", 1, out)
    sent_b1 = connect(hosts["b1"], b2_seen, 1 * MB)
    [accepted_b2] = results(out, 1)
    assert accepted_b2["peer"] == b1_seen, "b2 sees b1 at b1's mapping, not at its (and its own) 10.1.0.10"
    assert sent_b1["answer"] == sent_b1["sha256"] == accepted_b2["sha256"]
