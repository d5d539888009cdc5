"""The lab itself: routing, 1:1 NAT, PAT, the firewall box, loss, and a cleanup that leaves nothing behind."""

from __future__ import annotations

import pytest

from compose.netns import Lab, LabError, cleanup_stale, list_namespaces, ns_pids
from compose.probes import tcp_ask, tcp_echo, udp_ask, udp_echo
from compose.topologies import add_loss, sites_behind, two_hosts
from tests.conftest import wait_until
from tests.network.conftest import lab_unavailable


def test_two_hosts_ping_across_the_router(lab: Lab) -> None:
    t = two_hosts(lab)
    assert t.a.ping(t.b_addr, timeout=5)
    assert t.b.ping(t.a_addr, timeout=5)
    assert t.a.addr("eth0") == "10.201.1.2"
    assert t.r.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    # the namespaces are really separate: A does not own B's address
    assert "10.201.2.2" not in t.a.run(["ip", "-4", "addr"]).stdout


def test_pat_box_hides_hosts_behind_its_address_with_distinct_ports(lab: Lab) -> None:
    s = sites_behind(lab, ["pat", "public"], hosts_per_site=2)
    pat, far = s[0], s[1]
    udp_echo(far.hosts[0], 9999, count=4)
    seen = [udp_ask(h, far.addrs[0], 9999, sport=40000) for h in pat.hosts]
    assert None not in seen, f"no UDP answer through the PAT box: {seen}"
    addrs = {str(x).split(":")[0] for x in seen}
    ports = {str(x).split(":")[1] for x in seen}
    assert addrs == {pat.wan_addr}, f"far side saw {seen}, expected the box's address {pat.wan_addr}"
    assert len(ports) == 2, f"two hosts with the same source port got one mapped port: {seen}"
    # the inside addresses are not reachable from outside
    assert not far.hosts[0].ping(pat.addrs[0], timeout=1)


def test_pat_box_with_random_ports(lab: Lab) -> None:
    s = sites_behind(lab, ["pat-random", "public"])
    udp_echo(s[1].hosts[0], 9999, count=2)
    seen = udp_ask(s[0].hosts[0], s[1].addrs[0], 9999, sport=40000)
    assert seen is not None and seen.startswith(s[0].wan_addr + ":")
    # fully-random mapping: keeping port 40000 has a 1 in ~28,000 chance
    assert seen != f"{s[0].wan_addr}:40000"


def test_firewall_box_passes_tcp_443_only(lab: Lab) -> None:
    s = sites_behind(lab, ["firewall", "public"])
    inside, far = s[0].hosts[0], s[1]
    tcp_echo(far.hosts[0], 443, count=2)
    tcp_echo(far.hosts[0], 8080, count=2)
    udp_echo(far.hosts[0], 443, count=2)
    seen = tcp_ask(inside, far.addrs[0], 443)
    assert seen is not None and seen.startswith(s[0].wan_addr + ":"), seen
    dropped_before = s[0].box.nft_counter("cotfw", "fw-drop")  # type: ignore[union-attr]
    assert udp_ask(inside, far.addrs[0], 443, timeout=2) is None, "UDP got through the firewall"
    assert tcp_ask(inside, far.addrs[0], 8080, timeout=2) is None, "TCP/8080 got through the firewall"
    assert not inside.ping(far.addrs[0], timeout=1)
    assert s[0].box.nft_counter("cotfw", "fw-drop") > dropped_before  # type: ignore[union-attr]
    # nothing gets in from outside either
    assert tcp_ask(far.hosts[0], s[0].addrs[0], 443, timeout=2) is None


def test_nat_box_maps_both_ways(lab: Lab) -> None:
    s = sites_behind(lab, ["nat", "public"], hosts_per_site=2)
    nat, far = s[0], s[1]
    assert nat.public == ["198.18.0.2", "198.18.0.4"]
    udp_echo(far.hosts[0], 9999, count=4)
    for host, public in zip(nat.hosts, nat.public, strict=True):
        seen = udp_ask(host, far.addrs[0], 9999, sport=40000)
        # 1:1 NAT rewrites the address only: the source port stays
        assert seen == f"{public}:40000", f"{host.name} seen as {seen}, expected {public}:40000"
    # inbound: the far side reaches each inside host at its public address
    for host, addr, public in zip(nat.hosts, nat.addrs, nat.public, strict=True):
        udp_echo(host, 7000, count=1)
        seen = udp_ask(far.hosts[0], public, 7000, sport=41000)
        assert seen == f"{far.addrs[0]}:41000", f"{public} -> {addr}: inside saw {seen}"


def test_loss_drops_a_share_of_forwarded_packets(lab: Lab) -> None:
    t = two_hosts(lab)
    add_loss(t.r, 50)
    got = t.a.run(["ping", "-n", "-q", "-c", "40", "-i", "0.01", "-W", "1", t.b_addr], check=False, timeout=30)
    assert t.r.nft_counter("cotloss", "loss") > 0
    # 40 round trips at 50 % loss each way: all 40 arriving has probability 0.75**40 ~ 1e-5
    assert "40 received" not in got.stdout, got.stdout


def test_lab_exit_removes_namespaces_and_processes() -> None:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab() as lab:
        t = two_hosts(lab)
        sleeper = t.a.spawn(["sleep", "300"], "sleeper")
        stubborn = t.b.spawn(["sh", "-c", "trap '' TERM; sleep 300"], "stubborn")
        prefix = lab.prefix
        assert len(lab.namespaces()) == 3
        assert wait_until(lambda: sleeper.pid in ns_pids(t.a.ns), 5)
    assert [ns for ns in list_namespaces() if ns.startswith(prefix)] == []
    assert sleeper.poll() is not None
    assert stubborn.poll() is not None  # ignored SIGTERM: killed after the grace period
    lab.remove_workdir()
    with pytest.raises(LabError):
        lab.add_host("late")


def test_cleanup_stale_leaves_live_labs_alone() -> None:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab(prefix="cotst") as lab:
        lab.add_host("x")
        assert cleanup_stale("cotst") == []  # its owner (this process) is alive
        assert lab.namespaces() == [lab.prefix + "x"]
        assert cleanup_stale("cotst", force=True) == [lab.prefix + "x"]
        assert lab.namespaces() == []
    lab.remove_workdir()
