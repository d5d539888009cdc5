"""The agent's control loop: enroll once, then keep the node's view current.

States, in order: enroll (first run only: the join secret buys the node's
key a place in the server's registry) -> resume (a stored view whose seal
verifies is used at once, so a node restarted while the server is down keeps
working) -> snapshot -> follow (apply pushed updates in order, heartbeat,
acknowledge) -> back to snapshot on a gap, a digest mismatch, or a
heartbeat that says the view is stale. Losing the server never stops the
agent: it keeps its last view, says it is offline, and retries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

from bus import errors
from bus.client import Backoff, Client, Context
from bus.errors import BusError, BusTimeout, RemoteError
from bus.keys import validate_public_key
from bus.messages.auth import Enroll, Enrolled, JoinString
from bus.messages.sync import Applied, Snapshot, SnapshotRequest, SyncHeartbeat, SyncStatus, Update
from bus.signing import verify_seal
from nodeagent.state import ServerInfo, StateDir, StateError, StoredView
from nodeagent.sync import Outcome, Replica, receipt_delay

if TYPE_CHECKING:
    from nodeagent.tunnels import Tunnels

log = logging.getLogger(__name__)

VERSION = "0.1.0"
HEARTBEAT_INTERVAL = 2.0
RETRY_MAX = 10.0
SAVE_INTERVAL = 1.0  # seconds: the stored view may lag the live one by this much (it stays sealed and valid)
MISSED_HEARTBEATS = 3  # unanswered in a row before the agent reconnects


class EnrollmentError(Exception):
    """The server refused the join string (the message says why)."""


def enroll(
    state: StateDir, join: JoinString, timeout: float = 5.0, context: Context | None = None, node_name: str = ""
) -> ServerInfo:
    """Trade the join secret for enrollment; the node's own keys are made here and never leave.

    *node_name* names the node when the secret is an enrollment token (default: the hostname).
    """
    import socket

    hostname = socket.gethostname().split(".")[0][:63]
    keypair = state.keypair()
    server_key = validate_public_key(join.server_key)
    last: Exception | None = None
    for endpoint in join.endpoints:
        with Client(endpoint, keypair, server_key, timeout=timeout, retries=1, context=context) as client:
            try:
                enrollment = Enroll(
                    secret=join.secret,
                    sign_key=state.identity_public(),
                    agent_version=VERSION,
                    node_name=node_name,
                    hostname=hostname,
                )
                reply = client.request("auth", enrollment)
            except RemoteError as exc:
                raise EnrollmentError(exc.message) from None
            except BusError as exc:
                last = exc
                continue
        assert isinstance(reply, Enrolled)
        info = ServerInfo(join.endpoints, join.server_key, reply.server_sign_key, reply.node)
        state.save_server(info)
        log.info("enrolled as node %s at %s", reply.node, endpoint)
        return info
    raise EnrollmentError(f"no server answered at {', '.join(join.endpoints)}: {last}")


class Agent:
    """Runs the control loop until :meth:`stop`; the view is always on disk."""

    def __init__(
        self,
        state: StateDir,
        *,
        heartbeat: float = HEARTBEAT_INTERVAL,
        timeout: float = 3.0,
        context: Context | None = None,
        tunnels: Tunnels | None = None,
    ) -> None:
        self.state = state
        self.tunnels = tunnels  # the data plane and its keys; None for a control-only agent
        self.server = state.server()
        self.keypair = state.keypair()
        self.heartbeat_interval = heartbeat
        self.timeout = timeout
        self.replica = Replica()
        self.connected = False
        self.counters: Counter[str] = Counter()  # snapshots, and each update outcome
        # (revision, monotonic time) of each view taken, by update or snapshot: for tests and benchmarks
        self.applied_log: deque[tuple[int, float]] = deque(maxlen=1000)
        self._stop = threading.Event()
        self._endpoint = 0
        self._context = context  # shared by many simulated agents in one process
        self._missed = 0  # heartbeats in a row without an answer
        self._asked = 0.0  # the heartbeat interval the fanout last asked for (SyncStatus.heartbeat)
        self._receipt_due: float | None = None  # when the receipt of the updates applied since the last one goes
        self._saved_at = float("-inf")
        self._unsaved = False  # an applied update not yet on disk

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Start from the stored view if the server's seal on it verifies; False if there is none."""
        try:
            stored = self.state.load_view()
        except StateError as exc:  # unreadable: refused like an altered one; the server will send a snapshot
            stored, damaged = None, str(exc)
        else:
            damaged = None
        if damaged is not None:
            log.error("stored view refused: %s; waiting for the server", damaged)
            self._status("stored view refused", problem=f"the stored view is damaged (altered?): {damaged}")
            return False
        if stored is None:
            return False
        problem = self.check_stored(stored)
        if problem is not None:
            log.error("stored view refused: %s; waiting for the server", problem)
            self._status("stored view refused", problem=problem)
            return False
        self.replica.view, self.replica.revision = stored.view, stored.revision
        self.replica.digest, self.replica.seal = stored.digest, stored.seal
        log.info("starting from the stored view at revision %d (until the server answers)", stored.revision)
        self._view_changed()
        return True

    def check_stored(self, stored: StoredView) -> str | None:
        if stored.view.digest() != stored.digest:
            return "its digest does not match its content (the stored view was altered)"
        return verify_seal(
            self.server.sign_key, self.keypair.public_text, stored.revision, stored.digest, stored.seal, time.time()
        )

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        self.resume()
        # Shared with the client, which resets it once the server answers: after a server restart, thousands of
        # agents come back spread over seconds (exponential, jittered) instead of all at once.
        backoff = Backoff(cap=RETRY_MAX)
        while not self._stop.is_set():
            endpoint = self.server.endpoints[self._endpoint % len(self.server.endpoints)]
            server_key = self.server.server_key.encode()
            client = Client(
                endpoint,
                self.keypair,
                server_key,
                timeout=self.timeout,
                retries=0,
                backoff=backoff,
                context=self._context,
            )
            try:
                self._follow(client)
            except RemoteError as exc:
                self.connected = False
                revoked = exc.code == errors.FORBIDDEN
                self._status("revoked" if revoked else "offline", problem=str(exc))
                if revoked:
                    log.error("the server refuses this node (removed or revoked?): %s", exc.message)
                else:
                    log.warning("server error %s; keeping revision %d", exc, self.replica.revision)
                self._stop.wait(backoff.next())
            except BusError as exc:
                self.connected = False
                self._status("offline", problem=str(exc))
                log.warning("server %s unreachable (%s); keeping revision %d", endpoint, exc, self.replica.revision)
                self._endpoint += 1
                self._stop.wait(backoff.next())
            finally:
                client.close()
        if self._unsaved:
            self._save()
        self._status("stopped")

    def _follow(self, client: Client) -> None:
        self._missed = 0  # a new connection starts with a clean count
        if not self._resume_stream(client):
            self._snapshot(client)
        next_heartbeat = time.monotonic() + self.heartbeat_interval
        self._receipt_due = None  # the heartbeat that resumed, or the snapshot, told the server where we are
        while not self._stop.is_set():
            wake = next_heartbeat if self._receipt_due is None else min(next_heartbeat, self._receipt_due)
            push = client.next_push(max(0.0, min(wake - time.monotonic(), 0.2)))
            if self._unsaved and time.monotonic() - self._saved_at >= SAVE_INTERVAL:
                self._save()
            if push is not None and push[0] == "fanout" and isinstance(push[1], Update):
                self._on_update(client, push[1])
            elif push is not None and push[0] == "keydist" and self.tunnels is not None:
                self.tunnels.on_push(push[1])
            if self.tunnels is not None:
                self.tunnels.tick(client)
            if self._receipt_due is not None and time.monotonic() >= self._receipt_due:
                self._receipt_due = None  # nothing waits for its reply: the next heartbeat repeats it
                client.notify("fanout", Applied(revision=self.replica.revision, digest=self.replica.digest))
            if time.monotonic() >= next_heartbeat:
                status = self._heartbeat(client)
                # A fanout with many nodes asks for a longer interval: its heartbeat budget is shared by all. After
                # a first missed beat the next comes at the agent's own interval (a restarted server is found in
                # seconds); after more, at the asked one: beating fast at a server too busy to answer overloads it.
                if status is not None:
                    self._asked = status.heartbeat
                asked = self._asked if self._missed != 1 else 0.0
                next_heartbeat = time.monotonic() + max(self.heartbeat_interval, asked)
                if status is not None and not status.in_sync:
                    self.counters["told_stale"] += 1
                    log.info("server says the view at revision %d is stale; resynchronising", self.replica.revision)
                    self._snapshot(client)

    def _resume_stream(self, client: Client) -> bool:
        """With a view in hand, heartbeat before asking for a snapshot; True if the server says it is current.

        A fanout that kept this node's stream, or that can resume it from the node's revision (after a server
        restart), answers in sync: no snapshot is needed. 10,000 agents asking for 10,000 snapshots at once
        after a restart were most of the time until all were resynchronised.
        """
        if self.replica.view is None or self.replica.revision <= 0:
            return False
        status = self._heartbeat(client)
        if status is None or not status.in_sync:
            return False
        self.counters["resumed"] += 1
        self.connected = True
        if self.tunnels is not None:
            self.tunnels.on_connect()
        self._status("connected")
        log.info("resumed at revision %d without a snapshot: the server says it is current", self.replica.revision)
        return True

    def _heartbeat(self, client: Client) -> SyncStatus | None:
        """One heartbeat; a busy server may miss a few (None), several in a row mean it is gone."""
        endpoints, mapped, filtering, mapping, caps = [], "", "", "", []
        if self.tunnels is not None:
            endpoints = self.tunnels.endpoints()
            report = self.tunnels.nat_report()
            mapped, filtering, mapping = report.mapped, report.filtering, report.mapping
            caps = self.tunnels.dataplane.capabilities()  # as it runs now: a refused GSO send drops "gso"
        beat = SyncHeartbeat(
            revision=self.replica.revision,
            digest=self.replica.digest,
            agent_version=VERSION,
            endpoints=endpoints,
            mapped=mapped,
            filtering=filtering,
            mapping=mapping,
            caps=caps,
        )
        try:
            status = client.request("fanout", beat, expect=SyncStatus)
        except (BusTimeout, RemoteError) as exc:
            # A busy server may miss a beat or answer "unavailable, retry": one is no reason to reconnect
            # (and, at 10,000 agents, to add to the load); several in a row mean it is gone.
            if isinstance(exc, RemoteError) and not exc.retriable:
                raise
            self._missed += 1
            if self._missed >= MISSED_HEARTBEATS:
                raise
            return None
        self._missed = 0
        assert isinstance(status, SyncStatus)
        if self.tunnels is not None:
            self.tunnels.set_reflector(status.reflector)
            self.tunnels.set_relay(status.relay)
            self._status("connected")  # refreshes the data plane's counters in status.json
        return status

    def _snapshot(self, client: Client) -> None:
        snapshot = client.request("fanout", SnapshotRequest(), expect=Snapshot)
        assert isinstance(snapshot, Snapshot)
        if not self.replica.load(snapshot):
            raise RemoteError("invalid", "snapshot digest does not match its view")
        self.counters["snapshots"] += 1
        self.applied_log.append((snapshot.revision, time.monotonic()))
        self.connected = True
        self._view_changed()
        if self.tunnels is not None:
            self.tunnels.on_connect()
        self._save()
        log.info(
            "snapshot at revision %d: %d VPNs, %d peers",
            snapshot.revision,
            len(snapshot.view.vpns),
            len(snapshot.view.peers),
        )

    def _on_update(self, client: Client, update: Update) -> None:
        outcome = self.replica.apply(update)
        self.counters[outcome.value] += 1
        if outcome is Outcome.APPLIED:
            self.applied_log.append((update.revision, time.monotonic()))
            self._view_changed()
            self._save(force=False)
            if self._receipt_due is None:  # the receipt, a moment later (sync.receipt_delay)
                self._receipt_due = time.monotonic() + receipt_delay(self._asked)
        elif outcome in (Outcome.GAP, Outcome.MISMATCH, Outcome.NO_VIEW):
            log.info(
                "update r%d (after r%d): %s at r%d; taking a snapshot",
                update.revision,
                update.prev_revision,
                outcome.value,
                self.replica.revision,
            )
            self._snapshot(client)

    def _view_changed(self) -> None:
        if self.tunnels is not None and self.replica.view is not None:
            self.tunnels.apply_view(self.replica.view)

    def _save(self, force: bool = True) -> None:
        """Store the view; updates in a burst are stored at most every SAVE_INTERVAL (the loop flushes)."""
        now = time.monotonic()
        if not force and now - self._saved_at < SAVE_INTERVAL:
            self._unsaved = True
            return
        assert self.replica.view is not None and self.replica.seal is not None
        stored = StoredView(self.replica.revision, self.replica.digest, self.replica.view, self.replica.seal)
        self.state.save_view(stored)
        self._saved_at, self._unsaved = now, False
        self._status("connected")

    def _status(self, state: str, **extra: Any) -> None:
        self.state.save_status(
            {
                "state": state,
                "node": self.replica.view.node if self.replica.view else self.server.node,
                "revision": self.replica.revision,
                "server": self.server.endpoints[self._endpoint % len(self.server.endpoints)],
                "at": time.time(),
                **({"dataplane": self.tunnels.status()} if self.tunnels is not None else {}),
                **extra,
            }
        )
