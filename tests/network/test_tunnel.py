"""Real traffic between two agents through the tunnel (issue 5; RELIABILITY.md D18 shape).

Two hosts A and B behind a router R (the vpnbench topology), the server in
R, an agent in each host with its own TUN device. Keys come from keydist,
addresses from the server; nothing is configured by hand on the hosts.
"""

from __future__ import annotations

import pytest

from compose.netns import Lab
from compose.topologies import two_hosts
from tests.conftest import wait_until
from tests.helpers.traffic import read_result, tcp_send, tcp_sink
from tests.network.overlay import start_overlay

MB = 1 << 20

pytestmark = pytest.mark.timeout(600)  # real processes in namespaces, on a shared 2-core machine


@pytest.mark.parametrize("path", ["udp", "esp"])
def test_ping_and_50mb_tcp_transfer(lab: Lab, path: str) -> None:
    t = two_hosts(lab)
    overlay = start_overlay(
        lab, {"a": t.a, "b": t.b}, t.r, t.ra_addr, {"a": ["lab"], "b": ["lab"]}, args=["--path", path]
    )
    overlay.wait_synced("a", ["b"])
    vip_a, vip_b = overlay.vip("a"), overlay.vip("b")
    overlay.wait_ping("a", vip_b)
    assert t.b.ping(vip_a, count=3, timeout=5)

    out = lab.workdir / "sink.json"
    tcp_sink(t.b, vip_b, 5201, out)
    sent = tcp_send(t.a, vip_b, 5201, total=50 * MB)
    received = read_result(out)
    assert received is not None, "the sink wrote no result"
    assert received["bytes"] == sent["bytes"] == 50 * MB
    assert received["sha256"] == sent["sha256"]

    # It went through the tunnel on the chosen path: ESP packets counted at both ends, nothing dropped.
    # (status.json is rewritten at each heartbeat: wait for the one after the transfer)
    assert wait_until(lambda: overlay.counters("a").get("out_packets", 0) > 50 * MB // 1500, 10)
    assert wait_until(lambda: overlay.counters("b").get("in_packets", 0) >= 50 * MB // 1500, 10)
    assert overlay.dataplane("a")["peers"]["b"]["path"] == path
    counters_b = overlay.counters("b")
    assert not {k: v for k, v in counters_b.items() if k.startswith("in_replay") or k == "in_auth_failed"}
    # and not in the clear: the underlay device of A carried no packet to B's overlay address
    route = t.a.run(["ip", "route", "get", vip_b]).stdout
    assert "dev cot0" in route
