"""Presence waits longer while the fanout's own heartbeat thread has a backlog (real SQLite, explicit clocks).

The fanout is built but not connected: check_presence is called with an
explicit ``now``, and the heartbeat worker's ``idle_at`` says when it last
had nothing to read. A node silent for 1.5 timeouts is marked offline when
the heartbeat thread was idle just now, and kept online while it has been
busy for seconds (its heartbeats may be waiting in the broker) until the
silence reaches twice the timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.identity import Identity, Role
from bus.keys import KeyPair
from services.datastore import repo
from services.datastore.db import reading, transaction
from services.datastore.models import Node
from services.fanout.service import LAST_SEEN_WRITE, FanoutService
from tests.helpers.fanout import unconnected_fanout

TIMEOUT = 3.0


@pytest.fixture(params=[1000.0])
def fanout(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[FanoutService, int]]:
    with unconnected_fanout(tmp_path, presence_timeout=TIMEOUT, heartbeat_budget=request.param) as service:
        with transaction(service.engine) as session:
            node = Node(name="n1", curve_key=KeyPair.generate().public_text, online=True)
            session.add(node)
            session.flush()
            node_id = node.id
        assert node_id is not None
        yield service, node_id


def _online(service: FanoutService, node_id: int) -> bool:
    with reading(service.engine) as session:
        node = session.get(Node, node_id)
        return bool(node and node.online)


def test_a_silent_node_goes_offline_when_the_heartbeat_thread_keeps_up(fanout: tuple[FanoutService, int]) -> None:
    service, node_id = fanout
    now = time.monotonic()
    service.last_seen[node_id] = now - 1.5 * TIMEOUT
    service.beats.idle_at = now
    service.check_presence(now)
    assert not _online(service, node_id)
    assert node_id not in service.last_seen


def test_a_backlog_of_heartbeats_defers_offline_by_one_timeout_at_most(fanout: tuple[FanoutService, int]) -> None:
    service, node_id = fanout
    now = time.monotonic()
    service.last_seen[node_id] = now - 1.5 * TIMEOUT
    service.beats.idle_at = now - 5.0  # busy for seconds: heartbeats may be queued in the broker
    service.check_presence(now)
    assert _online(service, node_id), "marked offline although its heartbeat may be waiting in our backlog"
    assert service.counters["presence_deferred"] == 1
    later = now + TIMEOUT  # silent for 2.5 timeouts now: the backlog no longer excuses it
    service.check_presence(later)
    assert not _online(service, node_id)


@pytest.mark.parametrize("fanout", [1.0], indirect=True)  # one heartbeat a second from all nodes together
def test_many_nodes_are_asked_for_a_longer_heartbeat_and_given_that_much_longer(
    fanout: tuple[FanoutService, int],
) -> None:
    service, node_id = fanout
    now = time.monotonic()
    service.beats.idle_at = now
    for other in range(1000, 1005):  # five more alive: six nodes at one beat a second is one every 6 s
        service.last_seen[other] = now
    service.last_seen[node_id] = now - 1.5 * TIMEOUT
    service.check_presence(now)
    assert service._status(True, 1).heartbeat == 6.0
    assert _online(service, node_id), "offline after 1.5 timeouts although it was asked to beat every 6 s"
    service.beats.idle_at = now + 3 * 6.0
    service.check_presence(now + 3 * 6.0)  # three asked intervals of silence (and more)
    assert not _online(service, node_id)


@pytest.mark.parametrize("fanout", [1.0], indirect=True)
def test_a_shorter_heartbeat_is_asked_only_after_the_longer_one_was_held(fanout: tuple[FanoutService, int]) -> None:
    """Nodes learn a new interval with their next beat: presence must not outrun the one they may still be on."""
    service, _ = fanout
    now = time.monotonic()
    service.beats.idle_at = now
    service.last_seen.update({n: now for n in range(1000, 1006)})
    service.check_presence(now)
    assert service.advertised == 6.0
    for n in range(1000, 1004):  # four stop (their silence is not checked here): two remain
        del service.last_seen[n]
    service.check_presence(now + 1.0)
    assert service.advertised == 6.0, "shortened at once"
    for n in service.last_seen:
        service.last_seen[n] = now + 70.0
    service.beats.idle_at = now + 70.0
    service.check_presence(now + 70.0)
    assert service.advertised == 0.0, "two nodes at one beat a second: their own interval again"


def test_an_online_node_still_alive_gets_its_last_seen_written_and_nothing_else(
    fanout: tuple[FanoutService, int],
) -> None:
    """The periodic last_seen write of a node that reports nothing new is one plain UPDATE: no change row."""
    service, node_id = fanout
    now = time.monotonic()
    service.last_seen[node_id] = now  # known (online), its last write long ago
    service._written[node_id] = now - LAST_SEEN_WRITE - 1
    with reading(service.engine) as session:
        head = repo.head_revision(session)
        assert session.get(Node, node_id).last_seen is None  # type: ignore[union-attr]
    service._seen(node_id, Identity(Role.NODE, "n1", "key"))
    assert service._touched == {node_id} and not service._unwritten
    service.flush_presence()
    with reading(service.engine) as session:
        node = session.get(Node, node_id)
        assert node is not None and node.online and node.last_seen is not None
        assert repo.head_revision(session) == head, "a sign of life alone is not a change"
    assert not service._touched


def test_nodes_online_at_a_start_get_two_windows_to_be_heard_from(fanout: tuple[FanoutService, int]) -> None:
    """After a restart every node reconnects at once: one adopted as online is not called offline after one
    window, but is after two if it stays silent."""
    service, node_id = fanout
    with reading(service.engine) as session:
        service._adopt_online_nodes(session)
    adopted = time.monotonic()
    service.beats.idle_at = adopted + 10 * TIMEOUT  # the heartbeat thread keeps up throughout
    service.check_presence(adopted + 1.5 * TIMEOUT)
    assert _online(service, node_id), "an adopted node was called offline within its first window"
    service.check_presence(adopted + 2.5 * TIMEOUT)
    assert not _online(service, node_id), "a node silent for two windows after the start stayed online"
