"""The datastore's word that it committed (sync.committed): the fanout's batch at once, not at its next poll.

Why: the fanout polls the head revision every 20 ms, so every change waited 10 ms on average before any
node heard of it: a third of a change to one node's whole time. The word must start the batch at once,
keep the spacing between batches (a burst still coalesces), be refused from anyone but a server process,
and, end to end, be sent by the real datastore for each group of commits and handled by the real fanout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus import errors
from bus.errors import RemoteError
from bus.identity import Identity, Role
from bus.messages.common import Health, HealthRequest
from bus.messages.datastore import VpnCreate
from bus.messages.sync import Committed
from services.datastore import repo
from services.datastore.db import transaction
from services.fanout.service import FanoutService
from tests.conftest import wait_until
from tests.helpers.fanout import unconnected_fanout
from tests.helpers.server import CoterieServer

DATASTORE = Identity(Role.SERVICE, "datastore", "key")


@pytest.fixture
def fanout(tmp_path: Path) -> Iterator[FanoutService]:
    with unconnected_fanout(tmp_path, presence_timeout=15.0, heartbeat_budget=1000.0) as service:
        service.catch_up()  # the first read: the world, and the revision the streams start from
        yield service


def _commit(service: FanoutService, name: str) -> int:
    with transaction(service.engine) as s:
        repo.create_vpn(s, name, "10.1.0.0/24", "overlay", "mesh")
        return repo.record(s, "vpn.create", name, "operator:test", [], []).revision


def test_the_word_starts_the_batch_at_once(fanout: FanoutService) -> None:
    revision = _commit(fanout, "office")
    assert fanout.processed < revision
    fanout._next_batch = 0.0  # the last batch long ago
    seen = fanout.on_committed(Committed(revision=revision), DATASTORE)
    assert seen.processed == fanout.processed == revision
    assert fanout.counters["committed_words"] == 1 and fanout.counters["batches"] == 1


def test_a_word_too_soon_after_a_batch_is_kept_until_the_batch_is_due(fanout: FanoutService) -> None:
    """The spacing between batches holds (under a burst, changes still coalesce into one update per node),
    and the loop's wait is cut so that the tick comes when the batch is due, not up to a tick later."""
    revision = _commit(fanout, "office")
    now = time.monotonic()
    fanout._next_batch = now + 10.0
    fanout._next_poll = now + 10.0  # and polled just now: the tick alone would not look before then either
    assert fanout.on_committed(Committed(revision=revision), DATASTORE).processed < revision
    assert fanout.next_tick_in() == fanout.tick_interval  # the batch is 10 s away: an ordinary wait
    fanout._next_batch = time.monotonic() + 0.005
    assert fanout.next_tick_in() <= 0.005, "the loop would wait a whole tick past the batch's time"
    fanout.tick(now + 10.0)
    assert fanout.processed == revision
    assert fanout.next_tick_in() == fanout.tick_interval


def test_an_empty_poll_does_not_hold_back_the_next_word(fanout: FanoutService) -> None:
    """A poll that found nothing is not a batch: a commit right after it is fanned out at its word."""
    now = time.monotonic()
    fanout.tick(now)  # a poll: nothing new
    assert fanout.counters["batches"] == 0 and fanout._next_poll > now
    revision = _commit(fanout, "office")
    assert fanout.on_committed(Committed(revision=revision), DATASTORE).processed == revision


def test_a_word_about_what_is_out_already_does_nothing(fanout: FanoutService) -> None:
    fanout._next_batch = 0.0
    assert fanout.on_committed(Committed(revision=fanout.processed), DATASTORE).processed == fanout.processed
    assert fanout.counters["committed_words"] == 0 and fanout.counters["batches"] == 0


@pytest.mark.parametrize("role", [Role.NODE, Role.OPERATOR, Role.ANONYMOUS])
def test_only_a_server_process_may_report_commits(fanout: FanoutService, role: Role) -> None:
    with pytest.raises(RemoteError) as refused:
        fanout.on_committed(Committed(revision=fanout.processed + 1), Identity(role, "x", "key"))
    assert refused.value.code == errors.FORBIDDEN


def test_the_real_datastore_tells_the_real_fanout(tmp_path: Path) -> None:
    server = CoterieServer(tmp_path, presence_timeout=15.0).start()
    try:
        for name in ("office", "lab", "field"):
            server.request(VpnCreate(name=name, subnet=f"10.{len(name)}.0.0/24"))

        def counters(service: str) -> dict[str, int]:
            health = server.request(HealthRequest(), service=service)
            assert isinstance(health, Health)
            return dict(health.counters)

        # The first word may go before the datastore's connection is up (then only the poll tells the fanout).
        assert wait_until(lambda: counters("datastore").get("fanout_told", 0) >= 2, 10.0), counters("datastore")
        assert wait_until(lambda: counters("fanout").get("committed_words", 0) >= 1, 10.0), counters("fanout")
        assert counters("fanout").get("forbidden", 0) == 0
    finally:
        server.stop()
