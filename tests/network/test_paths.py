"""Where packets may go: exit nodes (a default route through a gateway) and the tunnel MTU (D14).

An exit node must carry everything else of a member that chose it, without
capturing the member's own encapsulated packets or its control connection.
The MTU must leave room for the path's overhead so that no outer packet is
fragmented, and a packet one byte too large must be refused with the MTU.
"""

from __future__ import annotations

import pytest

from compose.netns import Lab
from compose.topologies import two_hosts
from tests.conftest import wait_until
from tests.network.overlay import star, start_overlay

pytestmark = pytest.mark.timeout(600)  # real processes in namespaces, on a shared 2-core machine

INTERNET_HOST = "198.51.100.2"


def test_exit_node_carries_everything_else_but_not_the_agents_own_traffic(lab: Lab) -> None:
    router, hosts = star(lab, ["a", "g"])
    internet = lab.add_host("i")  # reachable only behind g
    lab.link(hosts["g"], "up0", internet, "eth0", "198.51.100.1/24", f"{INTERNET_HOST}/24")
    hosts["g"].sysctl("net.ipv4.ip_forward", 1)
    hosts["g"].nft(
        "table ip gwnat {\n chain postrouting {\n  type nat hook postrouting priority 100;\n"
        '  oifname "up0" masquerade\n }\n}\n'
    )
    assert not hosts["a"].ping(INTERNET_HOST, timeout=1), "without the exit node the host is out of reach"

    overlay = start_overlay(
        lab, hosts, router, "10.201.1.1", {"a": ["lab"], "g": []}, per_node_args={"a": ["--exit-node", "g"]}
    )
    overlay.server.cli("member", "add", "g", "lab", "--role", "gateway")
    overlay.server.cli("route", "add", "g", "lab", "0.0.0.0/0")
    overlay.wait_synced("a", ["g"])
    overlay.wait_ping("a", INTERNET_HOST)
    assert "dev cot0" in hosts["a"].run(["ip", "route", "get", INTERNET_HOST]).stdout
    # the agent's own ESP to g and its control connection still use the underlay
    assert "dev eth0" in hosts["a"].run(["ip", "route", "get", "10.201.2.2", "mark", str(0x7871)]).stdout
    assert "dev eth0" in hosts["a"].run(["ip", "route", "get", "10.201.1.1"]).stdout
    assert wait_until(lambda: overlay.status("a")["state"] == "connected", 10)
    assert wait_until(lambda: overlay.counters("g").get("in_packets", 0) > 0, 10)  # status is written per heartbeat

    overlay.agents["a"].terminate()
    overlay.agents["a"].wait(timeout=30)
    rules = hosts["a"].run(["ip", "rule", "show"]).stdout
    assert "0x7871" not in rules and "30833" not in rules, f"exit rules left behind:\n{rules}"


def test_mtu_leaves_room_for_the_path_and_refuses_one_byte_more(lab: Lab) -> None:
    t = two_hosts(lab)
    overlay = start_overlay(lab, {"a": t.a, "b": t.b}, t.r, t.ra_addr, {"a": ["lab"], "b": ["lab"]})
    overlay.wait_synced("a", ["b"])
    vip_b = overlay.vip("b")
    overlay.wait_ping("a", vip_b)
    mtu = overlay.dataplane("a")["mtu"]
    assert mtu <= 1500 - 20 - 8 - 4 - 8 - 8 - 2 - 16  # IPv4 + UDP + marker + ESP header + IV + trailer + ICV
    # The router drops every fragment: if any outer packet were fragmented, the large ping would fail.
    t.r.nft(
        "table ip nofrag {\n chain forward {\n  type filter hook forward priority 0;\n"
        "  ip frag-off & 0x3fff != 0 drop\n }\n}\n"
    )
    largest = mtu - 28  # ICMP payload: MTU minus IP and ICMP headers
    ok = t.a.run(["ping", "-n", "-c", "3", "-M", "do", "-s", str(largest), "-W", "2", vip_b], check=False, timeout=20)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    too_big = t.a.run(["ping", "-n", "-c", "1", "-M", "do", "-s", str(largest + 1), vip_b], check=False, timeout=20)
    assert too_big.returncode != 0
    assert f"mtu={mtu}" in (too_big.stdout + too_big.stderr).replace(" ", "")
