"""HeadProbe: the fanout's cheap "anything committed?" poll, on a real SQLite database.

Why: the fanout asks 50 times a second. The probe must see every commit at
once (a missed one would delay a change until the next commit), must not
hold a read transaction between calls (on SQLite that pins the WAL, on
PostgreSQL it idles in transaction), and must survive a failed read by
saying "unknown" rather than "nothing new". The PostgreSQL side is in
tests/external/test_postgres.py.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Engine

from services.datastore import repo
from services.datastore.db import HeadProbe, reading, transaction
from tests.unit.conftest import SQLITE_FILE


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / SQLITE_FILE


@pytest.fixture
def engine(sqlite_engine: Engine) -> Engine:
    return sqlite_engine


def _commit_a_change(engine: Engine, name: str) -> int:
    with transaction(engine) as s:
        node, _, _ = repo.add_node(s, name, [], [], 24.0)
        return repo.record(s, "node.add", name, "operator:test", [], [node.id or 0]).revision


def _session_head(engine: Engine) -> int:
    with reading(engine) as s:
        return repo.head_revision(s)


def test_probe_sees_each_commit_at_once(engine: Engine) -> None:
    probe = HeadProbe(engine)
    try:
        assert probe() == _session_head(engine)
        for step in range(3):
            revision = _commit_a_change(engine, f"n{step}")
            assert probe() == revision == _session_head(engine), "the probe missed a commit"
    finally:
        probe.close()


def test_probe_holds_no_read_transaction_between_calls(engine: Engine, db_path: Path) -> None:
    """A reader's open snapshot keeps SQLite from truncating the WAL: a checkpoint then reports it busy."""
    probe = HeadProbe(engine)
    try:
        _commit_a_change(engine, "n1")
        assert probe() is not None
        _commit_a_change(engine, "n2")  # frames in the WAL that a pinned snapshot would keep
        checker = sqlite3.connect(db_path, isolation_level=None)
        try:
            busy, _, _ = checker.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            checker.close()
        assert busy == 0, "the probe's connection kept a read transaction open"
    finally:
        probe.close()


def test_a_failed_read_is_unknown_not_nothing_new(
    engine: Engine, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The counter table gone for a moment: None (the caller reads in a session), then the head again."""
    probe = HeadProbe(engine)
    try:
        head = probe()
        assert head is not None
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("ALTER TABLE counter RENAME TO counter_away")
            with caplog.at_level(logging.WARNING, logger="services.datastore.db"):
                assert probe() is None
            assert "head revision probe failed" in caplog.text
            other.execute("ALTER TABLE counter_away RENAME TO counter")
        finally:
            other.close()
        assert probe() == head, "the probe did not recover on a new connection"
    finally:
        probe.close()
