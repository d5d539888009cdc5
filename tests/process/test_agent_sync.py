"""The real node agent against a scripted fanout, over real CURVE sockets on loopback.

Why: the agent's promise is that its view on disk is always a view the
server sent, never a guess: it must take snapshots, apply in-order updates
and acknowledge them, fall back to a snapshot on a gap, a wrong digest or a
stale heartbeat, ignore duplicates, keep working from its sealed view when
the server is gone, and refuse a stored view that was edited or has expired.
The fanout here is scripted (tests/helpers/scripted_fanout.py) so that each
of those situations can be produced on purpose.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from bus.identity import Identity, Role
from bus.messages.sync import NodeView, PeerView, VpnView
from bus.signing import verify_seal
from nodeagent.agent import Agent
from nodeagent.state import ServerInfo, StateDir, StoredView
from nodeagent.sync import RECEIPT_DELAY
from tests.conftest import BusHarness, wait_until
from tests.helpers.scripted_fanout import ScriptedFanout

NODE = "alpha"
WAIT = 10.0  # generous bound for anything the agent does within a heartbeat or two (0.3 s each)


# ---------------------------------------------------------------------- views
def _vpn(mtu: int = 1400) -> VpnView:
    return VpnView(
        name="office",
        subnet="10.0.0.0/24",
        addressing="overlay",
        topology="mesh",
        cipher="aes256gcm",
        mtu=mtu,
        keepalive=25,
        vip="10.0.0.1",
        role="member",
    )


def _peer(name: str, vip: str, online: bool = False) -> PeerView:
    return PeerView(name=name, vips={"office": vip}, roles={"office": "member"}, online=online)


V1 = NodeView(node=NODE, vpns={"office": _vpn()}, peers={"beta": _peer("beta", "10.0.0.2")})
V2 = V1.model_copy(update={"peers": V1.peers | {"gamma": _peer("gamma", "10.0.0.3")}})
V3 = V2.model_copy(update={"peers": {"gamma": _peer("gamma", "10.0.0.3", online=True)}})
V4 = V3.model_copy(update={"vpns": {"office": _vpn(mtu=1300)}})
V5 = V4.model_copy(update={"peers": V4.peers | {"delta": _peer("delta", "10.0.0.9")}})


# ---------------------------------------------------------------------- the rig
@dataclass
class Rig:
    """One node's state dir, the broker, the scripted fanout, and the agents run against them."""

    bus: BusHarness
    state: StateDir
    fanout: ScriptedFanout
    signing: SigningKey
    node_key: str
    agents: list[tuple[Agent, threading.Thread]] = field(default_factory=list)
    crashes: list[BaseException] = field(default_factory=list)  # exceptions that ended an agent's run()

    def start_agent(self) -> Agent:
        agent = Agent(self.state, heartbeat=0.3, timeout=1.0)
        thread = threading.Thread(target=self._run, args=(agent,), name=f"agent-{len(self.agents)}", daemon=True)
        thread.start()
        self.agents.append((agent, thread))
        return agent

    def _run(self, agent: Agent) -> None:
        try:
            agent.run()
        except BaseException as exc:  # recorded, and reported when the agents are stopped
            self.crashes.append(exc)

    def stop_agents(self) -> None:
        """Stop and join every agent; an agent that crashed or would not stop fails the test."""
        for agent, _ in self.agents:
            agent.stop()
        for _, thread in self.agents:
            thread.join(timeout=10)
        alive = [t.name for _, t in self.agents if t.is_alive()]
        self.agents.clear()
        assert not alive, f"agent threads did not stop: {alive}"
        assert not self.crashes, f"an agent's run() raised: {self.crashes!r}"

    def stop_broker(self) -> None:
        """Take the server away: stop the broker thread and wait until its socket is closed."""
        broker = self.bus.broker
        assert broker is not None
        broker.stop()
        # The harness keeps (runner, thread) pairs; join the broker's so its port is really closed.
        for runner, thread in self.bus._threads:
            if runner is broker:
                thread.join(timeout=10)
                assert not thread.is_alive(), "the broker did not stop"

    def stored(self) -> StoredView | None:
        return self.state.load_view()

    def stored_revision(self) -> int:
        stored = self.stored()
        return stored.revision if stored is not None else -1

    def status(self) -> dict[str, Any]:
        return self.state.load_status()

    def synced(self, revision: int) -> bool:
        """The stored view is at *revision* (written at a snapshot, and within SAVE_INTERVAL of an update)."""
        return self.stored_revision() == revision


@pytest.fixture
def rig(bus: BusHarness, tmp_path: Path) -> Iterator[Rig]:
    state = StateDir(tmp_path / "agent")
    node_key = state.keypair().public_text
    bus.registry.add(Identity(Role.NODE, NODE, node_key))
    signing = SigningKey.generate()
    state.save_server(
        ServerInfo(
            endpoints=[bus.endpoint],
            server_key=bus.server.public_text,
            sign_key=signing.verify_key.encode().hex(),
            node=NODE,
        )
    )
    fanout = ScriptedFanout(
        bus.endpoint,
        bus.service_key("fanout"),
        bus.server.public,
        signing_key=signing,
        node_key=node_key,
        view=V1,
        revision=1,
    )
    bus._spawn(fanout)  # the harness stops and joins it with the broker
    assert bus.wait_workers("fanout", 1), "the scripted fanout did not register"
    rig = Rig(bus, state, fanout, signing, node_key)
    try:
        yield rig
    finally:
        rig.stop_agents()


def _started(rig: Rig) -> Agent:
    """An agent that has taken its first snapshot (revision 1, view V1)."""
    agent = rig.start_agent()
    assert wait_until(lambda: rig.synced(1), WAIT), f"no snapshot stored; status {rig.status()}"
    assert rig.fanout.count("snapshot") == 1
    return agent


# ---------------------------------------------------------------------- following the server
def test_agent_takes_a_snapshot_and_stores_it_sealed(rig: Rig) -> None:
    """The first thing a connected agent does is fetch its whole view and put it on disk, sealed."""
    _started(rig)
    stored = rig.stored()
    assert stored is not None
    assert stored.view == V1 and stored.digest == V1.digest()
    public = rig.signing.verify_key.encode().hex()
    assert verify_seal(public, rig.node_key, 1, stored.digest, stored.seal, time.time()) is None
    caller = rig.fanout.callers[0]
    assert (caller.role, caller.name, caller.key) == (Role.NODE, NODE, rig.node_key), "asked as itself"
    status = rig.status()
    assert (status.get("state"), status.get("node"), status.get("revision")) == ("connected", NODE, 1)
    # Heartbeats then report what it holds, and in-sync answers cause no further snapshots.
    assert wait_until(lambda: rig.fanout.count("heartbeat") >= 2, WAIT)
    last = rig.fanout.heartbeats[-1]
    assert (last.revision, last.digest) == (1, V1.digest())
    assert rig.fanout.count("snapshot") == 1


def test_in_order_update_is_applied_and_acknowledged(rig: Rig) -> None:
    """An update whose prev_revision is the held revision is applied, stored, and receipted with Applied."""
    _started(rig)
    rig.fanout.send(rig.fanout.make_update(V2, 2))
    assert wait_until(lambda: rig.fanout.applied_revisions() == [2], WAIT), rig.fanout.applied_revisions()
    assert rig.fanout.applied[0].digest == V2.digest()
    assert wait_until(lambda: rig.synced(2), WAIT), "the applied update never reached view.json"
    stored = rig.stored()
    assert stored is not None and stored.revision == 2 and stored.view == V2
    # Per-node streams skip revisions that do not concern the node: r7 after r2 is in order.
    rig.fanout.send(rig.fanout.make_update(V3, 7))
    assert wait_until(lambda: rig.fanout.applied_revisions() == [2, 7], WAIT), rig.fanout.applied_revisions()
    assert wait_until(lambda: rig.synced(7), WAIT)
    stored = rig.stored()
    assert stored is not None and stored.revision == 7 and stored.view == V3
    assert rig.fanout.count("snapshot") == 1, "applied from deltas, not from new snapshots"


def test_updates_applied_close_together_share_one_receipt(rig: Rig) -> None:
    """The receipt waits a moment (sync.receipt_delay): updates applied meanwhile are reported by it, once."""
    _started(rig)
    sent = time.monotonic()
    rig.fanout.send(rig.fanout.make_update(V2, 2))
    rig.fanout.send(rig.fanout.make_update(V3, 3))
    assert wait_until(lambda: rig.synced(3), WAIT)
    assert wait_until(lambda: rig.fanout.applied_revisions() == [3], WAIT), rig.fanout.applied_revisions()
    assert time.monotonic() - sent >= RECEIPT_DELAY, "the receipt did not wait"
    assert rig.fanout.applied[0].digest == V3.digest()
    time.sleep(2 * RECEIPT_DELAY)
    assert rig.fanout.applied_revisions() == [3], "one receipt for both updates"


def test_update_after_a_gap_makes_the_agent_take_a_snapshot(rig: Rig) -> None:
    """An update following a revision the agent never saw must not be applied: it resyncs instead."""
    _started(rig)
    rig.fanout.make_update(V2, 2)  # r2 is "lost": never sent
    rig.fanout.send(rig.fanout.make_update(V3, 3))  # prev_revision 2, but the agent holds 1
    assert wait_until(lambda: rig.synced(3), WAIT), f"status {rig.status()}"
    assert rig.fanout.count("snapshot") == 2
    stored = rig.stored()
    assert stored is not None and stored.view == V3 and stored.digest == V3.digest()
    assert rig.fanout.applied_revisions() == [], "a gapped update is never acknowledged as applied"


def test_update_with_a_wrong_digest_makes_the_agent_take_a_snapshot(rig: Rig) -> None:
    """A delta that does not give the announced digest means the views diverged: resync, do not keep it."""
    _started(rig)
    rig.fanout.send(rig.fanout.make_update(V2, 2, digest=V4.digest()))  # the fanout's truth is V2 at r2
    assert wait_until(lambda: rig.fanout.count("snapshot") == 2, WAIT), f"status {rig.status()}"
    assert wait_until(lambda: rig.synced(2), WAIT)
    stored = rig.stored()
    assert stored is not None and stored.view == V2 and stored.digest == V2.digest()
    assert rig.fanout.applied_revisions() == []


def test_duplicate_and_late_updates_are_ignored(rig: Rig) -> None:
    """Duplicates (outbox replays) and late copies change nothing and cause no snapshot.

    Each stale copy is followed by a fresh in-order update: pushes arrive in
    order, so once the fresh one is applied the copy before it has been seen.
    """
    _started(rig)
    first = rig.fanout.make_update(V2, 2)
    rig.fanout.send(first)
    assert wait_until(lambda: rig.synced(2), WAIT)
    rig.fanout.send(first)  # a duplicate
    rig.fanout.send(rig.fanout.make_update(V3, 3))
    assert wait_until(lambda: rig.fanout.applied_revisions() == [2, 3], WAIT), rig.fanout.applied_revisions()
    rig.fanout.send(first)  # a late copy, two revisions behind
    rig.fanout.send(rig.fanout.make_update(V4, 4))
    assert wait_until(lambda: rig.fanout.applied_revisions() == [2, 3, 4], WAIT), rig.fanout.applied_revisions()
    assert wait_until(lambda: rig.synced(4), WAIT)
    stored = rig.stored()
    assert stored is not None and stored.revision == 4 and stored.view == V4
    assert rig.fanout.count("snapshot") == 1, "a stale update must not trigger a resync"


def test_heartbeat_answered_out_of_sync_makes_the_agent_take_a_snapshot(rig: Rig) -> None:
    """A node that missed the tail of its stream hears it on its next heartbeat and resyncs."""
    _started(rig)
    heartbeats = rig.fanout.count("heartbeat")
    assert wait_until(lambda: rig.fanout.count("heartbeat") >= heartbeats + 2, WAIT)
    assert rig.fanout.count("snapshot") == 1, "in-sync heartbeats cause no snapshot (control)"
    rig.fanout.set_view(V5, 9)  # the update to r9 never reaches the node
    rig.fanout.mark_stale()
    assert wait_until(lambda: rig.synced(9), WAIT), f"status {rig.status()}"
    assert rig.fanout.count("snapshot") == 2
    stored = rig.stored()
    assert stored is not None and stored.view == V5


def test_a_restarted_agent_with_a_current_view_resumes_without_a_snapshot(rig: Rig) -> None:
    """Heartbeat first: a server that says the stored view is current costs no snapshot (10,000 of them after
    a server restart were most of the time to resynchronise); a stale one still gets one."""
    _started(rig)
    rig.stop_agents()
    again = rig.start_agent()
    assert wait_until(lambda: again.counters.get("resumed", 0) == 1, WAIT), dict(again.counters)
    assert wait_until(lambda: rig.status().get("state") == "connected", WAIT), rig.status()
    assert rig.fanout.count("snapshot") == 1 and again.counters.get("snapshots", 0) == 0
    rig.stop_agents()
    rig.fanout.set_view(V5, 9)
    rig.fanout.mark_stale()
    third = rig.start_agent()
    assert wait_until(lambda: rig.synced(9), WAIT), f"status {rig.status()}"
    assert rig.fanout.count("snapshot") == 2 and third.counters.get("resumed", 0) == 0


def test_a_busy_answer_to_a_heartbeat_is_a_missed_beat_not_a_reconnect(rig: Rig) -> None:
    agent = _started(rig)
    beats = rig.fanout.count("heartbeat")
    rig.fanout.unavailable_beats = 2  # fewer than MISSED_HEARTBEATS in a row
    assert wait_until(lambda: rig.fanout.count("heartbeat") >= beats + 4, WAIT)
    assert rig.fanout.unavailable_beats == 0, "both busy answers were given"
    assert agent.counters.get("resumed", 0) == 0 and rig.fanout.count("snapshot") == 1, "no reconnect, no resync"
    assert rig.status().get("state") == "connected"


def test_the_agent_beats_no_faster_than_the_fanout_asks(rig: Rig) -> None:
    """A fanout with thousands of nodes asks for a longer interval (SyncStatus.heartbeat) to bound its load."""
    _started(rig)  # beats every 0.3 s of its own
    rig.fanout.asked = 1.5
    first = rig.fanout.count("heartbeat")  # the next answer carries the longer interval
    assert wait_until(lambda: rig.fanout.count("heartbeat") >= first + 4, WAIT)
    with rig.fanout._lock:
        times = rig.fanout.beat_times[first:]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1.4, f"beat faster than asked: gaps {gaps}"
    rig.fanout.asked = 0.0  # back to its own interval
    now = rig.fanout.count("heartbeat")
    # 8 beats take at least 10.5 s at the asked interval, about 3.6 s at its own
    assert wait_until(lambda: rig.fanout.count("heartbeat") >= now + 8, 10.0), "did not return to its own interval"


# ---------------------------------------------------------------------- without the server
def test_agent_keeps_its_view_offline_and_a_new_agent_resumes_from_it(rig: Rig) -> None:
    """Losing the server must never take the node's VPNs down, not even across an agent restart."""
    first = _started(rig)
    rig.fanout.send(rig.fanout.make_update(V2, 2))
    assert wait_until(lambda: rig.fanout.applied_revisions() == [2], WAIT)
    rig.stop_broker()
    assert wait_until(lambda: rig.status().get("state") == "offline", WAIT), rig.status()
    assert rig.status().get("revision") == 2
    stored = rig.stored()
    assert stored is not None and stored.revision == 2 and stored.view == V2, "the last view is kept"
    assert first.replica.revision == 2 and first.replica.view == V2
    assert all(thread.is_alive() for _, thread in rig.agents), "the agent keeps retrying"
    rig.stop_agents()

    second = Agent(rig.state, heartbeat=0.3, timeout=1.0)
    assert second.resume() is True
    assert second.replica.revision == 2 and second.replica.view == V2 and second.replica.digest == V2.digest()
    since = time.time()
    running = rig.start_agent()

    def offline_again() -> bool:
        status = rig.status()
        return status.get("state") == "offline" and status.get("at", 0) >= since

    assert wait_until(offline_again, WAIT), rig.status()
    assert running.replica.revision == 2 and running.replica.view == V2, "running from the stored view"
    after = rig.stored()
    assert after is not None and (after.revision, after.digest) == (2, V2.digest())


def _tamper_address(doc: dict[str, Any]) -> None:
    doc["view"]["peers"]["beta"]["vips"]["office"] = "10.0.0.66"


def _tamper_address_and_digest(doc: dict[str, Any]) -> None:
    _tamper_address(doc)
    doc["digest"] = NodeView.model_validate(doc["view"]).digest()  # consistent, but not what the server sealed


def _tamper_revision(doc: dict[str, Any]) -> None:
    doc["revision"] = doc["revision"] + 100


@pytest.mark.parametrize(
    "tamper",
    [_tamper_address, _tamper_address_and_digest, _tamper_revision],
    ids=["peer address", "peer address and digest", "revision"],
)
def test_a_tampered_stored_view_is_refused(rig: Rig, tamper: Any) -> None:
    """An edited view.json would redirect traffic to an attacker's address: the agent must not trust it."""
    _started(rig)
    rig.stop_agents()
    path = rig.state.path / "view.json"
    doc = json.loads(path.read_text())
    tamper(doc)
    path.write_text(json.dumps(doc))
    agent = Agent(rig.state, heartbeat=0.3, timeout=1.0)
    assert agent.resume() is False
    assert agent.replica.view is None and agent.replica.revision == 0
    status = rig.status()
    assert status.get("state") == "stored view refused", status
    assert "altered" in str(status.get("problem")), status


def test_an_untampered_stored_view_is_accepted(rig: Rig) -> None:
    """Control for the refusals above: the same file, untouched, is trusted."""
    _started(rig)
    rig.stop_agents()
    path = rig.state.path / "view.json"
    path.write_text(json.dumps(json.loads(path.read_text())))  # rewritten, same content
    agent = Agent(rig.state, heartbeat=0.3, timeout=1.0)
    assert agent.resume() is True
    assert agent.replica.view == V1 and agent.replica.revision == 1


def test_a_damaged_stored_view_is_refused_and_the_agent_still_syncs(rig: Rig) -> None:
    """A view.json that no longer parses must be treated like an altered one: refused, then replaced by a snapshot."""
    _started(rig)
    rig.stop_agents()
    path = rig.state.path / "view.json"
    path.write_text(path.read_text()[:40])  # cut short, as by a full disk or a careless edit
    agent = Agent(rig.state, heartbeat=0.3, timeout=1.0)
    assert agent.resume() is False
    assert agent.replica.view is None
    rig.start_agent()
    assert wait_until(lambda: rig.fanout.count("snapshot") == 2, WAIT), f"status {rig.status()}, {rig.crashes!r}"
    assert wait_until(lambda: rig.synced(1), WAIT)
    assert all(thread.is_alive() for _, thread in rig.agents), "the agent keeps running"


def test_a_stored_view_with_an_expired_seal_is_refused(rig: Rig) -> None:
    """A view kept past its seal's expiry may be long out of date: the agent waits for the server instead."""
    rig.fanout.ttl = -60.0  # the server's seals are already expired
    _started(rig)
    rig.stop_agents()
    agent = Agent(rig.state, heartbeat=0.3, timeout=1.0)
    assert agent.resume() is False
    assert agent.replica.view is None
    status = rig.status()
    assert status.get("state") == "stored view refused", status
    assert "expired" in str(status.get("problem")), status
