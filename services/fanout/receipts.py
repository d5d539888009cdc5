"""Delivery receipts, written by a thread of their own, in the order they were queued.

A receipt is one row per change and node (services/datastore/models.py Delivery), inserted when the
fanout pushes the change and marked applied when the node acknowledges it. After a burst, one batch
can be hundreds of thousands of rows: written by the fanout's main thread, they held the next batch
back by seconds (15 s after a 1,000-change burst to 1,000 nodes on PostgreSQL). Here they queue
instead; inserts and acknowledgements go through one FIFO, so a receipt is always inserted before it
is marked applied. The queue is bounded: a writer that falls far behind slows the fanout down rather
than growing without end.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable

from sqlalchemy import Engine, TextClause, insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import select

from services.datastore.db import transaction
from services.datastore.models import Delivery, Node

log = logging.getLogger(__name__)

QUEUED_JOBS = 64  # batches of receipts or acknowledgements waiting; put() blocks beyond
STOP_WAIT = 10.0  # seconds stop() waits for what is queued to be written

Job = Callable[[], None]
# A Core insert into the table, not the ORM entity: receipts are plain rows, and the ORM's bulk path
# (per-row insert commands) was a tenth of the fanout's CPU while 1,000 nodes were sent a change.
DELIVERIES = insert(Delivery.__table__)  # type: ignore[attr-defined]


class ReceiptWriter(threading.Thread):
    def __init__(self, engine: Engine, apply_statement: TextClause) -> None:
        super().__init__(name="fanout-receipts", daemon=True)
        self.engine = engine
        self.apply_statement = apply_statement
        self.counters: Counter[str] = Counter()
        self._jobs: queue.Queue[Job | None] = queue.Queue(QUEUED_JOBS)

    def pushed(self, rows: list[dict[str, object]]) -> None:
        """Queue the insert of receipts for changes just pushed (revision, node_id, pushed_at)."""
        if rows:
            self._jobs.put(lambda: self._insert(rows))

    def applied(self, rows: list[dict[str, object]]) -> None:
        """Queue marking receipts applied (node, revision, now), after every insert queued before."""
        if rows:
            self._jobs.put(lambda: self._apply(rows))

    def backlog(self) -> int:
        return self._jobs.qsize()

    def stop(self) -> None:
        """Write what is queued (for at most STOP_WAIT seconds), then end."""
        with contextlib.suppress(queue.Full):  # a writer stuck on the database must not hang the fanout's exit
            self._jobs.put(None, timeout=STOP_WAIT)
        self.join(timeout=STOP_WAIT)

    def run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except SQLAlchemyError as exc:  # receipts inform operators; losing a batch never stops the fanout
                self.counters["receipt_write_failed"] += 1
                log.warning("receipts not written (%s): %s", exc.__class__.__name__, str(exc).splitlines()[0][:200])

    def _insert(self, rows: list[dict[str, object]]) -> None:
        try:
            with transaction(self.engine, serialised=False) as session:
                session.execute(DELIVERIES, rows)
        except IntegrityError:
            # A node was removed since the batch was read: keep the receipts of those that remain.
            with transaction(self.engine, serialised=False) as session:
                alive = set(session.exec(select(Node.id)).all())
                kept = [r for r in rows if r["node_id"] in alive]
                if kept:
                    session.execute(DELIVERIES, kept)
        self.counters["receipts_written"] += len(rows)

    def _apply(self, rows: list[dict[str, object]]) -> None:
        with transaction(self.engine, serialised=False) as session:
            session.execute(self.apply_statement, rows)
        self.counters["receipts_applied"] += len(rows)
