"""A fanout whose answers the test decides: the agent's counterpart in sync tests.

Why scripted: the real fanout never sends a gap, a wrong digest or a
duplicate on purpose, yet those are exactly what the agent must survive. This
worker holds one node's "current" view and revision, serves snapshots of it
sealed with a test key, answers heartbeats with the in-sync flag the test
sets, counts every request, and pushes whatever update the test builds.

Pushes are queued by the test thread and sent from :meth:`tick`, in the
worker's own thread: a ZeroMQ socket must never be used from two threads.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter

from nacl.signing import SigningKey

from bus import errors
from bus.errors import RemoteError
from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.messages import Message
from bus.messages.sync import (
    Applied,
    NodeView,
    Snapshot,
    SnapshotRequest,
    SyncHeartbeat,
    SyncStatus,
    Update,
    ViewDelta,
)
from bus.signing import VIEW_TTL, seal
from bus.worker import Handler, Worker


class ScriptedFanout(Worker):
    """Serves one node's view; every answer and push is under the test's control."""

    service = "fanout"
    allow = (Role.NODE,)
    tick_interval = 0.02

    def __init__(
        self,
        endpoint: str,
        keypair: KeyPair,
        server_key: bytes,
        *,
        signing_key: SigningKey,
        node_key: str,
        view: NodeView,
        revision: int = 1,
    ) -> None:
        super().__init__(endpoint, keypair, server_key)
        self.signing_key = signing_key
        self.node_key = node_key
        self.ttl = VIEW_TTL  # seconds a seal stays valid; negative makes seals that are already expired
        self.in_sync = True  # what heartbeats and receipts are answered
        self.unavailable_beats = 0  # the next N heartbeats are answered service_unavailable (retriable)
        self.requests: Counter[str] = Counter()  # "snapshot", "heartbeat", "applied"
        self.applied: list[Applied] = []
        self.heartbeats: list[SyncHeartbeat] = []
        self.beat_times: list[float] = []  # time.monotonic() of each heartbeat's arrival
        self.asked = 0.0  # the heartbeat interval the answers ask for (SyncStatus.heartbeat)
        self.callers: list[Identity] = []
        self._lock = threading.Lock()
        self._view = view
        self._revision = revision
        self._stale_until_snapshot = False
        self._outbox: queue.Queue[tuple[str, Message]] = queue.Queue()

    def handlers(self) -> dict[type, Handler]:
        return {
            **super().handlers(),
            SnapshotRequest: self.on_snapshot,
            SyncHeartbeat: self.on_heartbeat,
            Applied: self.on_applied,
        }

    # ------------------------------------------------------------------ the script (test thread)
    @property
    def current(self) -> tuple[int, NodeView]:
        with self._lock:
            return self._revision, self._view

    def set_view(self, view: NodeView, revision: int) -> None:
        """Move the truth without telling the node (as if its update were lost)."""
        with self._lock:
            self._view, self._revision = view, revision

    def mark_stale(self) -> None:
        """Answer heartbeats in_sync=False until the node next takes a snapshot."""
        with self._lock:
            self._stale_until_snapshot = True

    def make_update(
        self, view: NodeView, revision: int, *, prev_revision: int | None = None, digest: str | None = None
    ) -> Update:
        """The update from the current view to *view*, which becomes current; prev and digest can lie."""
        with self._lock:
            old, prev = self._view, self._revision
            self._view, self._revision = view, revision
        digest = view.digest() if digest is None else digest
        return Update(
            revision=revision,
            prev_revision=prev if prev_revision is None else prev_revision,
            delta=ViewDelta.between(old, view),
            digest=digest,
            seal=seal(self.signing_key, self.node_key, revision, digest, self.ttl),
        )

    def send(self, message: Message) -> None:
        """Queue a push to the node; :meth:`tick` sends it from the worker's thread."""
        self._outbox.put((self.node_key, message))

    def count(self, what: str) -> int:
        with self._lock:
            return self.requests[what]

    def applied_revisions(self) -> list[int]:
        with self._lock:
            return [a.revision for a in self.applied]

    # ------------------------------------------------------------------ the worker (its own thread)
    def tick(self, now: float) -> None:
        while True:
            try:
                key, message = self._outbox.get_nowait()
            except queue.Empty:
                return
            self.push(key, message)

    def on_snapshot(self, request: SnapshotRequest, caller: Identity) -> Snapshot:
        with self._lock:
            self.requests["snapshot"] += 1
            self.callers.append(caller)
            self._stale_until_snapshot = False
            view, revision = self._view, self._revision
        digest = view.digest()
        return Snapshot(
            revision=revision,
            view=view,
            digest=digest,
            seal=seal(self.signing_key, caller.key, revision, digest, self.ttl),
        )

    def on_heartbeat(self, request: SyncHeartbeat, caller: Identity) -> SyncStatus:
        with self._lock:
            self.requests["heartbeat"] += 1
            self.heartbeats.append(request)
            self.beat_times.append(time.monotonic())
            if self.unavailable_beats > 0:
                self.unavailable_beats -= 1
                raise RemoteError(errors.SERVICE_UNAVAILABLE, "scripted: busy, retry")
            in_sync = self.in_sync and not self._stale_until_snapshot
            return SyncStatus(in_sync=in_sync, revision=self._revision, heartbeat=self.asked)

    def on_applied(self, request: Applied, caller: Identity) -> SyncStatus:
        with self._lock:
            self.requests["applied"] += 1
            self.applied.append(request)
            return SyncStatus(in_sync=self.in_sync, revision=self._revision)
