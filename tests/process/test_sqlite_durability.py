"""RELIABILITY S1: the embedded SQLite datastore loses no acknowledged commit when its process is killed.

The settings that make this true are per connection (PRAGMAs are not stored
in the file), so they are checked on every connection the pool hands out;
then a real writer process is SIGKILLed mid-stream and the file is checked:
intact, every acknowledged revision there, no half-applied transaction.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import col, select

from services.datastore import db, repo
from services.datastore.models import Change, Counter
from tests.helpers.writer_process import WriterProcess

KILL_AFTER = 300  # acknowledged commits before the SIGKILL
MAX_COMMITS = 10_000  # the writer's bound if nobody kills it
KILL_ROUNDS = 3  # writers killed one after another on the same file
SYNCHRONOUS_FULL = 2


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'coterie.db'}"


def _pragmas(dbapi_connection: Any) -> dict[str, object]:
    """The four settings S1 rests on, as this one connection reports them (PRAGMAs are per connection)."""
    cursor = dbapi_connection.cursor()
    try:
        return {
            name: cursor.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }
    finally:
        cursor.close()


def _assert_durable(pragmas: dict[str, object]) -> None:
    assert pragmas["journal_mode"] == "wal", pragmas
    assert pragmas["synchronous"] == SYNCHRONOUS_FULL, pragmas
    assert pragmas["foreign_keys"] == 1, pragmas
    assert isinstance(pragmas["busy_timeout"], int) and pragmas["busy_timeout"] > 0, pragmas


def test_every_pooled_sqlite_connection_is_durable(sqlite_url: str) -> None:
    """WAL, synchronous=FULL, foreign keys and a busy timeout on each connection, not just the first.

    A PRAGMA set once on one connection would leave the pool's other
    connections at synchronous=NORMAL (or DELETE journal, or no foreign keys),
    so several connections are held open at once and each is asked.
    """
    engine = db.make_engine(sqlite_url)
    try:
        db.migrate(engine)
        held = [engine.connect() for _ in range(4)]
        try:
            dbapi = [c.connection.dbapi_connection for c in held]
            assert len({id(d) for d in dbapi}) == len(held), "the pool handed out the same connection twice"
            for connection in dbapi:
                _assert_durable(_pragmas(connection))
        finally:
            for connection in held:
                connection.close()
        # The connections that transactions and snapshots actually use, and fresh ones after a dispose.
        engine.dispose()
        with db.transaction(engine) as session:
            _assert_durable(_pragmas(session.connection().connection.dbapi_connection))
        with db.reading(engine) as session:
            _assert_durable(_pragmas(session.connection().connection.dbapi_connection))
    finally:
        engine.dispose()


def test_a_write_transaction_takes_the_write_lock_at_begin(sqlite_url: str) -> None:
    """db.transaction begins IMMEDIATE: a second writer is refused while the first has merely begun.

    With a deferred BEGIN two writers could both read and then deadlock on the
    upgrade to the write lock; the busy timeout only helps if the lock is
    taken up front.
    """
    engine = db.make_engine(sqlite_url)
    try:
        db.migrate(engine)
        with db.transaction(engine) as session:
            session.connection()  # the transaction has begun; nothing written yet
            other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
            try:
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            finally:
                other.close()
    finally:
        engine.dispose()


def _revisions(engine: Engine) -> tuple[list[int], int]:
    with db.reading(engine) as session:
        revisions = list(session.exec(select(Change.revision).order_by(col(Change.revision))).all())
        counter = session.get(Counter, repo.REVISION)
        return revisions, counter.value if counter else 0


def _kill_writer_after(url: str, count: int) -> list[int]:
    """Start a writer, SIGKILL it (by PID) once it has acknowledged *count* commits; its acked revisions."""
    writer = WriterProcess("tests.helpers.sqlite_writer", url, MAX_COMMITS)
    try:
        assert writer.wait_acks(count, timeout=40), f"no {count} acks in 40 s: {writer.diagnostics()}"
        status = writer.kill(signal.SIGKILL)
        assert status == -signal.SIGKILL, f"the writer ended before the kill: {writer.diagnostics()}"
    finally:
        writer.close()
    return writer.acked


def test_sigkilled_writer_loses_no_acknowledged_commit(sqlite_url: str) -> None:
    """Kill -9 a writer after 300 acknowledged commits: nothing acknowledged is lost, nothing is half done.

    Pass: integrity_check is 'ok'; every acknowledged revision is in the
    change table; the revisions there are exactly 1..max (a gap or a missing
    counter update would be a partial transaction); and the database takes a
    new commit, numbered max+1, from a fresh engine. The kill lands wherever
    the writer happens to be, so it is done three times on the same file,
    each new writer starting on what the previous one left.
    """
    engine = db.make_engine(sqlite_url)
    db.migrate(engine)
    engine.dispose()
    acked_all: list[int] = []
    for _ in range(KILL_ROUNDS):
        acked = _kill_writer_after(sqlite_url, KILL_AFTER)
        assert len(acked) >= KILL_AFTER
        first = acked[0]
        assert acked == list(range(first, first + len(acked))), "one writer acknowledges consecutive revisions"
        assert not acked_all or first > acked_all[-1], "a new writer reused an acknowledged revision"
        acked_all += acked

        with contextlib.closing(sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))) as raw:
            assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]

        engine = db.make_engine(sqlite_url)  # a new process's view: WAL recovery happens on this first open
        try:
            revisions, counter = _revisions(engine)
        finally:
            engine.dispose()
        missing = sorted(set(acked_all) - set(revisions))
        assert not missing, f"acknowledged but lost: {missing[:20]}"
        assert revisions == list(range(1, len(revisions) + 1)), "gap in the change log: a partial transaction"
        assert counter == revisions[-1], "the revision counter and the change log disagree"
        assert revisions[-1] - acked[-1] <= 1, "more than one commit past the last ack: acks were held back"

    engine = db.make_engine(sqlite_url)
    try:
        with db.transaction(engine) as session:
            change = repo.record(session, "test.after", "after the kills", "test", [], [])
        assert change.revision == revisions[-1] + 1
        assert _revisions(engine) == ([*revisions, change.revision], change.revision)
    finally:
        engine.dispose()
