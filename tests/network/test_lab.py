"""The lab itself: routing, 1:1 NAT, PAT, the firewall box, loss, and a cleanup that leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from compose.netns import Lab, LabError, checkout_env, cleanup_stale, list_namespaces, ns_pids
from compose.probes import tcp_ask, tcp_echo, udp_ask, udp_echo
from compose.spec import SpecError, build, load
from compose.topologies import add_delay, add_loss, readdress, restart_box, sites_behind, two_hosts
from tests.conftest import wait_until
from tests.network.conftest import lab_unavailable

LABS = Path(__file__).resolve().parents[2] / "compose" / "labs"


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


def test_restarted_pat_box_forgets_its_mappings_and_a_host_can_move(lab: Lab) -> None:
    s = sites_behind(lab, ["pat-random", "public"])
    pat, far = s[0], s[1]
    udp_echo(far.hosts[0], 9999, count=6)
    first = udp_ask(pat.hosts[0], far.addrs[0], 9999, sport=40000)
    again = udp_ask(pat.hosts[0], far.addrs[0], 9999, sport=40000)
    assert first is not None and first == again, f"a live mapping changed: {first} then {again}"
    restart_box(pat)
    after = udp_ask(pat.hosts[0], far.addrs[0], 9999, sport=40000)
    assert after is not None and after.startswith(pat.wan_addr + ":")
    assert after != first, f"the mapping survived the box restart: {first}"
    # the public host roams to another address on its link: the far side sees the new one
    readdress(far.hosts[0], "wan", "198.18.1.2/24", "198.18.1.7/24", "198.18.1.1")
    udp_echo(pat.hosts[0], 9998, count=1)  # not reachable from outside: expect no answer
    assert udp_ask(far.hosts[0], pat.addrs[0], 9998, timeout=1) is None
    tcp_echo(s.r, 7000, count=1)
    seen = tcp_ask(far.hosts[0], s.server_addr, 7000, timeout=5)
    assert seen is not None and seen.startswith("198.18.1.7:"), seen


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
    assert nat.public == ["198.18.0.2", "198.18.0.3"]
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


def test_delay_relay_delays_forwarded_packets_both_ways(lab: Lab) -> None:
    t = two_hosts(lab)
    relay = add_delay(t.r, 50, ["ra", "rb"])
    got = t.a.run(["ping", "-n", "-c", "5", "-i", "0.2", "-W", "3", t.b_addr], check=False, timeout=30)
    rtts = [float(x.split("time=")[1].split()[0]) for x in got.stdout.splitlines() if "time=" in x]
    assert len(rtts) >= 4, got.stdout  # the relay loses nothing on an idle link
    # 50 ms each way through the relay: a lower bound only, which a loaded machine cannot break
    assert min(rtts) >= 95, f"round trips {rtts} ms, expected >= 100 ms"
    # a TCP exchange still completes through the delayed router
    tcp_echo(t.b, 8443, count=1)
    seen = tcp_ask(t.a, t.b_addr, 8443, timeout=10)
    assert seen is not None and seen.startswith(f"{t.a_addr}:"), seen
    assert relay.poll() is None


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


@pytest.mark.parametrize("path", sorted(LABS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_topology_file_builds_and_reaches_the_server_address(lab: Lab, path: Path) -> None:
    assert path.read_text().startswith("#"), f"{path.name} must open with an ASCII diagram"
    spec = load(path)
    built = build(lab, spec)
    assert built.nodes, path.name
    # every node's traffic toward the server is routed (a TCP probe; firewalls pass only their ports)
    tcp_echo(built.server_host, spec.server_port, count=len(built.nodes), timeout=60)
    for name, host in built.nodes.items():
        seen = tcp_ask(host, built.listen, spec.server_port, timeout=10)
        assert seen is not None, f"{path.name}: node {name} cannot reach {built.listen}:{spec.server_port}"


def test_topology_file_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('shape = "sites"\nkinds = ["pat", "moon"]\n')
    with pytest.raises(SpecError, match=r"bad.toml: unknown kinds \['moon'\]"):
        load(bad)
    bad.write_text('shape = "two-hosts"\nlos = 1\n')
    with pytest.raises(SpecError, match="unknown keys"):
        load(bad)


HOLD_LAB = """
import signal, sys, threading
from compose.netns import Lab
from compose.topologies import two_hosts
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
with Lab() as lab:
    two_hosts(lab)
    lab.publish(file=sys.argv[1], nodes={"alpha": "a"})
    print(lab.prefix, flush=True)
    stop.wait(120)
lab.remove_workdir()
"""


def test_compose_cli_finds_execs_in_and_stops_a_published_lab(tmp_path: Path) -> None:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    spec = tmp_path / "held.toml"
    spec.write_text("# held by a test process\n")
    env = checkout_env()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LAB, str(spec)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        prefix = holder.stdout.readline().strip()  # type: ignore[union-attr]
        assert prefix.startswith("cot-"), prefix

        def compose(*args: str) -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "compose", *args]
            return subprocess.run(argv, capture_output=True, text=True, timeout=90, env=env)

        assert str(spec) in compose("list").stdout
        # a node name resolves to its host's namespace
        assert "10.201.1.2" in compose("exec", str(spec), "alpha", "--", "ip", "-4", "addr").stdout
        unknown = compose("exec", str(spec), "nosuch", "--", "true")
        assert unknown.returncode == 1 and "known: a, alpha, b, r" in unknown.stderr
        assert compose("down", str(spec)).returncode == 0
        assert holder.wait(timeout=30) == 0
        assert [ns for ns in list_namespaces() if ns.startswith(prefix)] == []
        assert compose("down", str(spec)).returncode == 1  # nothing left to stop
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
