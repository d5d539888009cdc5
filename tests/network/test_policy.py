"""What the tunnel refuses: ACLs, VPN isolation for a node in two VPNs, and gateways to a LAN (issue 5).

Every refusal is observed twice: the traffic does not arrive, and the agent
counted the drop under its reason.
"""

from __future__ import annotations

import pytest

from compose.netns import Lab
from compose.probes import tcp_ask, tcp_echo
from tests.conftest import wait_until
from tests.helpers.traffic import tcp_connects
from tests.network.overlay import star, start_overlay

pytestmark = pytest.mark.timeout(600)  # real processes in namespaces, on a shared 2-core machine


def test_acl_denies_a_port_and_removing_the_rule_lets_it_through(lab: Lab) -> None:
    router, hosts = star(lab, ["a", "b"])
    overlay = start_overlay(lab, hosts, router, "10.201.1.1", {"a": ["lab"], "b": ["lab"]})
    overlay.wait_synced("a", ["b"])
    vip_b = overlay.vip("b")
    overlay.wait_ping("a", vip_b)
    for port in (5001, 5002):
        tcp_echo(hosts["b"], port, count=20, timeout=120)
    assert tcp_connects(hosts["a"], vip_b, 5002), "with no rules, members talk freely"

    added = overlay.server.cli_json(
        "acl", "add", "lab", "--from", "a", "--to", "b", "--proto", "tcp", "--ports", "5001"
    )
    rule_id = added.get("id") or overlay.server.cli_json("acl", "list", "lab")[0]["id"]
    assert wait_until(lambda: len(overlay.status("b")["acl"]) == 1, 20)
    assert tcp_connects(hosts["a"], vip_b, 5001), "the rule allows port 5001 (and its answers)"
    denied_before = overlay.counters("b").get("in_acl_denied", 0)
    assert not tcp_connects(hosts["a"], vip_b, 5002, timeout=3), "port 5002 is not allowed"
    assert wait_until(lambda: overlay.counters("b").get("in_acl_denied", 0) > denied_before, 10)

    overlay.server.cli("acl", "remove", str(rule_id))
    assert wait_until(lambda: not overlay.status("b")["acl"], 20)
    assert tcp_connects(hosts["a"], vip_b, 5002), "without the rule the port opens, no restart needed"


def test_node_in_two_vpns_never_forwards_between_them(lab: Lab) -> None:
    router, hosts = star(lab, ["a", "m", "b"])
    hosts["m"].sysctl("net.ipv4.ip_forward", 1)  # the kernel would forward; the data plane must not
    server_args = {"vpns": {"x": "100.64.1.0/24", "y": "100.64.2.0/24"}}
    overlay = start_overlay(lab, hosts, router, "10.201.1.1", {"a": ["x"], "m": ["x", "y"], "b": ["y"]}, **server_args)
    overlay.wait_synced("m", ["a", "b"])
    vip_a, vip_b = overlay.vip("a", "x"), overlay.vip("b", "y")
    m_x, m_y = overlay.vip("m", "x"), overlay.vip("m", "y")
    overlay.wait_ping("a", m_x)
    overlay.wait_ping("b", m_y)
    overlay.wait_ping("m", vip_a)
    overlay.wait_ping("m", vip_b)
    assert "b" not in overlay.status("a")["peers"], "members of one VPN do not even see the other's"

    # An operator tries to bridge: m becomes x's gateway for y's subnet. a now routes y through m.
    overlay.server.cli("member", "remove", "m", "x")
    overlay.server.cli("member", "add", "m", "x", "--role", "gateway")
    overlay.server.cli("route", "add", "m", "x", "100.64.2.0/24")
    assert wait_until(
        lambda: any(r["cidr"] == "100.64.2.0/24" for r in overlay.status("a")["peers"]["m"]["routes"]), 20
    )
    m_x = overlay.vip("m", "x")
    overlay.wait_ping("a", m_x)

    def refused() -> int:  # m refuses on the way in (y's address is not x's) or, failing that, on the way out
        counters = overlay.counters("m")
        return counters.get("in_vpn_isolation", 0) + counters.get("out_vpn_isolation", 0)

    before = refused()
    assert not hosts["a"].ping(vip_b, count=3, timeout=3), "x's traffic must not enter y through m"
    assert wait_until(lambda: refused() > before, 10)


def test_gateway_route_reaches_a_lan_host(lab: Lab) -> None:
    router, hosts = star(lab, ["a", "g"])
    lan_host = lab.add_host("h")
    lab.link(hosts["g"], "lan0", lan_host, "eth0", "192.168.50.1/24", "192.168.50.2/24")
    lan_host.run(["ip", "route", "add", "default", "via", "192.168.50.1"])
    hosts["g"].sysctl("net.ipv4.ip_forward", 1)
    overlay = start_overlay(lab, hosts, router, "10.201.1.1", {"a": ["lab"], "g": []})
    overlay.server.cli("member", "add", "g", "lab", "--role", "gateway")
    overlay.server.cli("route", "add", "g", "lab", "192.168.50.0/24")
    overlay.wait_synced("a", ["g"])
    assert wait_until(lambda: overlay.status("a")["peers"]["g"]["routes"], 20)
    overlay.wait_ping("a", "192.168.50.2")
    tcp_echo(lan_host, 8080, count=5, timeout=60)
    seen = tcp_ask(hosts["a"], "192.168.50.2", 8080)
    assert seen is not None, "TCP to the LAN host through the gateway"
    # the LAN host saw the member's overlay address, not a translated one: no NAT on the way
    assert seen.split(":")[0] == overlay.vip("a")
    assert wait_until(lambda: overlay.counters("g").get("in_packets", 0) > 0, 10)
