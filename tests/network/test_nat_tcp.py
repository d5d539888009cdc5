"""When UDP does not get through: ESP over TLS on TCP/443, straight to the peer or through the relay (issue 6, D17).

Same shape as test_nat.py: R is the internet, the server (bus, relay on
TCP 443) listens on R's loopback, each node sits at a site of its kind. A
firewall site lets out only new TCP connections to 443 and to the bus port.
The server classes a node behind it `firewalled` and tells both ends of each
pair the path: `tcp443` when the other end can be dialled, `relay` when
neither can. Checked: the classes, the path on both ends, the stream state
in `agent status`, ping both ways and a 20 MB TCP transfer (sha256 equal).
The transfer rate is printed (run with -s to see it), never asserted.

D17's switch: a public pair on raw ESP; an nft rule in one node's namespace
drops its UDP and ESP; its periodic NAT probe finds UDP blocked, the server
reclasses it `firewalled` and both ends move to tcp443; without the rule
they return to a UDP path (udp: both agents offload, see paths.py).
"""

from __future__ import annotations

import time

import pytest

from compose.coterie_lab import DEFAULT_PORT, coterie
from compose.netns import Host, Lab
from compose.topologies import sites_behind
from tests.conftest import wait_until
from tests.helpers.traffic import read_result, tcp_send, tcp_sink
from tests.network.overlay import Overlay, start_overlay

pytestmark = pytest.mark.timeout(600)  # real processes in namespaces, on a shared 2-core machine

MB = 1 << 20
FIREWALL_PORTS = (443, DEFAULT_PORT)  # the relay's TLS port and the bus (a firewalled agent still reaches its server)

# (site kind of x, site kind of y) -> (class of x, class of y, path)
PAIRS = {
    ("public", "firewall"): ("public", "firewalled", "tcp443"),
    ("pat", "firewall"): ("pat", "firewalled", "relay"),
    ("firewall", "firewall"): ("firewalled", "firewalled", "relay"),
}


def _classes(overlay: Overlay) -> dict[str, str]:
    return {n["name"]: n["nat_class"] for n in overlay.server.nodes()}


def _transfer(overlay: Overlay, sender: str, receiver: str, label: str) -> None:
    """20 MB over TCP through the VPN, sha256 equal on both ends; prints the rate."""
    vip = overlay.vip(receiver)
    out = overlay.lab.workdir / f"sink-{label}.json"
    tcp_sink(overlay.hosts[receiver], vip, 5201, out)
    sent = tcp_send(overlay.hosts[sender], vip, 5201, total=20 * MB)
    received = read_result(out)
    assert received is not None and received["sha256"] == sent["sha256"] and received["bytes"] == 20 * MB
    for name in (sender, receiver):
        counters = overlay.counters(name)
        tcp = overlay.dataplane(name).get("tcp", {})
        print(f"\n[counters] {name}: " + ", ".join(f"{k}={v}" for k, v in counters.items() if k != "out_packets"))
        print(f"[tcp] {name}: {tcp.get('counters')} relay {tcp.get('relay')}")
    print(f"\n[rate] {label}: 20 MB in {sent['seconds']:.2f}s = {20 * 8 * 1.048576 / sent['seconds']:.1f} Mbit/s")


@pytest.mark.parametrize("kinds", list(PAIRS), ids=["-".join(k) for k in PAIRS])
def test_firewalled_pair_uses_tcp443_or_relay_and_carries_traffic(lab: Lab, kinds: tuple[str, str]) -> None:
    class_x, class_y, path = PAIRS[kinds]
    sites = sites_behind(lab, list(kinds), firewall_ports=FIREWALL_PORTS)
    hosts = {"x": sites[0].hosts[0], "y": sites[1].hosts[0]}
    overlay = start_overlay(lab, hosts, sites.r, sites.server_addr, {"x": ["lab"], "y": ["lab"]})
    started = time.monotonic()  # the server is up and both agents were just started
    overlay.wait_synced("x", ["y"])
    # a firewalled node is classed after three unanswered probes (about 5 s)
    assert wait_until(lambda: _classes(overlay) == {"x": class_x, "y": class_y}, 90, interval=1.0), _classes(overlay)
    for me, peer in (("x", "y"), ("y", "x")):
        assert wait_until(lambda me=me, peer=peer: overlay.status(me)["peers"][peer]["path"] == path, 30)
    vip_x, vip_y = overlay.vip("x"), overlay.vip("y")
    overlay.wait_ping("x", vip_y, timeout=60)
    print(f"\n[time] {'-'.join(kinds)}: agent start to first ping {time.monotonic() - started:.1f}s")
    overlay.wait_ping("y", vip_x)
    _transfer(overlay, "x", "y", "-".join(kinds))

    counters = overlay.counters("x")  # status is written per heartbeat (0.5 s)
    assert wait_until(lambda: overlay.counters("x").get(f"out_{path}", 0) > 1000, 10), counters
    shown = coterie(hosts["x"], "agent", "status", "--state-dir", str(overlay.state_dir("x"))).stdout
    assert f"{path} (peer {class_y})" in shown, shown  # the path and why, as a user reads it
    for me, peer in (("x", "y"), ("y", "x")):
        tunnel = overlay.dataplane(me)["peers"][peer]
        assert tunnel["path"] == path, tunnel
        assert tunnel["peer_class"] == {"x": class_x, "y": class_y}[peer], tunnel
        expected = "via relay" if path == "relay" else "stream"
        assert tunnel["stream"].startswith(expected), tunnel
    if path == "tcp443":
        # the firewalled end dialled the public one, which answers on the accepted stream
        assert wait_until(lambda: "dialled" in overlay.dataplane("y")["peers"]["x"]["stream"], 10)
        assert wait_until(lambda: "accepted" in overlay.dataplane("x")["peers"]["y"]["stream"], 10)
    else:
        relay = overlay.dataplane("x")["tcp"]["relay"]
        assert relay["authenticated"] and relay["address"] == f"{sites.server_addr}:443", relay


def _block_udp(host: Host) -> None:
    """What a network that only lets TCP out does to this node: its UDP and raw ESP are dropped both ways."""
    host.nft(
        "table inet cotblock {\n"
        " chain out {\n  type filter hook output priority filter; policy accept;\n"
        '  meta l4proto { udp, esp } counter drop comment "blocked"\n }\n'
        " chain in {\n  type filter hook input priority filter; policy accept;\n"
        "  meta l4proto { udp, esp } drop\n }\n"
        "}\n"
    )


def test_blocked_udp_moves_a_pair_to_tcp443_and_back(lab: Lab) -> None:
    """D17: block UDP; the server reclasses the node and both ends switch to tcp443; unblock: back to UDP."""
    sites = sites_behind(lab, ["public", "public"])
    hosts = {"x": sites[0].hosts[0], "y": sites[1].hosts[0]}
    overlay = start_overlay(lab, hosts, sites.r, sites.server_addr, {"x": ["lab"], "y": ["lab"]})
    overlay.wait_synced("x", ["y"])
    assert wait_until(lambda: _classes(overlay) == {"x": "public", "y": "public"}, 60, interval=1.0)

    def paths() -> tuple[str, str]:
        return overlay.dataplane("x")["peers"]["y"]["path"], overlay.dataplane("y")["peers"]["x"]["path"]

    assert wait_until(lambda: paths() == ("udp", "udp"), 30), paths()
    vip_x, vip_y = overlay.vip("x"), overlay.vip("y")
    overlay.wait_ping("x", vip_y)

    _block_udp(hosts["x"])
    blocked = time.monotonic()
    assert not hosts["x"].ping(vip_y, timeout=2), "the drop rule did not cut the UDP path"

    # traffic that gets no answer makes x probe its NAT at once (else: the next round, within 30 s);
    # three unanswered probes 1.5 s apart, then a heartbeat
    def reclassed() -> bool:
        hosts["x"].ping(vip_y, timeout=1)  # what a user does meanwhile: it keeps sending
        return _classes(overlay)["x"] == "firewalled"

    assert wait_until(reclassed, 90, interval=0.5), _classes(overlay)
    print(f"\n[time] UDP blocked to class firewalled: {time.monotonic() - blocked:.1f}s")
    assert wait_until(lambda: paths() == ("tcp443", "tcp443"), 30), paths()
    overlay.wait_ping("x", vip_y, timeout=60)
    overlay.wait_ping("y", vip_x)
    print(f"\n[time] UDP blocked to ping over tcp443: {time.monotonic() - blocked:.1f}s")
    stream = lambda: overlay.dataplane("x")["peers"]["y"]["stream"]  # noqa: E731
    assert wait_until(lambda: "dialled" in stream(), 10), f"the firewalled end dials: {stream()}"
    _transfer(overlay, "x", "y", "public-public, UDP blocked (tcp443)")

    hosts["x"].run(["nft", "delete", "table", "inet", "cotblock"])
    unblocked = time.monotonic()
    assert wait_until(lambda: _classes(overlay)["x"] == "public", 90, interval=1.0), _classes(overlay)
    assert wait_until(lambda: paths() == ("udp", "udp"), 30), paths()
    overlay.wait_ping("x", vip_y)
    overlay.wait_ping("y", vip_x)
    print(f"\n[time] UDP unblocked to ping over udp: {time.monotonic() - unblocked:.1f}s")
    time.sleep(1.5)  # a few status writes: the counters settle
    before = overlay.counters("x").get("out_tcp443", 0)
    assert hosts["x"].ping(vip_y, timeout=2)
    time.sleep(1.5)
    assert overlay.counters("x").get("out_tcp443", 0) == before, "packets still go over tcp443 after the switch"
