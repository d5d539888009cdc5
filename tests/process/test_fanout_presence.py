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
from nacl.signing import SigningKey

from bus.keys import KeyPair
from services.datastore.db import make_engine, migrate, reading, transaction
from services.datastore.models import Node
from services.fanout.service import FanoutService

TIMEOUT = 3.0


@pytest.fixture
def fanout(tmp_path: Path) -> Iterator[tuple[FanoutService, int]]:
    url = f"sqlite:///{tmp_path / 'coterie.db'}"
    migrate(make_engine(url))
    with transaction(make_engine(url)) as session:
        node = Node(name="n1", curve_key=KeyPair.generate().public_text, online=True)
        session.add(node)
        session.flush()
        node_id = node.id
    service = FanoutService(
        "tcp://127.0.0.1:9",
        KeyPair.generate(),
        KeyPair.generate().public,
        database_url=url,
        signing_key=SigningKey.generate(),
        presence_timeout=TIMEOUT,
    )
    assert node_id is not None
    try:
        yield service, node_id
    finally:
        service.beats.context.term()
        service.context.term()


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
