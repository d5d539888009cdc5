"""Coterie for real in a lab: a server in the router namespace, agents in A and B enroll and sync.

Why: the data-plane and NAT tests build on exactly this: real processes
started through the real CLI in separate namespaces, reaching the server
over routed veth links rather than loopback.
"""

from __future__ import annotations

import pytest

from compose.coterie_lab import agent_status, start_agent, start_server, wait_agent
from compose.netns import Lab, ns_pids
from compose.topologies import sites_behind, two_hosts


@pytest.mark.timeout(300)  # five Python processes per server, and agents, on a shared 2-core machine
def test_server_in_router_and_two_agents_sync(lab: Lab) -> None:
    t = two_hosts(lab)
    server = start_server(t.r, lab.workdir, listen=t.ra_addr)
    server.vpn_create("lab", "100.64.0.0/24")
    joins = {name: server.node_add(name, ["lab"]) for name in ("a", "b")}
    assert t.ra_addr in server.endpoint
    agents = {
        name: start_agent(host, joins[name], lab.workdir / f"agent-{name}") for name, host in (("a", t.a), ("b", t.b))
    }
    status_a = wait_agent(t.a, lab.workdir / "agent-a", peers=["b"], agent=agents["a"])
    status_b = wait_agent(t.b, lab.workdir / "agent-b", peers=["a"], agent=agents["b"])
    # the lowest free addresses, in the order the nodes were added: what the benchmark adapter relies on
    assert status_a["vpns"]["lab"]["vip"] == "100.64.0.1"
    assert status_b["vpns"]["lab"]["vip"] == "100.64.0.2"
    assert status_a["peers"]["b"]["vips"] == {"lab": "100.64.0.2"}
    assert status_a["server"] == [server.endpoint]
    online = {n["name"]: n["online"] for n in server.nodes()}
    assert online == {"a": True, "b": True}
    # the agents really run in their namespaces and reach the server through the router
    assert agents["a"].pid in ns_pids(t.a.ns)
    assert agent_status(t.a, lab.workdir / "agent-nobody") is None


@pytest.mark.timeout(400)
def test_agents_behind_nat_pat_and_firewall_reach_a_server_on_443(lab: Lab) -> None:
    """The shape issue 6 builds on: every site kind reaches the server in R (the firewall only on TCP/443)."""
    s = sites_behind(lab, ["public", "nat", "pat", "firewall"])
    server = start_server(s.r, lab.workdir, listen=s.server_addr, port=443)
    server.vpn_create("lab", "100.64.0.0/24")
    names = [f"n{site.index}" for site in s.sites]
    agents = {}
    for name, site in zip(names, s.sites, strict=True):
        agents[name] = start_agent(site.hosts[0], server.node_add(name, ["lab"]), lab.workdir / f"agent-{name}")
    for name, site in zip(names, s.sites, strict=True):
        others = [n for n in names if n != name]
        wait_agent(site.hosts[0], lab.workdir / f"agent-{name}", others, agent=agents[name])
    assert {n["name"]: n["online"] for n in server.nodes()} == dict.fromkeys(names, True)
    # the firewall box let the agent's TCP/443 through and still drops everything else
    firewall = s[3]
    assert not firewall.hosts[0].ping(s.server_addr, timeout=1)
