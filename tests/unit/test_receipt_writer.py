"""The fanout's receipt writer: inserts and acknowledgements in queue order, on a real SQLite file.

Why: receipts are written by a thread of their own so that a burst's hundreds of thousands of rows do
not hold the next batch back. If an acknowledgement could overtake the insert of its receipt, the
UPDATE would match nothing and `events` would show the node pending forever.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine
from sqlmodel import col, select

from services.datastore import repo
from services.datastore.db import reading, transaction
from services.datastore.models import Delivery, utcnow
from services.fanout.receipts import ReceiptWriter
from services.fanout.service import APPLY_RECEIPTS


@pytest.fixture
def engine(sqlite_engine: Engine) -> Engine:
    return sqlite_engine


def _nodes(engine: Engine, count: int) -> list[int]:
    with transaction(engine) as s:
        ids = [repo.add_node(s, f"n{i}", [], [], 24.0)[0].id or 0 for i in range(count)]
        repo.record(s, "node.add", "nodes", "test", [], ids)
    return ids


def test_acknowledgements_queued_after_their_receipts_mark_them_applied(engine: Engine) -> None:
    nodes = _nodes(engine, 50)
    writer = ReceiptWriter(engine, APPLY_RECEIPTS)
    writer.start()
    for revision in range(1, 21):  # each batch's receipts, and at once the acknowledgements of half the nodes
        writer.pushed([{"revision": revision, "node_id": n, "pushed_at": utcnow()} for n in nodes])
        writer.applied([{"node": n, "revision": revision, "now": utcnow()} for n in nodes[::2]])
    writer.stop()
    assert not writer.is_alive()
    with reading(engine) as s:
        rows = s.exec(select(Delivery)).all()
        applied = {(d.revision, d.node_id) for d in rows if d.applied_at is not None}
    assert len(rows) == 20 * 50
    assert applied == {(r, n) for r in range(1, 21) for n in nodes[::2]}
    assert writer.counters["receipts_written"] == 1000 and writer.counters["receipts_applied"] == 500


def test_receipts_of_a_node_removed_meanwhile_are_dropped_and_the_rest_kept(engine: Engine) -> None:
    nodes = _nodes(engine, 3)
    with transaction(engine) as s:
        repo.remove_node(s, "n1")
        repo.record(s, "node.remove", "n1", "test", [], [])
    writer = ReceiptWriter(engine, APPLY_RECEIPTS)
    writer.start()
    writer.pushed([{"revision": 1, "node_id": n, "pushed_at": utcnow()} for n in nodes])
    writer.stop()
    with reading(engine) as s:
        kept = s.exec(select(Delivery.node_id).order_by(col(Delivery.node_id))).all()
    assert kept == [nodes[0], nodes[2]]
    assert writer.counters["receipt_write_failed"] == 0
