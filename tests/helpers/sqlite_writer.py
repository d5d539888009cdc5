"""A writer process for RELIABILITY S1: commit, then acknowledge, until killed.

``python -m tests.helpers.sqlite_writer URL COUNT`` makes up to COUNT commits,
each its own ``db.transaction`` holding one ``repo.record``, and after each
commit prints ``ack REVISION`` and flushes. A line on stdout is therefore a
promise that the revision is durable: the test SIGKILLs this process at an
arbitrary point and then checks every promise against the database file.
"""

from __future__ import annotations

import sys

from services.datastore import db, repo


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.helpers.sqlite_writer URL COUNT", file=sys.stderr)
        return 2
    url, count = argv[0], int(argv[1])
    engine = db.make_engine(url)
    db.migrate(engine)
    print("ready", flush=True)
    for index in range(count):
        with db.transaction(engine) as session:
            change = repo.record(session, "test.write", f"write {index}", "sqlite_writer", [], [])
        print(f"ack {change.revision}", flush=True)
    print("done", flush=True)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
