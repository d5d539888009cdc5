"""A node that moves, a NAT box that forgets, a bad path (issue 6; RELIABILITY.md D9, D11 in part).

- A PAT box with random ports restarts: the node behind it gets a new public
  port. Its peer keeps sending to the old one until the node's first
  authenticated packet arrives from the new one (a liveness dummy, sent once
  the node hears nothing for a second); traffic resumes within 5 s.
- A public node changes its address on the raw ESP path: same, by host.
- 1 % random loss and 50 ms delay each way: a 20 MB TCP transfer completes
  with the same SHA-256 at both ends.
"""

from __future__ import annotations

import time

import pytest

from compose.netns import Lab
from compose.topologies import Sites, add_delay, add_loss, readdress, restart_box, sites_behind, two_hosts
from tests.conftest import wait_until
from tests.helpers.traffic import read_result, tcp_send, tcp_sink
from tests.network.overlay import Overlay, start_overlay

pytestmark = pytest.mark.timeout(600)

MB = 1 << 20
RESUME_WITHIN = 5.0  # the bound: "traffic resumes within 5 seconds without operator action"


def seconds_until_ping(overlay: Overlay, name: str, address: str, limit: float = 30.0) -> float:
    """Time from now until *address* answers a ping from *name* (pings of 0.5 s each, back to back)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if overlay.hosts[name].ping(address, timeout=0.5):
            return time.monotonic() - start
    return float("inf")


def pair_behind(lab: Lab, kinds: list[str], path: str, pin: str | None = None) -> tuple[Overlay, Sites]:
    sites = sites_behind(lab, kinds)
    hosts = {"x": sites[0].hosts[0], "y": sites[1].hosts[0]}
    overlay = start_overlay(lab, hosts, sites.r, sites.server_addr, {"x": ["lab"], "y": ["lab"]})
    overlay.wait_synced("x", ["y"])
    if pin:
        overlay.server.cli("node", "set", "y", "--path", pin)
    for me, peer in (("x", "y"), ("y", "x")):
        assert wait_until(lambda me=me, peer=peer: overlay.status(me)["peers"][peer]["path"] == path, 60)
    overlay.wait_ping("x", overlay.vip("y"))
    overlay.wait_ping("y", overlay.vip("x"))
    return overlay, sites


def test_pat_box_restart_with_new_ports_resumes_within_5_seconds(lab: Lab) -> None:
    overlay, sites = pair_behind(lab, ["public", "pat-random"], "udp")
    vip_y = overlay.vip("y")
    assert wait_until(lambda: overlay.dataplane("x")["peers"]["y"]["endpoint"], 10)
    before = overlay.dataplane("x")["peers"]["y"]["endpoint"]
    assert overlay.hosts["x"].ping(vip_y, timeout=2)  # fresh data from x at y: y watches for silence

    restart_box(sites[1])  # every masquerade mapping forgotten; the next one gets a random port
    took = seconds_until_ping(overlay, "x", vip_y)
    print(f"PAT box restart: x reaches y again after {took:.2f} s")

    assert took <= RESUME_WITHIN, f"traffic resumed after {took:.1f} s"
    assert wait_until(lambda: overlay.dataplane("x")["peers"]["y"]["endpoint"] != before, 10)
    after = overlay.dataplane("x")["peers"]["y"]["endpoint"]
    assert after.split(":")[0] == before.split(":")[0] and after != before, (before, after)
    assert wait_until(lambda: overlay.counters("x").get("endpoint_moved", 0) >= 1, 10)
    assert wait_until(lambda: overlay.counters("y").get("out_liveness", 0) >= 1, 10), overlay.counters("y")


def test_public_node_changes_address_on_the_esp_path_and_traffic_resumes(lab: Lab) -> None:
    # pinned: offloading public agents would take udp (paths.py), and this is about roaming on raw ESP
    overlay, _ = pair_behind(lab, ["public", "public"], "esp", pin="esp")
    vip_y = overlay.vip("y")
    y = overlay.hosts["y"]
    assert overlay.hosts["x"].ping(vip_y, timeout=2)

    readdress(y, "wan", "198.18.1.2/24", "198.18.1.77/24", "198.18.1.1")
    took = seconds_until_ping(overlay, "x", vip_y)
    print(f"address change: x reaches y again after {took:.2f} s")

    assert took <= RESUME_WITHIN, f"traffic resumed after {took:.1f} s"
    assert wait_until(lambda: overlay.dataplane("x")["peers"]["y"]["endpoint"] == "198.18.1.77:0", 10)
    assert overlay.hosts["y"].ping(overlay.vip("x"), timeout=2)
    # and the server learns it too, for the next peer that joins (endpoints are re-read every 10 s)
    assert wait_until(lambda: any("198.18.1.77" in e for e in _endpoints(overlay, "y")), 60, interval=1.0)


def _endpoints(overlay: Overlay, name: str) -> list[str]:
    node = next(n for n in overlay.server.nodes() if n["name"] == name)
    return [str(e) for e in node.get("endpoints", [])] + [str(node.get("public_endpoint") or "")]


def test_tcp_transfer_completes_with_1_percent_loss_and_50_ms_delay(lab: Lab) -> None:
    t = two_hosts(lab)
    add_loss(t.r, 1)
    add_delay(t.r, 50, ["ra", "rb"])
    overlay = start_overlay(lab, {"a": t.a, "b": t.b}, t.r, t.ra_addr, {"a": ["lab"], "b": ["lab"]})
    overlay.wait_synced("a", ["b"])
    vip_b = overlay.vip("b")
    overlay.wait_ping("a", vip_b, timeout=60)
    assert t.a.ping(vip_b, count=3, timeout=5)

    out = lab.workdir / "sink.json"
    tcp_sink(t.b, vip_b, 5201, out, limit=400)
    started = time.monotonic()
    sent = tcp_send(t.a, vip_b, 5201, total=20 * MB, limit=400)
    print(f"20 MB through 1 % loss and 100 ms RTT: {time.monotonic() - started:.1f} s")
    assert wait_until(lambda: read_result(out) is not None, 30)
    received = read_result(out)
    assert received is not None and received["bytes"] == sent["bytes"] == 20 * MB
    assert received["sha256"] == sent["sha256"]
    # the loss was real: R dropped packets of this run, and the transfer survived them
    assert t.r.nft_counter("cotloss", "loss") > 100


def test_keepalives_hold_a_pat_mapping_past_its_timeout_and_without_them_it_lapses(lab: Lab) -> None:
    """D11's idle half: the PAT box forgets UDP mappings after 2 s of silence (its conntrack timeouts).

    With keepalives every second, the public node still reaches the node behind the PAT after 22 s of
    idleness; with keepalives every 60 s (the negative control), its first packet after 22 s is dropped
    at the PAT, which proves that the keepalives were what held the mapping.
    """
    overlay, sites = pair_behind(lab, ["public", "pat"], "udp")
    box = sites[1].box
    assert box is not None
    for name in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
        box.run(["sysctl", "-q", "-w", f"net.netfilter.{name}=2"])
    vip_y = overlay.vip("y")
    idle = 22.0  # past the mapping timeout and past LIVENESS_WINDOW (15 s), so only keepalives speak

    def keepalive_everywhere(seconds: int) -> None:
        overlay.server.cli("vpn", "set", "lab", "--keepalive", str(seconds))
        for name in ("x", "y"):
            assert wait_until(lambda n=name: overlay.status(n)["vpns"]["lab"]["keepalive"] == seconds, 20)

    keepalive_everywhere(1)
    assert overlay.hosts["x"].ping(vip_y, timeout=2)
    time.sleep(idle)
    assert overlay.hosts["x"].ping(vip_y, count=1, timeout=1), "the keepalives did not hold the mapping"

    keepalive_everywhere(60)
    assert overlay.hosts["y"].ping(overlay.vip("x"), timeout=2)  # the last packets: y's mapping is fresh now
    time.sleep(idle)
    assert not overlay.hosts["x"].ping(vip_y, count=1, timeout=1), "mapping still open without keepalives"
    # y speaks again (any packet of its own): a new mapping, learned by x from y's authenticated packet
    assert overlay.hosts["y"].ping(overlay.vip("x"), timeout=3)
    assert overlay.hosts["x"].ping(vip_y, timeout=2)
