"""The fanout's heartbeat lane and stream resumption, against the real server processes.

- Heartbeats are answered while the fanout's main thread is stuck (here: in
  a presence write that waits for a database lock the test holds), and a
  snapshot asked for meanwhile is answered once it is free.
- After a full server restart, a node whose view is still right resumes its
  stream from its own revision (no snapshot), and the next change reaches it
  as an update it can apply; a node whose view is wrong is told to resync.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.control import HUB_ROUTE, populate
from bus.client import Client
from bus.keys import KeyPair, load_keypair
from bus.messages.common import Health, HealthRequest
from bus.messages.datastore import RouteAdd
from bus.messages.sync import Snapshot, SnapshotRequest, SyncHeartbeat, SyncStatus, Update
from nodeagent.sync import Outcome, Replica
from tests.conftest import wait_until
from tests.helpers.server import CoterieServer

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoterieServer]:
    srv = CoterieServer(tmp_path, presence_timeout=30.0).start(timeout=60)
    try:
        yield srv
    finally:
        srv.stop()


def _clients(server: CoterieServer, count: int) -> list[Client]:
    specs = populate(server, count)
    public = load_keypair(server.home / "keys" / "server.key").public
    endpoint = f"tcp://127.0.0.1:{server.port}"
    return [Client(endpoint, KeyPair(s.public, s.secret), public, timeout=5.0, retries=6) for s in specs]


def _snapshot(client: Client) -> Replica:
    replica = Replica()
    snapshot = client.request("fanout", SnapshotRequest(), expect=Snapshot)
    assert isinstance(snapshot, Snapshot) and replica.load(snapshot)
    return replica


def _beat(replica: Replica, endpoints: list[str] | None = None) -> SyncHeartbeat:
    return SyncHeartbeat(
        revision=replica.revision, digest=replica.digest, agent_version="test", endpoints=endpoints or []
    )


def _fanout_counters(server: CoterieServer) -> dict[str, int]:
    health = server.request(HealthRequest(), service="fanout")
    assert isinstance(health, Health)
    return dict(health.counters)


def test_heartbeats_are_answered_while_the_main_thread_is_stuck(server: CoterieServer) -> None:
    clients = _clients(server, 1)
    beats, snapshots = clients[0], Client(clients[0].endpoint, clients[0].keypair, clients[0].server_key)
    try:
        replica = _snapshot(beats)
        assert isinstance(beats.request("fanout", _beat(replica)), SyncStatus)
        time.sleep(1.0)  # the first presence write is done
        db = sqlite3.connect(server.database_url.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")  # the database's write lock: the fanout's next presence write waits for it
        try:
            # A new endpoint is something to write: the main thread's next flush blocks on the lock.
            assert isinstance(beats.request("fanout", _beat(replica, ["192.0.2.7:4500"])), SyncStatus)
            time.sleep(1.0)
            assert snapshots.heartbeat(10.0), "the second connection did not come up"
            assert snapshots.start("fanout", SnapshotRequest()) is not None
            answered = 0
            for _ in range(6):
                status = beats.request("fanout", _beat(replica, ["192.0.2.7:4500"]), retries=0)
                answered += isinstance(status, SyncStatus)
                time.sleep(0.3)
            held = [i for i in snapshots.incoming() if isinstance(i.message, Snapshot)]
            assert answered == 6, "heartbeats went unanswered while the main thread was stuck"
            assert not held, "the snapshot was answered although the main thread should have been stuck"
        finally:
            db.execute("ROLLBACK")
            db.close()
        got: list[object] = []
        assert wait_until(
            lambda: got.extend(i.message for i in snapshots.incoming() if isinstance(i.message, Snapshot)) or got, 30
        ), "the snapshot was not answered once the main thread was free"
    finally:
        for client in (*clients, snapshots):
            client.close()


def _settle(clients: list[Client], replicas: list[Replica]) -> None:
    """Until every node's stream is at its replica's revision, then forget what was pushed meanwhile.

    A node's presence is written a moment after its snapshot, and that write can change the node's own
    view (the server's path and endpoint choices depend on both ends): a replica taken before it is stale,
    and rightly not resumed after a restart.
    """

    def settled() -> bool:
        current = True
        for i, client in enumerate(clients):
            status = client.request("fanout", _beat(replicas[i]), expect=SyncStatus)
            assert isinstance(status, SyncStatus)
            if not (status.in_sync and status.revision == replicas[i].revision):
                replicas[i] = _snapshot(client)
                current = False
        return current

    assert wait_until(settled, 30, interval=0.5), "the nodes' streams never settled"
    for client in clients:
        for _ in range(100):  # what the settling pushed: a few updates at most
            if client.next_push(0.2) is None:
                break


def test_after_a_restart_nodes_resume_their_streams_without_snapshots(server: CoterieServer) -> None:
    clients = _clients(server, 3)
    try:
        replicas = [_snapshot(c) for c in clients]
        _settle(clients, replicas)
        server.stop()
        server.start(timeout=60)
        statuses = [c.request("fanout", _beat(r), expect=SyncStatus) for c, r in zip(clients, replicas, strict=True)]
        assert all(isinstance(s, SyncStatus) and s.in_sync for s in statuses), statuses
        counters = _fanout_counters(server)
        assert counters.get("resumed", 0) == 3 and counters.get("snapshots", 0) == 0, counters

        wrong = Replica(view=replicas[0].view, revision=replicas[0].revision, digest="0" * 64)
        told = clients[0].request("fanout", _beat(wrong), expect=SyncStatus)
        assert isinstance(told, SyncStatus)  # its stream exists now: a digest that disagrees is not in sync
        assert not told.in_sync

        reply = server.mutate(RouteAdd, node="hub", vpn="all", cidr=HUB_ROUTE)
        for client, replica in zip(clients, replicas, strict=True):
            push = client.next_push(30.0)
            assert push is not None and isinstance(push[1], Update), "the change did not reach a resumed node"
            assert push[1].revision >= reply.revision  # the batch's head: a presence change may have joined it
            assert replica.apply(push[1]) is Outcome.APPLIED, "the resumed stream's update does not follow on"
    finally:
        for client in clients:
            client.close()


def test_a_node_whose_view_is_stale_after_a_restart_is_told_to_resync(server: CoterieServer) -> None:
    clients = _clients(server, 1)
    try:
        replica = _snapshot(clients[0])
        server.stop()
        server.start(timeout=60)
        stale = Replica(view=replica.view, revision=replica.revision, digest="f" * 64)
        status = clients[0].request("fanout", _beat(stale), expect=SyncStatus)
        assert isinstance(status, SyncStatus) and not status.in_sync
        assert _fanout_counters(server).get("resumed", 0) == 0
    finally:
        clients[0].close()
