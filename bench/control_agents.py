"""Simulated node agents for bench/control.py: many per process, one event loop, real CURVE connections.

Each simulated agent does what nodeagent/agent.py does on the control plane,
with the same messages and the real replica (nodeagent.sync.Replica):

  1. connect (its own CURVE key, its own DEALER through bus.client.Client);
  2. ask the fanout for a snapshot (at most MAX_SNAPSHOTS_IN_FLIGHT per
     process at a time, as a crowd of real agents starting would spread);
  3. apply pushed updates in order, send the Applied receipt a moment later
     (nodeagent.sync.receipt_delay), and take a new snapshot on a gap or a
     digest mismatch;
  4. heartbeat at the real interval (nodeagent.agent.HEARTBEAT_INTERVAL), take a
     snapshot when the fanout says "not in sync", and reconnect after
     MISSED_HEARTBEATS unanswered heartbeats, after the client's backoff
     (bus.client.Backoff, as the real agent).

What is not simulated: the data plane, key distribution, files. One process
runs all its agents from one poll loop (bus.client.ClientPoller), so what the
benchmark measures is the server, not thousands of interpreters.

The controller talks to a worker process over a multiprocessing pipe; every
command gets one reply (see :func:`_command`).
"""

from __future__ import annotations

import heapq
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from bus.client import Client, ClientPoller, Incoming, shared_context
from bus.heap import freeze_long_lived
from bus.keys import KeyPair
from bus.messages.sync import Applied, Snapshot, SnapshotRequest, SyncHeartbeat, SyncStatus, Update
from nodeagent.agent import HEARTBEAT_INTERVAL, MISSED_HEARTBEATS
from nodeagent.sync import Outcome, Replica, receipt_delay

MAX_SNAPSHOTS_IN_FLIGHT = 64
SNAPSHOT_TIMEOUT = 10.0  # seconds before an unanswered snapshot request is sent again
BEAT_TIMEOUT = 3.0  # seconds a heartbeat waits for its answer, as the real agent's requests (Agent(timeout=3.0))
HISTORY = 32  # view changes remembered per agent (revision, time)


@dataclass
class AgentSpec:
    name: str
    public: bytes
    secret: bytes


@dataclass
class SimAgent:
    """One agent's control-plane state."""

    name: str
    client: Client
    replica: Replica = field(default_factory=Replica)
    history: list[tuple[int, float]] = field(default_factory=list)  # (revision, monotonic time) per view change
    pushes: int = 0
    snapshot_id: bytes | None = None
    snapshot_sent: float = 0.0
    wants_snapshot: bool = True
    beat_id: bytes | None = None
    missed: int = 0
    last_snapshot: float = 0.0
    last_status: float = 0.0
    last_in_sync: float = 0.0  # when the fanout last said this agent's view is current
    asked: float = 0.0  # the heartbeat interval the fanout asked for (SyncStatus.heartbeat)
    index: int = 0  # in AgentPool.agents
    due: float = 0.0  # when its heartbeat entry in AgentPool.beats is due (older entries are stale)
    beat_sent: float = 0.0
    receipt_due: float = 0.0  # when its receipt in AgentPool.receipts goes (0: none waiting)

    def moved(self, revision: int, now: float) -> None:
        self.history.append((revision, now))
        if len(self.history) > HISTORY:
            del self.history[0]

    def reached(self, revision: int) -> float | None:
        """When this agent first held a view at *revision* or later (None: not yet, or forgotten)."""
        return next((t for r, t in self.history if r >= revision), None)


class AgentPool:
    """All the agents of one process and their loop."""

    def __init__(self, endpoint: str, server_key: bytes, specs: list[AgentSpec], heartbeat: float) -> None:
        # Twice the agents: a socket closed at a reconnect counts until libzmq's reaper has freed it.
        self.context = shared_context(io_threads=1, max_sockets=2 * len(specs) + 256)
        self.heartbeat = heartbeat
        self.poller = ClientPoller()
        self.agents: list[SimAgent] = []
        self.by_client: dict[int, SimAgent] = {}
        self.counters: Counter[str] = Counter()
        self.beats: list[tuple[float, int]] = []  # heap of (when, agent index)
        self.receipts: list[tuple[float, int]] = []  # heap of (when, agent index): receipts waiting
        # revision -> how many agents hold it: the controller asks how many reached a revision every 10 ms while
        # it waits, and counting thousands of agents each time took CPU from the agents it was waiting for
        self.held: Counter[int] = Counter()
        # indexes of the agents that want a snapshot or wait for one, in the order they came to (an ordered set)
        self.snapshot_work: dict[int, None] = {}
        self._next_snapshots = 0.0
        now = time.monotonic()
        for index, spec in enumerate(specs):
            keypair = KeyPair(spec.public, spec.secret)
            client = Client(endpoint, keypair, server_key, context=self.context)
            agent = SimAgent(spec.name, client, index=index)
            self.agents.append(agent)
            self.snapshot_work[index] = None  # every agent starts by wanting one
            self._watch(agent)
            self._schedule(agent, now + random.uniform(0, heartbeat))  # staggered, as in real life

    def _watch(self, agent: SimAgent) -> None:
        self.poller.add(agent.client)
        self.by_client[id(agent.client)] = agent

    # ------------------------------------------------------------------ the loop
    def step(self, timeout: float) -> list[int]:
        """One round: read what arrived, send what is due; returns descriptors that were ready."""
        clients, fds = self.poller.poll(timeout)
        now = time.monotonic()
        for client in clients:
            agent = self.by_client[id(client)]
            for incoming in client.incoming():
                self._on_incoming(agent, incoming, now)
        self._heartbeats(now)
        self._receipts(now)
        if now >= self._next_snapshots:
            self._next_snapshots = now + 0.05
            self._snapshots(now)
        return fds

    def _on_incoming(self, agent: SimAgent, incoming: Incoming, now: float) -> None:
        message = incoming.message
        if incoming.error is not None:
            self.counters[f"error_{incoming.error.code}"] += 1
            if incoming.request_id == agent.snapshot_id:
                agent.snapshot_id = None
                self._want_snapshot(agent)
            return
        if isinstance(message, Update):
            agent.pushes += 1
            self._on_update(agent, message, now)
        elif isinstance(message, Snapshot) and incoming.request_id == agent.snapshot_id:
            agent.snapshot_id = None
            if agent.replica.load(message):
                self._moved(agent, message.revision, now)
                agent.last_snapshot = now
                self.counters["snapshots"] += 1
            else:
                self._want_snapshot(agent)
                self.counters["bad_snapshots"] += 1
        elif isinstance(message, SyncStatus) and incoming.request_id == agent.beat_id:
            agent.beat_id, agent.missed, agent.last_status = None, 0, now
            agent.asked = message.heartbeat
            self._schedule(agent, now + max(self.heartbeat, agent.asked))  # as the real agent
            if message.in_sync:
                agent.last_in_sync = now
            elif agent.snapshot_id is None:
                self._want_snapshot(agent)
                self.counters["told_to_resync"] += 1

    def _on_update(self, agent: SimAgent, update: Update, now: float) -> None:
        outcome = agent.replica.apply(update)
        self.counters[outcome.value] += 1
        if outcome is Outcome.APPLIED:
            self._moved(agent, update.revision, now)
            if not agent.receipt_due:  # the receipt, a moment later, as the real agent's (sync.receipt_delay)
                agent.receipt_due = now + receipt_delay(agent.asked)
                heapq.heappush(self.receipts, (agent.receipt_due, agent.index))
        elif outcome in (Outcome.GAP, Outcome.MISMATCH) and agent.snapshot_id is None:
            self._want_snapshot(agent)

    def _want_snapshot(self, agent: SimAgent) -> None:
        """The agent needs a new snapshot: flagged, and noted for ``_snapshots``."""
        agent.wants_snapshot = True
        self.snapshot_work[agent.index] = None

    def _moved(self, agent: SimAgent, revision: int, now: float) -> None:
        """The agent's view changed to *revision* (a snapshot or an applied update)."""
        if agent.history:
            before = agent.history[-1][0]
            self.held[before] -= 1
            if not self.held[before]:
                del self.held[before]
        self.held[revision] += 1
        agent.moved(revision, now)

    def count_reached(self, revision: int) -> int:
        """How many agents hold *revision* or a later one (from the tally, not by asking each agent)."""
        return sum(count for held, count in self.held.items() if held >= revision)

    def _schedule(self, agent: SimAgent, due: float) -> None:
        agent.due = due
        heapq.heappush(self.beats, (due, agent.index))

    def _heartbeats(self, now: float) -> None:
        """As the real agent: the next beat an interval after the answer (its own or the longer one the fanout
        asked for); a beat unanswered within BEAT_TIMEOUT is missed: after a first miss the next follows at
        the agent's own interval, after more at the asked one (beating fast at a busy server overloads it)."""
        while self.beats and self.beats[0][0] <= now:
            due, index = heapq.heappop(self.beats)
            agent = self.agents[index]
            if due != agent.due:
                continue  # superseded: the answer scheduled the next beat
            if agent.replica.view is None:
                self._schedule(agent, now + self.heartbeat)
                continue  # as the real agent: no heartbeat before the first snapshot (it only adds to the storm)
            if agent.beat_id is not None:  # unanswered (one not sent, the connection not up yet, is not counted:
                agent.missed += 1  # a new socket would start its handshake over, at the back of a storm)
                agent.beat_id = None  # a late answer is not waited for, as the real agent's request
                if agent.missed >= MISSED_HEARTBEATS:
                    self._reconnect(agent)
                elif now - agent.beat_sent < (interval := max(self.heartbeat, agent.asked if agent.missed > 1 else 0)):
                    self._schedule(agent, agent.beat_sent + interval)
                    continue  # the next one an interval after the missed one, as the real agent's
            beat = SyncHeartbeat(revision=agent.replica.revision, digest=agent.replica.digest, agent_version="bench")
            agent.beat_id, agent.beat_sent = agent.client.start("fanout", beat), now
            self._schedule(agent, now + BEAT_TIMEOUT)
            self.counters["heartbeats"] += 1

    def _receipts(self, now: float) -> None:
        """The receipts that are due: each reports what its agent holds now (updates since share it)."""
        while self.receipts and self.receipts[0][0] <= now:
            _, index = heapq.heappop(self.receipts)
            agent = self.agents[index]
            agent.receipt_due = 0.0
            agent.client.notify("fanout", Applied(revision=agent.replica.revision, digest=agent.replica.digest))

    def _reconnect(self, agent: SimAgent) -> None:
        self.poller.remove(agent.client)
        del self.by_client[id(agent.client)]
        agent.client.reconnect()
        self._watch(agent)
        agent.missed, agent.beat_id = 0, None
        if agent.snapshot_id is not None:
            agent.snapshot_id = None
            self._want_snapshot(agent)
        self.counters["reconnects"] += 1

    def _snapshots(self, now: float) -> None:
        """Ask for the snapshots wanted, at most MAX_SNAPSHOTS_IN_FLIGHT at a time; give up on late ones.

        Only the agents in ``snapshot_work`` are looked at: scanning all 2,500 of a process every 50 ms
        took a twelfth of its time while changes spread, when no agent wants one.
        """
        in_flight = 0
        for index in list(self.snapshot_work):
            agent = self.agents[index]
            if agent.snapshot_id is not None and now - agent.snapshot_sent > SNAPSHOT_TIMEOUT:
                agent.snapshot_id = None
                self._want_snapshot(agent)
                self.counters["snapshot_timeouts"] += 1
            if agent.snapshot_id is not None:
                in_flight += 1
            elif not agent.wants_snapshot:
                del self.snapshot_work[index]  # answered: nothing more to do for it
        for index in list(self.snapshot_work):
            if in_flight >= MAX_SNAPSHOTS_IN_FLIGHT:
                return
            agent = self.agents[index]
            if agent.wants_snapshot and agent.snapshot_id is None:
                agent.snapshot_id = agent.client.start("fanout", SnapshotRequest())
                if agent.snapshot_id is not None:
                    agent.wants_snapshot, agent.snapshot_sent = False, now
                    in_flight += 1

    def close(self) -> None:
        self.poller.close()
        for agent in self.agents:
            agent.client.close()
        self.context.term()

    # ------------------------------------------------------------------ what the controller asks
    def state(self) -> dict[str, object]:
        views = [a for a in self.agents if a.replica.view is not None]
        return {
            "agents": len(self.agents),
            "synced": len(views),
            "min_revision": min((a.replica.revision for a in views), default=0),
            "counters": dict(self.counters),
        }


def _command(pool: AgentPool, request: tuple) -> object:  # type: ignore[type-arg]
    """Answer one controller command (the protocol between bench/control.py and its workers)."""
    verb, *args = request
    if verb == "state":
        return pool.state()
    if verb == "reached":  # per agent: when it first held revision >= args[0]
        return [a.reached(args[0]) for a in pool.agents]
    if verb == "count_reached":  # how many agents hold revision >= args[0]
        return pool.count_reached(args[0])
    if verb == "receipts_waiting":  # agents whose receipt is not sent yet
        return len(pool.receipts)
    if verb == "pushes":  # per agent: updates received so far
        return [a.pushes for a in pool.agents]
    if verb == "digests":  # per agent: (name, digest held, time of its last view change)
        return [(a.name, a.replica.digest, a.history[-1][1] if a.history else None) for a in pool.agents]
    if verb == "resynced":  # agents the fanout has said are current (resumed or from a new snapshot) since args[0]
        since = args[0]
        return sum(1 for a in pool.agents if a.last_in_sync >= since)
    if verb == "snapshots_since":  # agents that took a snapshot after monotonic time args[0]
        return sum(1 for a in pool.agents if a.last_snapshot >= args[0])
    raise ValueError(f"unknown command {verb!r}")


def worker_main(conn: Connection, endpoint: str, server_key: bytes, specs: list[AgentSpec], heartbeat: float) -> None:
    """Entry point of a worker process: run the agents until the controller says stop."""
    _raise_fd_limit()
    pool = AgentPool(endpoint, server_key, specs, heartbeat or HEARTBEAT_INTERVAL)
    freeze_long_lived()  # as the real agent does (nodeagent/cli.py)
    conn.send("ready")
    try:
        while True:
            pool.step(0.02)
            while conn.poll(0):
                request = conn.recv()
                if request == ("stop",):
                    conn.send("stopped")
                    return
                conn.send(_command(pool, request))
    finally:
        pool.close()


def _raise_fd_limit() -> None:
    """Each agent holds a TCP connection and a ZeroMQ mailbox: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
