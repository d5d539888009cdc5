"""Engines and sessions for SQLite and PostgreSQL, with durable settings, and migrations.

SQLite: WAL (readers never block the writer), synchronous=FULL (an
acknowledged commit survives power loss and kill -9), foreign keys on, and a
busy timeout so that the several server processes sharing the file wait
instead of failing. PostgreSQL: the URL from config.toml, e.g.
``postgresql+psycopg://user@/coterie?host=/run/postgresql``.

Transactions are owned at the edge (the request handler); repository
functions never commit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, event
from sqlmodel import Session, create_engine

log = logging.getLogger(__name__)

READ_ONLY = "coterie_read_only"
HEAD_REVISION = "SELECT value FROM counter WHERE name = 'revision'"
LOCK_WRITERS = HEAD_REVISION + " FOR UPDATE"
MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_on_connect)
        # Let BEGIN be ours: pysqlite's implicit transactions defer locking badly.
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_on_connect(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.isolation_level = None  # autocommit at the driver; BEGIN issued below
    cursor = dbapi_connection.cursor()
    for pragma in SQLITE_PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    # IMMEDIATE takes the write lock at BEGIN, so two writers never deadlock on
    # the upgrade from reader to writer; readers begin deferred (a WAL snapshot).
    reader = connection.get_execution_options().get(READ_ONLY, False)
    connection.exec_driver_sql("BEGIN" if reader else "BEGIN IMMEDIATE")


@contextmanager
def transaction(engine: Engine, *, serialised: bool = True) -> Iterator[Session]:
    """One read-write transaction: committed on success, rolled back on any exception.

    Writers are serialised from their first statement, so that what they read (free
    addresses, taken names, idempotency keys) is still true when they commit: SQLite
    by BEGIN IMMEDIATE, PostgreSQL by locking the revision counter row at once.
    ``serialised=False`` is for writes that read nothing they depend on and record no
    change (the fanout's delivery receipts): on PostgreSQL they then do not queue the
    operators' mutations behind tens of thousands of receipt rows (SQLite has one write
    lock whatever we do).
    """
    with Session(engine, expire_on_commit=False) as session:
        try:
            if serialised and engine.dialect.name == "postgresql":
                session.connection().exec_driver_sql(LOCK_WRITERS)
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def reading(engine: Engine) -> Iterator[Session]:
    """One read-only transaction: a consistent snapshot, always rolled back."""
    options: dict[str, Any] = {READ_ONLY: True}
    if engine.dialect.name == "postgresql":
        options["isolation_level"] = "REPEATABLE READ"
    with Session(engine.execution_options(**options), expire_on_commit=False) as session:
        try:
            yield session
        finally:
            # Detach first: the objects read stay usable (a rollback would expire them).
            session.expunge_all()
            session.rollback()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent; every service that uses the database calls it)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several services migrate at start; one at a time (SQLite's BEGIN IMMEDIATE does this there).
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7870)")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    log.info("database schema is current")


class HeadProbe:
    """The head revision read on one connection kept for it: a poll that costs one statement, not a session.

    The fanout asks 50 times a second whether anything was committed. Through an ORM session (a pooled
    connection checked out, BEGIN, the query, ROLLBACK, the identity map) that kept an idle server's fanout
    5 % busy with no node connected. Here the statement runs on a connection of its own with no
    transaction left open: SQLite connections are in driver autocommit (``_sqlite_on_connect``), so each
    SELECT sees the last commit; on PostgreSQL the rollback after it ends the implicit transaction, so it
    never idles in one. Only a "nothing new" answer is trusted to skip work: whoever then reads the
    changes still does so in one consistent snapshot (``reading``). One thread uses a probe.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._connection: Any = None

    def __call__(self) -> int | None:
        """The committed head revision, or None if it could not be read (the caller reads it in a session)."""
        try:
            if self._connection is None:
                self._connection = self.engine.raw_connection()
            cursor = self._connection.cursor()
            try:
                cursor.execute(HEAD_REVISION)
                row = cursor.fetchone()
            finally:
                cursor.close()
            self._connection.rollback()
        except Exception as exc:  # the database restarted, a lock timed out: a new connection next time
            log.warning("head revision probe failed (%s): reading it in a session instead", exc)
            self.close(broken=True)
            return None
        return int(row[0]) if row else 0

    def close(self, *, broken: bool = False) -> None:
        """Give the connection back (a *broken* one is discarded: its state is unknown)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.invalidate() if broken else connection.close()
