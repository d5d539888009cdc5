"""A writer process for RELIABILITY S2: keeps committing across a PostgreSQL crash and restart.

``python -m tests.helpers.pg_writer URL COUNT`` makes up to COUNT logical
writes, each one ``db.transaction`` holding one ``repo.record`` with its own
idempotency key, and after each commit prints ``ack REVISION`` (flushed).

When the server goes away (``OperationalError``, or any DB-API error that
invalidated the connection) the writer prints ``retry ATTEMPT ERROR`` and
tries the same write again after a bounded backoff (50 ms doubling to 1 s). A
commit whose answer was lost with the connection may in fact have committed,
so every attempt first looks its idempotency key up (``repo.replayed``):
the write is acknowledged once, with the revision it really got, and never
applied twice. A write still failing after :data:`GIVE_UP` seconds ends the
process with status 3, so a test never waits on a writer that cannot recover.
"""

from __future__ import annotations

import sys
import time
import uuid

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from services.datastore import db, repo

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0
GIVE_UP = 60.0


def _retriable(exc: DBAPIError) -> bool:
    return isinstance(exc, OperationalError) or bool(exc.connection_invalidated)


def write_once(engine: Engine, key: str, index: int) -> int:
    """One logical write, idempotent by *key*: returns the revision it committed (now or before)."""
    with db.transaction(engine) as session:
        prior = repo.replayed(session, key)
        if prior is not None:
            return prior.revision
        change = repo.record(session, "test.write", f"write {index}", "pg_writer", [], [], idempotency_key=key)
    return change.revision


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.helpers.pg_writer URL COUNT", file=sys.stderr)
        return 2
    url, count = argv[0], int(argv[1])
    run = uuid.uuid4().hex[:12]
    engine = db.make_engine(url)
    db.migrate(engine)
    print("ready", flush=True)
    attempt = 0
    for index in range(count):
        key = f"{run}-{index}"
        delay, failing_since = BACKOFF_FIRST, None
        while True:
            try:
                revision = write_once(engine, key, index)
                break
            except DBAPIError as exc:
                if not _retriable(exc):
                    raise
                now = time.monotonic()
                failing_since = failing_since if failing_since is not None else now
                if now - failing_since > GIVE_UP:
                    print(f"giving up on write {index} after {GIVE_UP:.0f} s: {exc}", file=sys.stderr, flush=True)
                    return 3
                attempt += 1
                print(f"retry {attempt} {type(exc.orig).__name__}", flush=True)
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        print(f"ack {revision}", flush=True)
    print("done", flush=True)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
