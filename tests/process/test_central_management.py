"""Central management end to end: real server processes, real agents, real CURVE (issue 3).

Three agents in two VPNs (n2 in both):   vpn a: n1, n2     vpn b: n2, n3
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus import errors
from bus.client import Client
from bus.errors import RemoteError
from bus.messages.datastore import (
    AclAdd,
    Events,
    EventsRequest,
    MemberAdd,
    NodeListRequest,
    NodeRemove,
    NodeRename,
    RouteAdd,
    VpnCreate,
    VpnSet,
)
from bus.messages.sync import Snapshot, SnapshotRequest
from tests.conftest import ROOT, wait_until
from tests.helpers.server import AgentThread, CoterieServer, shared


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoterieServer]:
    srv = CoterieServer(tmp_path, presence_timeout=4.0).start()
    yield srv
    srv.stop()


@pytest.fixture
def trio(server: CoterieServer, tmp_path: Path) -> Iterator[dict[str, AgentThread]]:
    server.mutate(VpnCreate, name="a", subnet="10.1.0.0/24")
    server.mutate(VpnCreate, name="b", subnet="10.2.0.0/24")
    joins = {"n1": server.add_node("n1", ["a"]), "n2": server.add_node("n2", ["a", "b"])}
    joins["n3"] = server.add_node("n3", ["b"])
    context = shared()
    agents = {name: AgentThread(tmp_path / name, join, heartbeat=0.4, context=context) for name, join in joins.items()}
    for agent in agents.values():
        agent.start()
    assert wait_until(lambda: all(a.view is not None for a in agents.values()), 15)
    # Wait until each has heard that the others are online: the views are settled.
    assert wait_until(lambda: _all_online(agents), 15)
    yield agents
    for agent in agents.values():
        agent.stop()
    context.term()


def _all_online(agents: dict[str, AgentThread]) -> bool:
    return all(a.view is not None and all(p.online for p in a.view.peers.values()) for a in agents.values())


def _peers(agent: AgentThread) -> dict[str, dict[str, str]]:
    assert agent.view is not None
    return {name: dict(peer.vips) for name, peer in agent.view.peers.items()}


def test_each_netmap_holds_exactly_the_right_peers(trio: dict[str, AgentThread]) -> None:
    n1, n2, n3 = trio["n1"], trio["n2"], trio["n3"]
    assert _peers(n1) == {"n2": {"a": "10.1.0.2"}}
    assert _peers(n2) == {"n1": {"a": "10.1.0.1"}, "n3": {"b": "10.2.0.2"}}
    assert _peers(n3) == {"n2": {"b": "10.2.0.1"}}
    assert n2.view is not None and {v: x.vip for v, x in n2.view.vpns.items()} == {"a": "10.1.0.2", "b": "10.2.0.1"}


def _reached_by(
    server: CoterieServer, agents: dict[str, AgentThread], message_type: type, **fields: object
) -> set[str]:
    """Apply a change; return the agents that applied an update for it (and check the dry run agreed).

    Agents are named by their label in *agents*; the dry run names nodes as they will be after the change.
    """
    preview = server.mutate(message_type, dry_run=True, **fields)
    before = {label: a.applied for label, a in agents.items()}
    server.mutate(message_type, **fields)

    def label_of(node: str) -> str | None:
        return next((label for label, a in agents.items() if a.view is not None and a.view.node == node), None)

    assert wait_until(
        lambda: all((lb := label_of(n)) and agents[lb].applied > before[lb] for n in preview.reached), 10
    ), (preview.reached, before)
    time.sleep(1.0)  # anyone else would have heard by now
    expected = {label_of(n) for n in preview.reached}
    reached = {label for label, a in agents.items() if a.applied > before[label]}
    assert reached == expected, f"dry run said {sorted(preview.reached)}, the change reached {sorted(reached)}"
    return reached


def test_changes_reach_exactly_the_affected_agents(server: CoterieServer, trio: dict[str, AgentThread]) -> None:
    assert _reached_by(server, trio, NodeRename, name="n3", new_name="n3x") == {"n2", "n3"}
    assert trio["n2"].view is not None and "n3x" in trio["n2"].view.peers
    assert _reached_by(server, trio, RouteAdd, node="n1", vpn="a", cidr="192.168.7.0/24") == {"n1", "n2"}
    assert [r.cidr for r in trio["n2"].view.peers["n1"].routes] == ["192.168.7.0/24"]
    assert _reached_by(server, trio, AclAdd, vpn="b", src="n2", dst="n3x", proto="tcp", ports="22") == {"n2", "n3"}
    assert trio["n1"].view is not None and trio["n1"].view.acl == []
    # The ACL in b names n2 and n3x only: n1 joins b but sees no one there, and no one sees it.
    assert _reached_by(server, trio, MemberAdd, node="n1", vpn="b") == {"n1"}
    assert _peers(trio["n1"]) == {"n2": {"a": "10.1.0.2"}}
    # a has no rules: n3x joining it reaches everyone.
    assert _reached_by(server, trio, MemberAdd, node="n3x", vpn="a") == {"n1", "n2", "n3"}
    assert _peers(trio["n1"]) == {"n2": {"a": "10.1.0.2"}, "n3x": {"a": "10.1.0.3"}}
    # Tunnel settings of a VPN reach its members (all three are in b by now), and only them.
    assert _reached_by(server, trio, VpnSet, name="b", keepalive=5, mtu=1300) == {"n1", "n2", "n3"}
    assert trio["n2"].view is not None and (trio["n2"].view.vpns["b"].keepalive, trio["n2"].view.vpns["b"].mtu) == (
        5,
        1300,
    )
    assert trio["n2"].view.vpns["a"].keepalive == 25


def test_removed_node_is_refused_and_forgotten_within_two_seconds(
    server: CoterieServer, trio: dict[str, AgentThread]
) -> None:
    n3 = trio["n3"]
    started = time.monotonic()
    server.mutate(NodeRemove, name="n3")
    assert wait_until(lambda: "n3" not in _peers(trio["n2"]), 2.0), "n2 still lists n3 after 2 s"
    assert time.monotonic() - started <= 2.5
    context = shared()
    try:
        with Client(
            server.operator.endpoint,
            n3.state.keypair(),
            server.operator.server_key,
            timeout=2.0,
            retries=0,
            context=context,
        ) as client:
            with pytest.raises(RemoteError) as info:
                client.request("fanout", SnapshotRequest())
            assert info.value.code == errors.FORBIDDEN
    finally:
        context.term()
    assert wait_until(lambda: n3.state.load_status().get("state") == "revoked", 15)


def test_hostile_node_gets_nothing_and_is_logged(server: CoterieServer, trio: dict[str, AgentThread]) -> None:
    n1 = trio["n1"]
    context = shared()
    try:
        with Client(
            server.operator.endpoint,
            n1.state.keypair(),
            server.operator.server_key,
            timeout=2.0,
            retries=0,
            context=context,
        ) as hostile:
            with pytest.raises(RemoteError) as other_view:
                hostile.request("fanout", SnapshotRequest(node="n2"))
            assert other_view.value.code == errors.FORBIDDEN
            with pytest.raises(RemoteError) as operator_api:
                hostile.request("datastore", NodeListRequest())
            assert operator_api.value.code == errors.FORBIDDEN
            own = hostile.request("fanout", SnapshotRequest())
            assert isinstance(own, Snapshot) and own.view.node == "n1" and set(own.view.peers) == {"n2"}
            assert hostile.next_push(0.5) is None
    finally:
        context.term()
    log = server.log_text()
    assert "asked for the view of node 'n2'" in log
    assert "may not call datastore" in log


def test_offline_and_online_reach_co_members(server: CoterieServer, trio: dict[str, AgentThread]) -> None:
    trio["n3"].stop()
    assert wait_until(lambda: not trio["n2"].view.peers["n3"].online, 12), "n2 never heard that n3 went offline"
    assert trio["n1"].view is not None and "n3" not in trio["n1"].view.peers
    restarted = AgentThread.__new__(AgentThread)  # the same node, same state dir, new process-like agent
    restarted.__dict__.update(trio["n3"].__dict__)
    import threading

    from nodeagent.agent import Agent

    restarted.agent = Agent(restarted.state, heartbeat=0.4, timeout=2.0)
    restarted.thread = threading.Thread(target=restarted.agent.run, daemon=True)
    restarted.start()
    try:
        assert wait_until(lambda: trio["n2"].view.peers["n3"].online, 10), "n2 never heard that n3 came back"
    finally:
        restarted.stop()


def test_receipts_show_a_paused_agent_as_pending(server: CoterieServer, tmp_path: Path) -> None:
    server.mutate(VpnCreate, name="r", subnet="10.9.0.0/24")
    join_fast, join_slow = server.add_node("fast", ["r"]), server.add_node("slow", ["r"])
    fast = AgentThread(tmp_path / "fast", join_fast, heartbeat=0.4).start()
    slow_dir = tmp_path / "slow"
    log = open(tmp_path / "slow.log", "wb")  # noqa: SIM115
    slow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tui.cli",
            "agent",
            "up",
            "--join",
            join_slow,
            "--state-dir",
            str(slow_dir),
            "--heartbeat",
            "0.4",
            "--control-only",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    try:
        assert wait_until(
            lambda: (
                fast.view is not None
                and fast.view.peers.get("slow", None) is not None
                and fast.view.peers["slow"].online
            ),
            20,
        )
        os.kill(slow.pid, signal.SIGSTOP)
        change = server.mutate(RouteAdd, node="fast", vpn="r", cidr="172.30.0.0/16")
        event = _event(server, change.revision)
        assert wait_until(lambda: (e := _event(server, change.revision)) and e.applied == 1, 10), event
        event = _event(server, change.revision)
        assert event is not None and event.reached == 2 and event.pending == ["slow"] and event.pending_since
        os.kill(slow.pid, signal.SIGCONT)
        assert wait_until(lambda: (e := _event(server, change.revision)) and e.applied == 2, 10)
        cli = subprocess.run(
            [sys.executable, "-m", "tui.cli", "events", "--dir", str(server.home)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert f"r{change.revision} " in cli.stdout and "applied on 2/2 nodes" in cli.stdout
        status = subprocess.run(
            [sys.executable, "-m", "tui.cli", "agent", "status", "--state-dir", str(slow_dir), "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        doc = json.loads(status.stdout)
        assert doc["node"] == "slow" and doc["peers"]["fast"]["vips"] == {"r": "10.9.0.1"}
    finally:
        os.kill(slow.pid, signal.SIGCONT)
        slow.terminate()
        slow.wait(timeout=10)
        log.close()
        fast.stop()


def _event(server: CoterieServer, revision: int):  # type: ignore[no-untyped-def]
    reply = server.request(EventsRequest(since=revision - 1, limit=1))
    assert isinstance(reply, Events)
    return reply.events[0] if reply.events else None


def test_agent_restarted_while_server_is_down_starts_from_stored_view(
    server: CoterieServer, trio: dict[str, AgentThread], caplog: pytest.LogCaptureFixture
) -> None:
    n2 = trio["n2"]
    held = n2.digest
    for agent in trio.values():
        agent.stop()
    server.stop()
    from nodeagent.agent import Agent

    caplog.set_level(logging.INFO)
    again = Agent(n2.state, heartbeat=0.4, timeout=0.5)
    assert again.resume() is True
    assert again.replica.digest == held and set(again.replica.view.peers) == {"n1", "n3"}
    assert any("starting from the stored view" in r.getMessage() for r in caplog.records)
    stored = json.loads((n2.state.path / "view.json").read_text())
    stored["view"]["peers"]["n1"]["vips"]["a"] = "10.1.0.99"
    (n2.state.path / "view.json").write_text(json.dumps(stored))
    tampered = Agent(n2.state, heartbeat=0.4, timeout=0.5)
    assert tampered.resume() is False
    assert "altered" in n2.state.load_status().get("problem", "")
