"""Group commit in the datastore: mutations that wait together commit as one transaction, one savepoint each.

A burst of operator changes used to queue at one durable commit (an fsync) per change. Grouped, each
mutation must still behave as if alone: its own revision, in the order sent; a failing one refused
without taking the others with it; an idempotent retry answered with the first revision; a dry run
in between seeing what came before it and committing nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bus import errors
from bus.errors import RemoteError
from bus.messages.common import Health, HealthRequest
from bus.messages.datastore import Mutated, VpnCreate, VpnList, VpnListRequest
from tests.helpers.server import CoterieServer

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoterieServer]:
    srv = CoterieServer(tmp_path).start(timeout=60)
    try:
        yield srv
    finally:
        srv.stop()


def _group_commits(server: CoterieServer) -> int:
    health = server.request(HealthRequest(), service="datastore")
    assert isinstance(health, Health)
    return int(health.counters.get("group_commits", 0))


def _vpn(round_: int, i: int, **extra: object) -> VpnCreate:
    return VpnCreate(name=f"r{round_}-v{i}", subnet=f"10.{100 + round_}.{i}.0/24", **extra)  # type: ignore[arg-type]


def test_mutations_sent_together_commit_together_each_as_if_alone(server: CoterieServer) -> None:
    check_group_commit(server)


def check_group_commit(server: CoterieServer) -> None:
    """Also run on PostgreSQL (tests/external/test_server_on_postgres.py)."""
    for round_ in range(3):  # grouping depends on arrival: a few rounds make sure some requests waited together
        requests = [_vpn(round_, i) for i in range(12)]
        requests.insert(5, _vpn(round_, 3))  # the same name again: refused, alone
        requests.insert(8, _vpn(round_, 40, idempotency_key=f"key-{round_}"))
        requests.insert(9, _vpn(round_, 40, idempotency_key=f"key-{round_}"))  # a retry: the first's revision
        requests.insert(11, _vpn(round_, 41, dry_run=True))  # a preview: nothing committed
        replies = server.operator.request_many([("datastore", r) for r in requests], timeout=60)

        duplicate = replies[5]
        assert isinstance(duplicate, RemoteError) and duplicate.code == errors.CONFLICT, duplicate
        first, retry, preview = replies[8], replies[9], replies[11]
        assert isinstance(first, Mutated) and isinstance(retry, Mutated) and isinstance(preview, Mutated)
        assert retry.replayed and retry.revision == first.revision
        assert preview.dry_run and preview.revision == 0
        committed = [r for i, r in enumerate(replies) if i not in (5, 9, 11)]
        assert all(isinstance(r, Mutated) and not r.replayed for r in committed), committed
        revisions = [r.revision for r in committed]  # type: ignore[union-attr]
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions), revisions

        listed = server.request(VpnListRequest())
        assert isinstance(listed, VpnList)
        names = {v.name for v in listed.vpns}
        expected = {f"r{round_}-v{i}" for i in range(12)} | {f"r{round_}-v40"}
        assert expected <= names, expected - names
        assert f"r{round_}-v41" not in names  # the dry run committed nothing
        if _group_commits(server) > 0:
            break
    assert _group_commits(server) > 0, "no two mutations were ever committed together"
