"""Event fan-out: turns the change log into per-node deltas of each node's view.

Pipeline, in order, every TICK:
  1. read the change-log rows after the last revision processed, in one
     read transaction (a consistent snapshot of the datastore);
  2. for each node with a live stream that any of them may affect, compute
     its view and compare it with the view last sent;
  3. push each node whose view changed exactly the delta, carrying the
     previous revision of that node's own stream and the server's seal;
  4. record a receipt row per change and node, completed when the node
     acknowledges (by heartbeat or Applied); written by a thread of their
     own (services/fanout/receipts.py), so large batches of them never hold
     the next batch back.

A stream starts when a node asks for a snapshot, and is checked on every
heartbeat: a node whose digest disagrees with its stream (it missed the
tail) is told to take a new snapshot. A node whose stream this fanout does
not hold (it restarted, or the node reconnected) resumes from the revision
it reports when its digest is the view it should have: no snapshot needed.
Nodes that stop heartbeating are marked offline, which is itself a change,
so their co-members hear of it.

Heartbeats and Applied receipts are answered by a second connection in a
thread (services/fanout/beats.py), so they never wait behind a snapshot or
a batch; the state they share with the main loop (streams, presence,
receipts) is guarded by one lock, held only for short updates.

Operators may watch too: a WatchRequest leases a push of every batch of
changes (as one ChangeNotice) to the operator's key, so a dashboard updates
live without polling; a lease not renewed lapses and costs nothing more.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from nacl.signing import SigningKey
from sqlalchemy import bindparam, text, update
from sqlmodel import col, select

from bus import errors
from bus.constants import PUSH_BATCH
from bus.errors import RemoteError
from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.messages import construct
from bus.messages.events import ChangeEvent, ChangeNotice, WatchLease, WatchRequest
from bus.messages.sync import (
    Applied,
    Committed,
    CommittedSeen,
    NodeView,
    Snapshot,
    SnapshotRequest,
    SyncHeartbeat,
    SyncStatus,
    Update,
    ViewDelta,
)
from bus.signing import seal, seal_many
from bus.worker import Handler, Worker
from services.datastore import repo
from services.datastore.db import HeadProbe, make_engine, migrate, reading, transaction
from services.datastore.models import Change, Node, utcnow
from services.datastore.netmap import World
from services.datastore.paths import classify
from services.fanout.beats import BeatWorker
from services.fanout.receipts import ReceiptWriter
from services.fanout.reflector import Reflector

log = logging.getLogger(__name__)

# Seconds an agent may lag behind its stream's newest push before it is told to resync: long
# enough that a busy agent is never pushed into snapshot storms, short enough that a lost tail
# (an outbox that overflowed) is found in seconds.
IN_FLIGHT_GRACE = 10.0
# One receipt by its primary key (revision, node_id). "node_id = ? AND revision <= ?" cannot use that key: each
# such update scanned the whole delivery table, and 1,000 of them after a change to all held SQLite's write lock
# for over 10 s (the datastore's commits failed "database is locked", the broker dropped both workers).
APPLY_RECEIPTS = text(
    "UPDATE delivery SET applied_at = :now WHERE revision = :revision AND node_id = :node AND applied_at IS NULL"
)
TOUCH_LAST_SEEN = (
    update(Node.__table__)  # type: ignore[attr-defined]
    .where(Node.__table__.c.id == bindparam("node"))  # type: ignore[attr-defined]
    .values(last_seen=bindparam("now"))
)
PENDING_RECEIPTS = 256  # unacknowledged receipts remembered per stream; older ones stay unapplied
BATCH_INTERVAL = 0.02  # seconds: how often the head revision is polled (the tick); a change waits 10 ms on average
_Pending = tuple[int, "Stream", NodeView, str, list[int]]  # node id, stream, new view, its digest, revisions
RESUME_WAIT = 5.0  # seconds after the start during which heartbeats wait for the first world (see _resume)
RESUME_ATTEMPTS = 3  # worlds a resume checks against when batches keep replacing the world meanwhile
BATCH_SPACING_MAX = 1.0  # seconds: the longest pause after a long batch (see tick)
ACK_FLUSH = 0.25  # seconds between writes of acknowledged receipts (one transaction for all nodes)
BEATS_BACKLOG = 1.0  # seconds the heartbeat thread may go without running dry before presence waits longer
LAST_SEEN_WRITE = 30.0  # seconds between writes of a node's last_seen while nothing else changes
# How often nodes heartbeat. At 10,000 nodes beating every 2 s (5,000 a second, each through the broker twice
# and through the heartbeat thread) the heartbeats alone took most of two cores; those that waited too long
# expired, and live nodes were marked offline by the hundred. So the fanout asks for a longer interval
# (SyncStatus.heartbeat) once all its nodes together would beat more often than [sync] heartbeat_budget a
# second (1,000), up to SLOWEST_HEARTBEAT, and allows BEATS_MISSED such intervals before a node is offline.
SLOWEST_HEARTBEAT = 10.0
OWN_HEARTBEAT = 2.0  # the agents' own interval (nodeagent/agent.py): below it, nothing is asked
BEATS_MISSED = 3  # advertised intervals without a heartbeat before a node is offline (at least presence_timeout)
ADVERTISE_HOLD = 60.0  # seconds a longer interval stays advertised before a shorter one replaces it


@dataclass
class Stream:
    node_id: int
    key: str
    revision: int
    view: NodeView
    digest: str
    pushed_at: float = 0.0
    acked: int = 0


class FanoutService(Worker):
    service = "fanout"
    allow = (Role.NODE, Role.OPERATOR, Role.SERVICE)
    tick_interval = 0.02

    def __init__(
        self,
        endpoint: str,
        keypair: KeyPair,
        server_key: bytes,
        *,
        database_url: str,
        signing_key: SigningKey,
        presence_timeout: float,
        heartbeat_budget: float = 1000.0,
        reflector: tuple[str, int] | None = None,
        reflector_advertise: str = "",
        relay_advertise: str = "",
    ) -> None:
        super().__init__(endpoint, keypair, server_key)
        self.reflector: Reflector | None = None
        self.reflector_address = ""
        self.relay_address = relay_advertise  # "host:port" nodes dial for the relay; "" when there is none
        if reflector is not None:
            try:
                self.reflector = Reflector(*reflector).start()
                self.reflector_address = f"{reflector_advertise or reflector[0]}:{self.reflector.port}"
            except OSError as exc:  # NAT discovery is lost, not the fanout: nodes get class "unknown"
                log.error("no UDP reflector on %s:%d: %s", reflector[0], reflector[1], exc.strerror)
        self.engine = make_engine(database_url)
        migrate(self.engine)
        self.head_probe = HeadProbe(self.engine)  # the main thread's 50-a-second "anything new?" (catch_up)
        self.signing_key = signing_key
        self.presence_timeout = presence_timeout
        self.heartbeat_budget = heartbeat_budget
        self.streams: dict[int, Stream] = {}
        self.by_key: dict[str, int] = {}  # CURVE key -> node id, for the streams
        self.last_seen: dict[int, float] = {}
        self._written: dict[int, float] = {}  # node id -> when last_seen was last written
        self._reported: dict[int, tuple[tuple[str, ...], str, str, str]] = {}  # node id -> what it last reported
        self._unwritten: dict[int, SyncHeartbeat | None] = {}  # signs of life not yet written (flush_presence)
        self._touched: set[int] = set()  # online nodes whose only news is that they still are (last_seen)
        self.processed = -1  # revision up to which changes have been fanned out
        self.world: World | None = None  # the datastore as of self.processed
        self._next_presence = 0.0
        self._next_batch = 0.0  # no batch before this (spacing after the last one)
        self._next_poll = 0.0  # no poll of the head revision before this, unless the datastore said it committed
        self._word_waiting = False  # the datastore said so while a batch was not due yet
        self._acks: list[tuple[int, int]] = []  # (node id, revision) receipts acknowledged, not yet written
        # node id -> revisions with a receipt row the node has not acknowledged (kept across its streams: a node
        # that went offline and came back acknowledges them with its first heartbeat)
        self.unacked: dict[int, list[int]] = {}
        self._next_ack_flush = 0.0
        self.watchers: dict[str, float] = {}  # operator CURVE key -> monotonic time its lease ends
        self.world_head = -1  # the revision self.world was read at
        self.advertised = 0.0  # the heartbeat interval the nodes are asked for (0: their own)
        self._advertised_at = 0.0
        # Guards what the heartbeat thread shares with this one: streams, by_key, presence and receipt queues,
        # and the swap of self.world. Held for short updates only, never across a batch or a database write.
        self._lock = threading.Lock()
        self._world_ready = threading.Event()  # set once the main thread has read the datastore the first time
        self._resume_deadline = 0.0  # until when, after the start, heartbeats wait for that first read
        self._main_thread: threading.Thread | None = None  # the one that reads the datastore (run)
        self.beats = BeatWorker(self, endpoint, keypair, server_key)
        self.receipts = ReceiptWriter(self.engine, APPLY_RECEIPTS)

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        self._main_thread = threading.current_thread()
        self._resume_deadline = time.monotonic() + RESUME_WAIT
        self.beats.start()
        self.receipts.start()
        try:
            self._first_world()
            super().run()
        finally:
            self.beats.stop()
            self.beats.join(timeout=5)
            self.receipts.stop()
            self.head_probe.close()

    def _first_world(self) -> None:
        """Read the datastore before this thread serves: a heartbeat it answered first would find no world.

        (The broker sends heartbeats here while the beats thread has not registered yet.) A failure is
        logged and left to the ticks, which try again.
        """
        try:
            self.catch_up()
        except Exception:
            log.exception("fanout: first read of the datastore failed; the ticks will try again")

    def stop(self) -> None:
        self.beats.stop()
        super().stop()

    def on_health(self, request, caller):  # type: ignore[no-untyped-def]
        health = super().on_health(request, caller)
        beats = {f"beats_{k}": v for k, v in self.beats.counters.items()}
        receipts = dict(self.receipts.counters) | {"receipts_backlog": self.receipts.backlog()}
        return health.model_copy(update={"counters": health.counters | beats | receipts})

    def handlers(self) -> dict[type, Handler]:
        return {
            **super().handlers(),
            SnapshotRequest: self.on_snapshot,
            SyncHeartbeat: self.on_heartbeat,
            Applied: self.on_applied,
            WatchRequest: self.on_watch,
            Committed: self.on_committed,
        }

    # ------------------------------------------------------------------ periodic work
    def tick(self, now: float) -> None:
        self._batch_if_due(now)
        if (self._acks or self._unwritten or self._touched) and now >= self._next_ack_flush:
            self._next_ack_flush = now + ACK_FLUSH
            if self._unwritten or self._touched:
                self.flush_presence()
            if self._acks:
                self.flush_receipts()
        if now >= self._next_presence:
            self._next_presence = now + min(1.0, self.presence_timeout / 4)
            self.check_presence(now)

    def _batch_if_due(self, now: float, *, word: bool = False) -> None:
        """Fan out what was committed: at most one poll per BATCH_INTERVAL, which the datastore's *word* skips,
        and never before ``_next_batch``, which holds even for a word (it is then kept for when it is due)."""
        waiting = word or self._word_waiting
        if now < self._next_batch or (now < self._next_poll and not waiting):
            self._word_waiting = waiting
            return
        self._word_waiting = False
        self._next_poll = now + BATCH_INTERVAL
        if not self.catch_up():
            return  # nothing new: a poll, not a batch, so the next word need not wait
        # One batch per BATCH_INTERVAL at most: under a burst, changes coalesce into one update per node.
        # And at least as long between batches as the last one took: at 10,000 nodes loading the world
        # takes a second, and back-to-back batches (presence changes while thousands connect) left no time
        # for the snapshots they were waiting on. At most BATCH_SPACING_MAX, though: after a 7 s batch (a change
        # to all of 10,000 nodes) a change to one node had waited 7 s more.
        done = time.monotonic()
        self._next_batch = done + max(BATCH_INTERVAL, min(done - now, BATCH_SPACING_MAX))

    def next_tick_in(self) -> float:
        """A word kept for a batch not yet due wants the tick when it is due, not up to a tick_interval later
        (every message this worker reads starts its wait over)."""
        if self._word_waiting:
            return max(0.0, min(self.tick_interval, self._next_batch - time.monotonic()))
        return self.tick_interval

    def on_committed(self, request: Committed, caller: Identity) -> CommittedSeen:
        """The datastore's word that it committed: the batch now rather than at the next poll (10 ms sooner on
        average). The spacing between batches holds: a word too soon after one is kept until it is due."""
        if caller.role is not Role.SERVICE:
            raise RemoteError(errors.FORBIDDEN, "only a server process may report commits")
        if request.revision > self.processed:
            self.counters["committed_words"] += 1
            self._batch_if_due(time.monotonic(), word=True)
        return CommittedSeen(processed=self.processed)

    def catch_up(self) -> bool:
        """Fan out every change committed since the last call (steps 1-4); False if there was none."""
        started = time.monotonic()
        if self.world is not None and (probed := self.head_probe()) is not None and probed <= self.processed:
            return False  # nothing committed since: no session (most ticks of an idle server)
        with reading(self.engine) as session:
            head = repo.head_revision(session)
            if self.world is not None and head <= self.processed:
                return False
            changes = []
            if self.processed >= 0:
                changes = list(session.exec(select(Change).where(Change.revision > self.processed)).all())
            if self.world is not None and self.world_head == self.processed >= 0:
                world = self.world.advance(session, changes)  # presence, endpoints, routes: only what changed
            else:
                world = World.load(session)
            loaded = time.monotonic()
            with self._lock:  # a stream the heartbeat thread resumes is either seen below or built on this world
                self.world, self.world_head = world, head
            self._world_ready.set()
            if self.processed < 0:  # first run: streams start from snapshots, not from history
                self.processed = head
                self._adopt_online_nodes(session)
                return True
            self.counters["batches"] += 1
            updates = self.counters["updates"]
            receipts = self._push_changes(self.world, changes, head)
            self._notify_watchers(changes, head)
        # Gauges of the last batch (bench/control.py reads them): where a change's time goes in the fanout.
        self.counters["last_batch_load_ms"] = round((loaded - started) * 1000)
        self.counters["last_batch_ms"] = round((time.monotonic() - started) * 1000)
        self.counters["last_batch_updates"] = self.counters["updates"] - updates
        self.processed = head
        self.receipts.pushed(receipts)
        self.counters["changes"] += len(changes)
        return True

    def _push_changes(self, world: World, changes: list[Change], head: int) -> list[dict[str, object]]:
        # A scan of every stream, so only when a node may have gone: 10,000 streams every 20 ms added up.
        for stream in [] if world.same_nodes else list(self.streams.values()):
            node = world.nodes.get(stream.node_id)
            if node is None or node.curve_key != stream.key:
                self._drop_stream(stream.node_id)  # removed or re-keyed: revoked, nothing more to send
                self.unacked.pop(stream.node_id, None)
        touched: dict[int, list[int]] = defaultdict(list)  # node id -> revisions that may concern it
        for change in changes:
            for node_id in world.affected(change) | set(change.node_ids):
                if node_id in self.streams:
                    touched[node_id].append(change.revision)
        receipts: list[dict[str, object]] = []
        chunk: list[_Pending] = []  # sealed and sent PUSH_BATCH at a time
        for node_id, revisions in touched.items():
            self.keepalive()  # a batch for thousands of nodes takes seconds: the broker must not drop us meanwhile
            stream = self.streams.get(node_id)
            if stream is None:  # went offline meanwhile
                continue
            view = world.view(node_id)
            digest = view.digest()
            if digest == stream.digest:
                continue
            chunk.append((node_id, stream, view, digest, revisions))
            if len(chunk) >= PUSH_BATCH:
                receipts += self._push_chunk(chunk, head)
                chunk = []
        receipts += self._push_chunk(chunk, head)
        return receipts

    def _push_chunk(self, chunk: list[_Pending], head: int) -> list[dict[str, object]]:
        """Seal a chunk of updates with one signature and send it: the first nodes need not wait for all."""
        if not chunk:
            return []
        seals = seal_many(self.signing_key, [(stream.key, head, digest) for _, stream, _, digest, _ in chunk])
        outgoing: list[tuple[str, Update]] = []
        receipts = []
        pushed_at = utcnow()
        for (node_id, stream, view, digest, revisions), sealed in zip(chunk, seals, strict=True):
            update_ = construct(
                Update,
                revision=head,
                prev_revision=stream.revision,
                delta=ViewDelta.between(stream.view, view),
                digest=digest,
                seal=sealed,
            )
            outgoing.append((stream.key, update_))
            self.counters["updates"] += 1
            with self._lock:
                stream.revision, stream.view, stream.digest, stream.pushed_at = head, view, digest, time.monotonic()
                self.unacked[node_id] = (self.unacked.get(node_id, []) + revisions)[-PENDING_RECEIPTS:]
            receipts += [{"revision": r, "node_id": node_id, "pushed_at": pushed_at} for r in revisions]
        self.push_many(outgoing)
        return receipts

    # ------------------------------------------------------------------ operators watching
    def on_watch(self, request: WatchRequest, caller: Identity) -> WatchLease:
        if caller.role not in (Role.OPERATOR, Role.SERVICE):
            raise RemoteError(errors.FORBIDDEN, "only operators may watch the change log")
        if request.stop:
            self.watchers.pop(caller.key, None)
            return WatchLease(lease=0.0, head=max(self.processed, 0))
        self.watchers[caller.key] = time.monotonic() + request.lease
        self.counters["watch_renewals"] += 1
        return WatchLease(lease=request.lease, head=max(self.processed, 0))

    def _notify_watchers(self, changes: list[Change], head: int) -> None:
        """Push one notice of this batch to every operator whose lease holds; forget lapsed leases."""
        if not self.watchers:
            return
        now = time.monotonic()
        for key in [k for k, until in self.watchers.items() if until <= now]:
            del self.watchers[key]
        if not self.watchers:
            return
        notice = ChangeNotice(
            prev_revision=self.processed,
            revision=head,
            changes=[
                ChangeEvent(revision=c.revision, at=c.at, kind=c.kind, summary=c.summary, actor=c.actor)
                for c in changes
            ],
        )
        for key in self.watchers:
            self.push(key, notice)
            self.counters["notices"] += 1

    # ------------------------------------------------------------------ requests from nodes
    def _node(self, caller: Identity) -> None:
        if caller.role is not Role.NODE:
            raise RemoteError(errors.FORBIDDEN, "only nodes have views")

    def on_snapshot(self, request: SnapshotRequest, caller: Identity) -> Snapshot:
        self._node(caller)
        if request.node is not None and request.node != caller.name:
            self.counters["hostile_snapshot"] += 1
            log.warning("refused: %s asked for the view of node %r", caller.caller, request.node)
            raise RemoteError(errors.FORBIDDEN, "a node may ask for its own view only")
        # The snapshot is the view at the revision the streams have reached; later changes follow as
        # updates. Only a key the world does not know yet (a node that just enrolled) forces a catch-up.
        if self.world is None or self.world.node_id(caller.key) is None:
            self.catch_up()
        assert self.world is not None
        head, node_id = self.processed, self.world.node_id(caller.key)
        if node_id is None:
            raise RemoteError(errors.FORBIDDEN, "this key belongs to no node")
        view = self.world.view(node_id)
        digest = view.digest()
        with self._lock:
            self.streams[node_id] = Stream(node_id, caller.key, head, view, digest, time.monotonic())
            self.by_key[caller.key] = node_id
            self._seen(node_id, caller)
        self.counters["snapshots"] += 1
        return Snapshot(revision=head, view=view, digest=digest, seal=seal(self.signing_key, caller.key, head, digest))

    def on_heartbeat(self, request: SyncHeartbeat, caller: Identity) -> SyncStatus:
        """Presence, the receipt it carries, and whether the node's view is current (usually the beats thread)."""
        self._node(caller)
        with self._lock:
            stream = self._stream_of(caller)
            if stream is not None:
                self._seen(stream.node_id, caller, request)
                self._acknowledge(stream, request.revision)
                return self._status(self._in_sync(stream, request.revision, request.digest), stream.revision)
        node_id = self._node_id(caller)
        resumed = self._resume(node_id, caller, request)
        with self._lock:
            self._seen(node_id, caller, request)
        return self._status(resumed, request.revision)

    def _resume(self, node_id: int, caller: Identity, request: SyncHeartbeat) -> bool:
        """Start a stream from the node's own revision if its digest is the view it should hold; True if so.

        After a restart of the server every agent heartbeats with a view that is still right; a snapshot for
        each (10,000 views, seals and sends) was most of the time until all were resynchronised. Updates then
        carry the node's revision as prev_revision, so the Clone protocol's gap check still holds.
        """
        # Just after a restart the first heartbeats can come before the main thread has read the datastore:
        # waiting for it briefly beats answering "not in sync", which costs each of those nodes a snapshot.
        # Briefly, and counted from the start, not per heartbeat: this thread answers every heartbeat, and
        # 10,000 of them each waiting 5 s while a loaded machine read the datastore set off offline waves.
        # Not on the main thread, though (the broker sends it heartbeats while the beats thread is away): it
        # reads the datastore itself, at its next tick, so it would only wait out the deadline.
        if not self._world_ready.is_set() and threading.current_thread() is not self._main_thread:
            self._world_ready.wait(max(0.0, self._resume_deadline - time.monotonic()))
        for _ in range(RESUME_ATTEMPTS):  # a batch may begin on a newer world meanwhile: then check against that
            world, head = self.world, self.world_head
            if world is None or not request.digest or not 0 < request.revision <= head:
                return False
            if world.node_id(caller.key) != node_id or world.view(node_id).digest() != request.digest:
                return False
            view = world.view(node_id)
            with self._lock:
                if self.world is not world:
                    continue
                if node_id not in self.streams:
                    stream = Stream(node_id, caller.key, request.revision, view, request.digest, time.monotonic())
                    stream.acked = request.revision
                    self.streams[node_id] = stream
                    self.by_key[caller.key] = node_id
                    self.counters["resumed"] += 1
            return True
        return False  # the world kept moving: the node resyncs with a snapshot

    def _status(self, in_sync: bool, revision: int) -> SyncStatus:
        """A heartbeat's answer, with where the reflector and the relay are (agents follow a moved server)."""
        reflector, relay = self.reflector_address, self.relay_address
        return SyncStatus(
            in_sync=in_sync, revision=revision, reflector=reflector, relay=relay, heartbeat=self.advertised
        )

    def _advertise(self, now: float) -> None:
        """Set the heartbeat interval to ask for from how many nodes are alive: longer at once, shorter after
        ADVERTISE_HOLD (nodes pick up a new interval with their next heartbeat, so presence must allow the
        longest one any node may still be on)."""
        wanted = len(self.last_seen) / self.heartbeat_budget
        interval = min(SLOWEST_HEARTBEAT, float(math.ceil(wanted))) if wanted > OWN_HEARTBEAT else 0.0  # whole s
        if interval > self.advertised or (interval < self.advertised and now - self._advertised_at > ADVERTISE_HOLD):
            log.info(
                "asking nodes for a heartbeat every %s (%d alive)",
                f"{interval:g}s" if interval else "their own interval",
                len(self.last_seen),
            )
            self.advertised = interval
        if interval >= self.advertised:
            self._advertised_at = now

    def on_applied(self, request: Applied, caller: Identity) -> SyncStatus:
        self._node(caller)
        with self._lock:
            stream = self._stream_of(caller)
            if stream is None:
                return SyncStatus(in_sync=False, revision=request.revision)
            self._acknowledge(stream, request.revision)
            in_sync = self._in_sync(stream, request.revision, request.digest)
            return SyncStatus(in_sync=in_sync, revision=stream.revision)

    def _in_sync(self, stream: Stream, revision: int, digest: str) -> bool:
        if digest == stream.digest:
            return True
        # Behind by an update that may still be on its way: give it a moment.
        return revision < stream.revision and time.monotonic() - stream.pushed_at < IN_FLIGHT_GRACE

    def _stream_of(self, caller: Identity) -> Stream | None:
        node_id = self.by_key.get(caller.key)
        return self.streams.get(node_id) if node_id is not None else None

    def _node_id(self, caller: Identity) -> int:
        known = self.world.node_id(caller.key) if self.world is not None else None
        if known is not None:
            return known
        with reading(self.engine) as session:
            node = session.exec(select(Node).where(Node.curve_key == caller.key)).first()
        if node is None or node.id is None:
            raise RemoteError(errors.FORBIDDEN, "this key belongs to no node")
        return node.id

    def _acknowledge(self, stream: Stream, revision: int) -> None:
        if revision > stream.acked:
            stream.acked = revision
            pending = self.unacked.get(stream.node_id)
            if pending and pending[0] <= revision:
                self._acks += [(stream.node_id, r) for r in pending if r <= revision]
                self.unacked[stream.node_id] = [r for r in pending if r > revision]

    def flush_receipts(self) -> None:
        """Mark acknowledged deliveries applied, for every node at once."""
        with self._lock:
            acks, self._acks = self._acks, []
        now = utcnow()
        self.receipts.applied([{"node": node_id, "revision": revision, "now": now} for node_id, revision in acks])

    def _drop_stream(self, node_id: int) -> None:
        with self._lock:
            stream = self.streams.pop(node_id, None)
            if stream is not None:
                self.by_key.pop(stream.key, None)

    # ------------------------------------------------------------------ presence
    def _seen(self, node_id: int, caller: Identity, heartbeat: SyncHeartbeat | None = None) -> None:
        """Note a sign of life; queue a write only when something an operator sees changes (flush_presence)."""
        now = time.monotonic()
        reported = None
        if heartbeat is not None:
            reported = (
                tuple(heartbeat.endpoints),
                heartbeat.agent_version,
                heartbeat.mapped,
                heartbeat.filtering,
                heartbeat.mapping,
                tuple(heartbeat.caps),
            )
        fresh = now - self._written.get(node_id, float("-inf")) < LAST_SEEN_WRITE
        unchanged = reported is None or self._reported.get(node_id) == reported
        known = node_id in self.last_seen
        self.last_seen[node_id] = now
        if known and fresh and unchanged:
            return
        self._written[node_id] = now
        if known and unchanged:  # an online node's last_seen is due: one plain UPDATE, no row to read
            if node_id not in self._unwritten:
                self._touched.add(node_id)
            return
        if reported is not None:
            self._reported[node_id] = reported
        if heartbeat is not None or node_id not in self._unwritten:  # a heartbeat's report wins over a snapshot
            self._unwritten[node_id] = heartbeat

    def flush_presence(self) -> None:
        """Write every queued sign of life in one transaction.

        One transaction per heartbeat (each an fsync on SQLite) capped the fanout at a few hundred nodes
        coming online per second, and its heartbeat replies waited behind them.
        """
        with self._lock:
            pending, self._unwritten = self._unwritten, {}
            touched, self._touched = sorted(self._touched - pending.keys()), set()
        ids = sorted(pending)
        online: list[Node] = []
        if touched:
            # Every online node's last_seen is rewritten every LAST_SEEN_WRITE seconds: at 10,000 nodes, reading
            # each row through the ORM (JSON columns and all) to set one column was a fifth of the fanout's main
            # thread. It records no change, so it need not queue behind (or hold up) the operators' mutations.
            with transaction(self.engine, serialised=False) as session:
                now = utcnow()
                session.execute(TOUCH_LAST_SEEN, [{"node": node_id, "now": now} for node_id in touched])
        if ids:
            with transaction(self.engine) as session:
                for start in range(0, len(ids), 500):
                    self.keepalive()
                    chunk = ids[start : start + 500]
                    for node in session.exec(select(Node).where(col(Node.id).in_(chunk))).all():
                        if self._write_seen(session, node, pending[node.id or 0]):
                            online.append(node)
                if online:
                    _record_presence(session, online, "online", "is online")
        self.counters["presence_flushes"] += 1

    def _write_seen(self, session, node: Node, heartbeat: SyncHeartbeat | None) -> bool:  # type: ignore[no-untyped-def]
        """Write one node's sign of life; True if it just came online (the caller records that, for all at once)."""
        before = (node.endpoints, node.nat_class, node.public_endpoint, node.caps)
        if heartbeat is not None:
            node.endpoints = list(heartbeat.endpoints)
            node.nat_class = classify(node.endpoints, heartbeat.mapped, heartbeat.filtering, heartbeat.mapping)
            node.public_endpoint = heartbeat.mapped or None
            node.agent_version = heartbeat.agent_version or node.agent_version
            node.caps = sorted(set(heartbeat.caps))  # peers' paths and checksums follow them (paths.py)
        node.last_seen = utcnow()
        if not node.online:
            node.online = True
            return True
        if heartbeat is not None and (node.endpoints, node.nat_class, node.public_endpoint, node.caps) != before:
            seen = f", seen as {node.public_endpoint}" if node.public_endpoint else ""
            endpoints = ", ".join(node.endpoints) or "none"
            caps = ", ".join(node.caps) or "none"
            summary = f"node {node.name} reports endpoints {endpoints}{seen}: {node.nat_class}; offloads {caps}"
            repo.record(session, "node.endpoints", summary, "service:fanout", [], [node.id or 0])
        return False

    def _adopt_online_nodes(self, session) -> None:  # type: ignore[no-untyped-def]
        """After a start, nodes the database says are online get twice the presence window to be heard from.

        They all come back at once: every agent redoes its CURVE handshake and, having missed beats while
        the server was down, beats at the longest interval it was asked for. At 10,000 nodes on a loaded
        machine one window (30 s) was not enough, and the offline waves that followed kept thousands from
        resynchronising for minutes.
        """
        adopted = session.exec(select(Node.id).where(col(Node.online).is_(True))).all()
        interval = min(SLOWEST_HEARTBEAT, float(math.ceil(len(adopted) / self.heartbeat_budget)))
        window = max(self.presence_timeout, BEATS_MISSED * interval)
        grace_until = time.monotonic() + window  # last_seen in the future: silent only after two windows
        for node_id in adopted:
            self.last_seen.setdefault(node_id, grace_until)

    def check_presence(self, now: float) -> None:
        if self._unwritten:
            self.flush_presence()  # online before offline: a node seen just now is written first
        # Silence while the heartbeat thread has had a backlog is not (only) the nodes': their heartbeats may be
        # waiting in the broker. At 10,000 agents such waits expired, live nodes were marked offline by the
        # hundred, lost their streams and came back for snapshots, which made the backlog worse. Wait one more
        # timeout then, never longer (a server cut off from every node still marks them offline).
        self._advertise(now)
        limit = max(self.presence_timeout, BEATS_MISSED * self.advertised)
        if now - self.beats.idle_at > BEATS_BACKLOG:
            limit *= 2
            self.counters["presence_deferred"] += 1
        with self._lock:
            silent = [n for n, seen in self.last_seen.items() if now - seen > limit]
            for node_id in silent:
                del self.last_seen[node_id]
                self._written.pop(node_id, None)
        if not silent:
            return
        offline: list[Node] = []
        for node_id in silent:
            self._drop_stream(node_id)
        with transaction(self.engine) as session:
            # 500 rows a query: one get per node (with autoflush) took seconds when thousands fell silent at once.
            for start in range(0, len(silent), 500):
                self.keepalive()
                chunk = silent[start : start + 500]
                for node in session.exec(select(Node).where(col(Node.id).in_(chunk))).all():
                    if node.online:
                        node.online = False
                        offline.append(node)
            if offline:
                why = f"is offline (no heartbeat for {limit:.0f}s)"
                log.info(_record_presence(session, offline, "offline", why))


def _record_presence(session, nodes: list[Node], state: str, what: str) -> str:  # type: ignore[no-untyped-def]
    """One change-log row for every node that came online (or went offline) together; returns its summary.

    One row per node made 10,000 agents coming online 10,000 changes, each a batch for the fanout.
    """
    if len(nodes) == 1:
        summary = f"node {nodes[0].name} {what}"
    else:
        names = ", ".join(n.name for n in nodes[:20]) + (", ..." if len(nodes) > 20 else "")
        summary = f"{len(nodes)} nodes {what.replace('is ', 'are ', 1)}: {names}"
    repo.record(session, f"node.{state}", summary, "service:fanout", [], [n.id or 0 for n in nodes])
    return summary
