"""The datastore on a real PostgreSQL 15 server: schema, repository, concurrency, views, crash recovery.

SQLite is the default and the other tests cover it; these tests prove that
the same code is correct where PostgreSQL behaves differently: real
concurrency between connections (row locks and advisory locks instead of
SQLite's single writer), sequences, JSON columns, and a server that can
crash under a live client (RELIABILITY S2).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, func, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, select

from bus import errors
from bus.errors import RemoteError
from bus.messages.sync import NodeView
from services.datastore import db, repo
from services.datastore.models import (
    AclRule,
    Change,
    Counter,
    Delivery,
    GatewayRoute,
    JoinToken,
    Membership,
    Node,
)
from services.datastore.netmap import World
from tests.conftest import ROOT, wait_until
from tests.helpers.postgres import PostgresCluster
from tests.helpers.writer_process import WriterProcess

TABLES = set(SQLModel.metadata.tables) | {"alembic_version"}
WRITERS, WRITES_EACH = 4, 50
T = TypeVar("T")


def _head() -> str:
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    """An engine made the way the services make theirs, on a fresh empty database."""
    made = db.make_engine(pg_url)
    yield made
    made.dispose()


@pytest.fixture
def migrated(engine: Engine) -> Engine:
    db.migrate(engine)
    return engine


# ---------------------------------------------------------------------- helpers
def _log(
    session: Session,
    kind: str,
    vpn_ids: Iterable[int | None] = (),
    node_ids: Iterable[int | None] = (),
    key: str | None = None,
) -> Change:
    """The change-log row every mutation ends with (repo.record), as the service writes it."""
    return repo.record(session, kind, kind, "test", [i or 0 for i in vpn_ids], [i or 0 for i in node_ids], key)


def _vips(engine: Engine, vpn: str) -> dict[str, str]:
    with db.reading(engine) as s:
        rows = s.exec(
            select(Node.name, Membership.vip)
            .join(Membership, col(Membership.node_id) == col(Node.id))
            .where(Membership.vpn_id == repo.vpn_by_name(s, vpn).id)
        ).all()
        return dict(rows)


def _head_revision(engine: Engine) -> int:
    with db.reading(engine) as s:
        return repo.head_revision(s)


def _revisions(engine: Engine) -> list[int]:
    with db.reading(engine) as s:
        return list(s.exec(select(Change.revision).order_by(col(Change.revision))).all())


def _versions(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return [row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))]


# ---------------------------------------------------------------------- schema
def test_migrate_creates_the_schema_and_is_idempotent(engine: Engine) -> None:
    """On an empty database migrate builds exactly the models' schema; a second run changes nothing.

    Every service calls migrate at start, so the second call is the normal
    case and must neither fail nor touch data.
    """
    assert inspect(engine).get_table_names() == []
    db.migrate(engine)
    assert set(inspect(engine).get_table_names()) == TABLES
    assert _versions(engine) == [_head()]
    with engine.connect() as connection:
        drift = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert drift == [], f"the migrations and the models disagree on PostgreSQL: {drift}"

    with db.transaction(engine) as s:
        _log(s, "test.before-remigrate")
    db.migrate(engine)
    assert set(inspect(engine).get_table_names()) == TABLES
    assert _versions(engine) == [_head()]
    assert _revisions(engine) == [1]


def test_concurrent_migrations_are_serialised(pg_url: str) -> None:
    """Three services starting at once in threads, each with its own engine, all migrate without error.

    The advisory lock makes each upgrade wait for the previous one to commit,
    so they never overlap, not even in alembic's module-level context that
    threads share; the separate-process test below shows the database race
    (duplicate CREATE TABLE) that the lock prevents between services.
    """
    count = 3
    barrier = threading.Barrier(count, timeout=15)
    failures: list[BaseException] = []
    done: list[int] = []

    def start_service(index: int) -> None:
        engine = db.make_engine(pg_url)
        try:
            engine.connect().close()  # connect first, so that the three migrations start together
            barrier.wait()
            db.migrate(engine)
            done.append(index)
        except BaseException as exc:
            failures.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=start_service, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a migration hung"
    assert failures == []
    assert sorted(done) == list(range(count))
    checker = db.make_engine(pg_url)
    try:
        assert set(inspect(checker).get_table_names()) == TABLES
        assert _versions(checker) == [_head()]
    finally:
        checker.dispose()


MIGRATING_SERVICE = """
import sys, time
from pathlib import Path
from typing import TypeVar
from services.datastore import db
engine = db.make_engine(sys.argv[1])
engine.connect().close()
Path(sys.argv[3]).touch()
go = Path(sys.argv[2])
deadline = time.monotonic() + 20
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.005)
db.migrate(engine)
engine.dispose()
print("migrated", flush=True)
"""


def test_concurrent_migrations_from_separate_processes(pg_url: str, tmp_path: Path) -> None:
    """The real case: three service processes start at once and each migrates the same empty database.

    Threads share alembic's module-level context, so only separate processes
    show that the advisory lock alone serialises the migrations in the
    database. Each process connects first, then all are released together.
    """
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATING_SERVICE, pg_url, str(go), str(tmp_path / f"ready{i}")],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    outputs: list[tuple[int, str, str]] = []
    try:
        ready = wait_until(lambda: all((tmp_path / f"ready{i}").exists() for i in range(3)), timeout=20)
        go.touch()  # they wait for it, bounded to 20 s
        assert ready, "a migrating process never connected"
        for process in processes:
            out, err = process.communicate(timeout=40)
            outputs.append((process.returncode, out, err[-2000:]))
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
    assert [(code, out) for code, out, _ in outputs] == [(0, "migrated\n")] * 3, outputs
    checker = db.make_engine(pg_url)
    try:
        assert set(inspect(checker).get_table_names()) == TABLES
        assert _versions(checker) == [_head()]
    finally:
        checker.dispose()


# ---------------------------------------------------------------------- repository
def test_repository_mutations_end_to_end(migrated: Engine) -> None:
    """Every repository mutation, each in its own db.transaction, as the datastore service runs them.

    Checks the invariants that rest on the database: virtual IPs come from
    the subnet, are unique per VPN and are reused once freed; a refused
    mutation rolls back entirely and consumes no revision; renames carry into
    ACL rules; removals take their dependent rows with them; and the change
    log ends up exactly 1..N.
    """
    engine = migrated
    with db.transaction(engine) as s:
        office, _ = repo.create_vpn(s, "office", "10.20.0.0/29", "overlay", "mesh")  # 6 host addresses
        _log(s, "vpn.create", [office.id])
    with db.transaction(engine) as s:
        lab, _ = repo.create_vpn(s, "lab", "10.30.0.0/24", "overlay", "hub-spoke")
        _log(s, "vpn.create", [lab.id])
    with pytest.raises(RemoteError) as refused, db.transaction(engine) as s:
        repo.create_vpn(s, "office", "10.99.0.0/24", "overlay", "mesh")
    assert refused.value.code == errors.CONFLICT

    join_secrets: dict[str, str] = {}
    for name, vpns, tags in (("n1", ["office", "lab"], ["ops"]), ("n2", ["office"], []), ("n3", ["office"], [])):
        with db.transaction(engine) as s:
            node, secret, vpn_ids = repo.add_node(s, name, vpns, tags, 24)
            _log(s, "node.add", vpn_ids, [node.id])
        join_secrets[name] = secret
    assert _vips(engine, "office") == {"n1": "10.20.0.1", "n2": "10.20.0.2", "n3": "10.20.0.3"}
    assert _vips(engine, "lab") == {"n1": "10.30.0.1"}
    with db.reading(engine) as s:
        hashes = set(s.exec(select(JoinToken.secret_hash)).all())
    assert hashes == {repo.hash_secret(secret) for secret in join_secrets.values()}  # hashes only, never secrets

    # A freed address is the first one handed out again.
    with db.transaction(engine) as s:
        repo.remove_member(s, repo.node_by_name(s, "n2"), repo.vpn_by_name(s, "office"))
        _log(s, "member.remove")
    with db.transaction(engine) as s:
        node, _, vpn_ids = repo.add_node(s, "n4", ["office"], [], 24)
        _log(s, "node.add", vpn_ids, [node.id])
    assert _vips(engine, "office") == {"n1": "10.20.0.1", "n4": "10.20.0.2", "n3": "10.20.0.3"}
    with db.transaction(engine) as s:
        member = repo.add_member(s, repo.node_by_name(s, "n2"), repo.vpn_by_name(s, "office"), "gateway")
        _log(s, "member.add")
    assert (member.vip, member.role) == ("10.20.0.4", "gateway")

    # Refused mutations roll back whole and take no revision.
    head = _head_revision(engine)
    with pytest.raises(RemoteError) as refused, db.transaction(engine) as s:
        repo.add_member(s, repo.node_by_name(s, "n2"), repo.vpn_by_name(s, "office"), "member")
    assert refused.value.code == errors.CONFLICT
    assert _head_revision(engine) == head
    for name in ("n5", "n6"):
        with db.transaction(engine) as s:
            node, _, vpn_ids = repo.add_node(s, name, ["office"], [], 24)
            _log(s, "node.add", vpn_ids, [node.id])
    head = _head_revision(engine)
    with pytest.raises(RemoteError) as refused, db.transaction(engine) as s:
        repo.add_node(s, "n7", ["office"], [], 24)  # the node row is flushed before the address runs out
    assert refused.value.code == errors.CONFLICT and "no free address" in refused.value.message
    with db.reading(engine) as s:
        assert s.exec(select(Node).where(Node.name == "n7")).first() is None, "a refused add_node left its node"
    assert _head_revision(engine) == head
    office_vips = _vips(engine, "office")
    assert sorted(office_vips.values()) == [f"10.20.0.{i}" for i in range(1, 7)]

    # Routes: only through a member, never twice, and gone with the membership.
    with db.transaction(engine) as s:
        cidr = repo.add_route(s, repo.node_by_name(s, "n2"), repo.vpn_by_name(s, "office"), "192.168.50.0/24")
        _log(s, "route.add")
    assert cidr == "192.168.50.0/24"
    with pytest.raises(RemoteError) as refused, db.transaction(engine) as s:
        repo.add_route(s, repo.node_by_name(s, "n1"), repo.vpn_by_name(s, "office"), "192.168.50.0/24")
    assert refused.value.code == errors.CONFLICT
    with pytest.raises(RemoteError) as refused, db.transaction(engine) as s:
        repo.add_route(s, repo.node_by_name(s, "n3"), repo.vpn_by_name(s, "lab"), "192.168.60.0/24")
    assert refused.value.code == errors.INVALID
    with db.transaction(engine) as s:
        repo.remove_route(s, repo.node_by_name(s, "n2"), repo.vpn_by_name(s, "office"), "192.168.50.0/24")
        repo.add_route(s, repo.node_by_name(s, "n2"), repo.vpn_by_name(s, "office"), "192.168.51.0/24")
        _log(s, "route.change")
    with db.transaction(engine) as s:
        repo.remove_member(s, repo.node_by_name(s, "n2"), repo.vpn_by_name(s, "office"))
        _log(s, "member.remove")
    with db.reading(engine) as s:
        assert s.exec(select(GatewayRoute)).all() == []

    # ACL rules follow a rename and can be removed once.
    with db.transaction(engine) as s:
        rule = repo.add_acl(s, repo.vpn_by_name(s, "office"), "tag:ops", "n3", "tcp", "22,8000-8100")
        _log(s, "acl.add")
    with pytest.raises(RemoteError) as refused, db.transaction(engine) as s:
        repo.add_acl(s, repo.vpn_by_name(s, "office"), "any", "any", "icmp", "22")
    assert refused.value.code == errors.INVALID
    with db.transaction(engine) as s:
        repo.rename_node(s, "n3", "web1")
        _log(s, "node.rename")
    with db.reading(engine) as s:
        stored = s.get(AclRule, rule.id)
        assert stored is not None and (stored.src, stored.dst, stored.ports) == ("tag:ops", "web1", "22,8000-8100")
    with db.transaction(engine) as s:
        repo.remove_acl(s, rule.id or 0)
        _log(s, "acl.remove")
    with pytest.raises(RemoteError) as refused, db.transaction(engine) as s:
        repo.remove_acl(s, rule.id or 0)
    assert refused.value.code == errors.NOT_FOUND

    # Removing a node or a VPN takes its dependent rows; the database refuses dangling references.
    with db.transaction(engine) as s:
        node, vpn_ids = repo.remove_node(s, "n4")
        _log(s, "node.remove", vpn_ids)
    assert "n4" not in _vips(engine, "office")
    with db.transaction(engine) as s:
        vpn_ids, node_ids, _ = repo.delete_vpn(s, "lab")
        _log(s, "vpn.delete", vpn_ids, node_ids)
    with db.reading(engine) as s:
        assert [m.vpn_id for m in s.exec(select(Membership)).all()] == [office.id] * 4  # n1, web1, n5, n6
        assert len(s.exec(select(JoinToken)).all()) == 5  # n1, n2, n3 (web1), n5, n6
    with pytest.raises(IntegrityError, match="foreign key"), db.transaction(engine) as s:
        s.add(Membership(node_id=9999, vpn_id=office.id or 0, vip="10.20.0.2"))
        s.flush()

    revisions = _revisions(engine)
    assert revisions == list(range(1, len(revisions) + 1)), "the change log has a gap or a duplicate"
    assert _head_revision(engine) == revisions[-1] == 18  # the 18 mutations that were not refused


def test_idempotency_key_replays_the_stored_change(migrated: Engine) -> None:
    """A request retried with the same idempotency key finds the change it already made (repo.replayed).

    The unique index is what makes a replay safe even when the first attempt's
    answer was lost: a second record with the same key cannot commit.
    """
    with db.transaction(migrated) as s:
        vpn, summary = repo.create_vpn(s, "office", "10.40.0.0/24", "overlay", "mesh")
        first = repo.record(s, "vpn.create", summary, "admin", [vpn.id or 0], [], "req-0001")
    with db.transaction(migrated) as s:
        _log(s, "other.change", key="req-0002")
    with db.reading(migrated) as s:
        replay = repo.replayed(s, "req-0001")
        assert replay is not None
        assert (replay.revision, replay.kind, replay.summary, replay.actor, replay.vpn_ids) == (
            first.revision,
            "vpn.create",
            summary,
            "admin",
            [vpn.id],
        )
        assert repo.replayed(s, "req-9999") is None
        assert repo.replayed(s, None) is None
        assert repo.replayed(s, "") is None
    head = _head_revision(migrated)
    with pytest.raises(IntegrityError), db.transaction(migrated) as s:
        _log(s, "duplicate", key="req-0001")
    assert _head_revision(migrated) == head == 2
    assert _revisions(migrated) == [1, 2]


def test_concurrent_writers_get_every_revision_once(pg_url: str, migrated: Engine) -> None:
    """4 threads x 50 commits, each thread with its own engine: revisions 1..200, no duplicate, no gap.

    This is the ``SELECT ... FOR UPDATE`` on the counter row: without it two
    writers read the same value and one fails on the change table's key (or,
    worse, commits out of order). A reader polls the log meanwhile: since
    revisions commit in order, no snapshot may ever show a hole.

    The counter row is created by the first write (see the known-bug test
    below), so thread 0 makes its first write before the others start.
    """
    failures: list[BaseException] = []
    made: dict[int, list[int]] = {i: [] for i in range(WRITERS)}
    first_written = threading.Event()
    stop_reading = threading.Event()
    holes: list[tuple[int, int | None]] = []
    snapshots: list[int] = []

    def writer(index: int) -> None:
        engine = db.make_engine(pg_url)
        try:
            if index != 0 and not first_written.wait(timeout=15):
                raise TimeoutError("writer 0 never made its first write")
            for n in range(WRITES_EACH):
                with db.transaction(engine) as s:
                    change = _log(s, "test.write", key=f"w{index}-{n}")
                made[index].append(change.revision)
                first_written.set()
        except BaseException as exc:
            failures.append(exc)
        finally:
            first_written.set()
            engine.dispose()

    def reader() -> None:
        deadline = time.monotonic() + 50
        while not stop_reading.is_set() and time.monotonic() < deadline:
            with db.reading(migrated) as s:
                count, top = s.exec(select(func.count(), func.max(Change.revision))).one()
            snapshots.append(count)
            if count != (top or 0):
                holes.append((count, top))
            time.sleep(0.002)

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(WRITERS)]
    watcher = threading.Thread(target=reader, daemon=True)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=45)
    stop_reading.set()
    watcher.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    assert failures == []
    everything = sorted(r for revisions in made.values() for r in revisions)
    assert everything == list(range(1, WRITERS * WRITES_EACH + 1))
    for revisions in made.values():
        assert revisions == sorted(revisions), "one writer's later commit got an earlier revision"
    assert _revisions(migrated) == everything
    with db.reading(migrated) as s:
        counter = s.get(Counter, repo.REVISION)
        assert counter is not None and counter.value == WRITERS * WRITES_EACH
    assert len(snapshots) > 5, "the reader never ran while the writers did"
    assert holes == [], f"a reader saw a revision before an earlier one: {holes[:5]}"


def _wait_for_lock_waiter(engine: Engine) -> bool:
    """Whether some other connection to this database is blocked on a lock (polled, bounded to 10 s)."""

    def waiting() -> bool:
        with engine.connect() as connection:
            query = text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return bool(connection.execute(query).scalar())

    return wait_until(waiting, timeout=10)


def _race(engine: Engine, first: Callable[[Session], object], second: Callable[[Session], T]) -> T:
    """Run *second* in its own transaction while *first*'s transaction is open and holds its locks.

    *second* is started once *first* has run (uncommitted), it is confirmed
    blocked on a lock, then *first* commits; returns what *second* returned,
    or raises what it raised.
    """
    values: list[T] = []
    raised: list[BaseException] = []

    def run_second() -> None:
        try:
            with db.transaction(engine) as s:
                values.append(second(s))
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run_second, daemon=True)
    with db.transaction(engine) as s:
        first(s)
        thread.start()
        assert _wait_for_lock_waiter(engine), "the second transaction never blocked on the first"
    thread.join(timeout=30)
    assert not thread.is_alive(), "the second transaction hung after the first committed"
    if raised:
        raise raised[0]
    return values[0]


def test_fixed_bug_first_two_writers_race_on_the_counter_row(migrated: Engine) -> None:
    """The very first writes to a fresh PostgreSQL database must serialise like all later ones."""
    revision = _race(
        migrated,
        lambda s: _log(s, "first"),
        lambda s: _log(s, "second").revision,
    )
    assert revision == 2


def test_fixed_bug_concurrent_joins_pick_the_same_address(migrated: Engine) -> None:
    """Two nodes added to one VPN at the same time must both succeed, with different addresses."""
    with db.transaction(migrated) as s:
        vpn, _ = repo.create_vpn(s, "office", "10.50.0.0/24", "overlay", "mesh")
        _log(s, "vpn.create", [vpn.id])

    def join(name: str) -> Callable[[Session], str]:
        def apply(s: Session) -> str:
            node, _, vpn_ids = repo.add_node(s, name, ["office"], [], 24)
            _log(s, "node.add", vpn_ids, [node.id])
            member = repo.membership(s, node, repo.vpn_by_name(s, "office"))
            assert member is not None
            return member.vip

        return apply

    second_vip = _race(migrated, join("a"), join("b"))
    assert _vips(migrated, "office") == {"a": "10.50.0.1", "b": second_vip}
    assert second_vip == "10.50.0.2"


# ---------------------------------------------------------------------- views
def _build_world(engine: Engine) -> None:
    """One fixed history of mutations touching every kind of row a view is made of.

    Deliberately free of "delete the newest row, then insert": SQLite reuses
    such ids and PostgreSQL does not (reported separately), and ids show in
    views (ACL rule ids).
    """
    steps: list[tuple[str, Callable[[Session], object]]] = [
        ("vpn.create", lambda s: repo.create_vpn(s, "office", "10.1.0.0/24", "overlay", "mesh")),
        ("vpn.create", lambda s: repo.create_vpn(s, "old", "10.9.0.0/24", "overlay", "mesh")),
        ("vpn.create", lambda s: repo.create_vpn(s, "lab", "10.2.0.0/24", "overlay", "hub-spoke")),
        ("vpn.create", lambda s: repo.create_vpn(s, "dmz", "10.3.0.0/28", "native", "mesh")),
        ("node.add", lambda s: repo.add_node(s, "alpha", ["office", "lab", "old"], ["ops", "admin"], 24)),
        ("node.add", lambda s: repo.add_node(s, "beta", ["office", "lab"], ["dev"], 24)),
        ("node.add", lambda s: repo.add_node(s, "gamma", ["office", "dmz"], [], 24)),
        ("node.add", lambda s: repo.add_node(s, "delta", ["lab", "old"], ["dev"], 24)),
        ("node.add", lambda s: repo.add_node(s, "eps", ["dmz"], ["web"], 24)),
        ("node.add", lambda s: repo.add_node(s, "hub1", [], ["infra"], 24)),
        ("node.add", lambda s: repo.add_node(s, "zeta", [], [], 24)),
        ("member.add", lambda s: repo.add_member(s, repo.node_by_name(s, "hub1"), repo.vpn_by_name(s, "lab"), "hub")),
        ("member.add", lambda s: repo.add_member(s, _n(s, "zeta"), repo.vpn_by_name(s, "office"), "gateway")),
        ("route.add", lambda s: repo.add_route(s, _n(s, "zeta"), repo.vpn_by_name(s, "office"), "192.168.20.0/24")),
        ("route.add", lambda s: repo.add_route(s, _n(s, "zeta"), repo.vpn_by_name(s, "office"), "192.168.10.0/24")),
        ("route.add", lambda s: repo.add_route(s, _n(s, "hub1"), repo.vpn_by_name(s, "lab"), "172.16.0.0/16")),
        ("acl.add", lambda s: repo.add_acl(s, repo.vpn_by_name(s, "office"), "tag:ops", "any", "tcp", "22")),
        ("acl.add", lambda s: repo.add_acl(s, repo.vpn_by_name(s, "office"), "beta", "tag:ops", "udp", "5000-5100")),
        ("acl.add", lambda s: repo.add_acl(s, repo.vpn_by_name(s, "dmz"), "gamma", "any", "any", "")),
        ("acl.add", lambda s: repo.add_acl(s, repo.vpn_by_name(s, "dmz"), "tag:web", "gamma", "tcp", "80,443")),
        ("acl.add", lambda s: repo.add_acl(s, repo.vpn_by_name(s, "dmz"), "eps", "any", "icmp", "")),
        ("acl.remove", lambda s: repo.remove_acl(s, 3)),  # not the newest rule: no id for SQLite to reuse
        ("node.update", lambda s: _enroll(s, "alpha", "A", online=True, nat="public")),
        ("node.update", lambda s: _enroll(s, "zeta", "Z", online=False, nat="nat")),
        ("node.update", lambda s: _enroll(s, "eps", "E", online=True, nat="pat")),
        ("node.rename", lambda s: repo.rename_node(s, "beta", "beta2")),
        ("member.remove", lambda s: repo.remove_member(s, _n(s, "gamma"), repo.vpn_by_name(s, "office"))),
        ("node.add", lambda s: repo.add_node(s, "theta", ["office"], [], 24)),  # takes gamma's freed address
        ("node.remove", lambda s: repo.remove_node(s, "delta")),
        ("vpn.delete", lambda s: repo.delete_vpn(s, "old")),
    ]
    for kind, apply in steps:
        with db.transaction(engine) as s:
            apply(s)
            nodes = [n.id for n in s.exec(select(Node).order_by(col(Node.id))).all()][:2]
            _log(s, kind, [1], nodes)


def _n(session: Session, name: str) -> Node:
    return repo.node_by_name(session, name)


def _enroll(session: Session, name: str, letter: str, online: bool, nat: str) -> None:
    """What enrollment and presence write on a node: keys, endpoints (JSON lists), NAT class, online."""
    node = repo.node_by_name(session, name)
    node.curve_key = letter * 40
    node.sign_key = letter.lower() * 64
    node.endpoints = [f"192.0.2.{ord(letter)}:7871", f"[2001:db8::{ord(letter):x}]:7871"]
    node.public_endpoint = f"203.0.113.{ord(letter)}:7871"
    node.nat_class = nat
    node.online = online
    session.add(node)
    session.flush()


def _views(engine: Engine) -> tuple[dict[str, NodeView], list[tuple[object, ...]]]:
    """Every node's view (by name) and the change log with the nodes each change reaches."""
    with db.reading(engine) as s:
        world = World.load(s)
        views = {node.name: world.view(node_id) for node_id, node in world.nodes.items()}
        log = [
            (
                c.revision,
                c.kind,
                c.summary,
                c.vpn_ids,
                c.node_ids,
                sorted(world.nodes[n].name for n in world.affected(c)),
            )
            for c in s.exec(select(Change).order_by(col(Change.revision))).all()
        ]
    return views, log


def test_views_on_postgresql_equal_views_on_sqlite(migrated: Engine, tmp_path: Path) -> None:
    """The same history on both backends gives every node the same view, digest for digest.

    Nodes verify digests, so a backend that returned rows in another order,
    another type (JSON, booleans) or another id would make agents resync
    forever on one backend only.
    """
    sqlite = db.make_engine(f"sqlite:///{tmp_path / 'coterie.db'}")
    try:
        db.migrate(sqlite)
        _build_world(sqlite)
        _build_world(migrated)
        lite_views, lite_log = _views(sqlite)
        pg_views, pg_log = _views(migrated)
    finally:
        sqlite.dispose()

    assert pg_log == lite_log
    assert sorted(pg_views) == ["alpha", "beta2", "eps", "gamma", "hub1", "theta", "zeta"]
    assert {n: v.digest() for n, v in pg_views.items()} == {n: v.digest() for n, v in lite_views.items()}
    assert pg_views == lite_views

    # The views are not trivially equal: they hold what each feature put there.
    alpha, zeta, eps = pg_views["alpha"], pg_views["zeta"], pg_views["eps"]
    assert set(alpha.vpns) == {"office", "lab"} and alpha.vpns["lab"].role == "member"
    assert alpha.peers["zeta"].routes[0].cidr == "192.168.10.0/24"  # ordered by CIDR, as stored
    assert [r.cidr for r in alpha.peers["zeta"].routes] == ["192.168.10.0/24", "192.168.20.0/24"]
    assert alpha.peers["hub1"].routes[0].cidr == "172.16.0.0/16"
    assert "beta2" in alpha.peers and "theta" in alpha.peers
    assert zeta.peers.keys() == {"alpha"}, "office has ACL rules: zeta may reach only the ops node"
    assert pg_views["hub1"].peers.keys() == {"alpha", "beta2"}, "the hub sees every lab member"
    assert pg_views["beta2"].peers["alpha"].vips == {"office": alpha.vpns["office"].vip}, "lab: neither is a hub"
    assert [a.id for a in pg_views["gamma"].acl] == [4, 5]  # dmz rules 4 and 5; rule 3 was removed
    assert eps.peers["gamma"].endpoints == []
    assert zeta.vpns["office"].routes == ["192.168.10.0/24", "192.168.20.0/24"]
    assert alpha.peers["zeta"].endpoints == ["192.0.2.90:7871", "[2001:db8::5a]:7871"]
    assert alpha.peers["zeta"].online is False and pg_views["zeta"].peers["alpha"].online is True
    assert pg_views["theta"].vpns["office"].vip == "10.1.0.3", "theta takes the address gamma freed"


def test_fixed_bug_sqlite_reuses_the_id_of_a_deleted_acl_rule(migrated: Engine, tmp_path: Path) -> None:
    """Remove the newest ACL rule and add another: both backends must number the new rule alike."""
    sqlite = db.make_engine(f"sqlite:///{tmp_path / 'coterie.db'}")
    ids = []
    try:
        db.migrate(sqlite)
        for engine in (sqlite, migrated):
            with db.transaction(engine) as s:
                vpn, _ = repo.create_vpn(s, "office", "10.1.0.0/24", "overlay", "mesh")
                first = repo.add_acl(s, vpn, "any", "any", "tcp", "22")
            with db.transaction(engine) as s:
                repo.remove_acl(s, first.id or 0)
            with db.transaction(engine) as s:
                ids.append((first.id, repo.add_acl(s, repo.vpn_by_name(s, "office"), "any", "any", "tcp", "80").id))
    finally:
        sqlite.dispose()
    assert ids[0] == ids[1] == (1, 2), f"(first, next) rule ids: SQLite {ids[0]}, PostgreSQL {ids[1]}"


# ---------------------------------------------------------------------- RELIABILITY S2
def test_writer_survives_an_immediate_restart(postgres: PostgresCluster, pg_url: str) -> None:
    """RELIABILITY S2, one server: a crash-like restart under a live writer loses no acknowledged write.

    The writer (a real process) retries on OperationalError with bounded
    backoff and an idempotency key per write; the server is down for a
    second so that the writer must see the outage. Pass: it did, its writes
    resume within 30 s of the crash, and every revision it acknowledged is in
    the change table, which is still gap-free with each write applied once.
    """
    engine = db.make_engine(pg_url)
    db.migrate(engine)
    engine.dispose()
    writer = WriterProcess("tests.helpers.pg_writer", pg_url, 100_000)
    try:
        assert writer.wait_acks(100, timeout=20), f"no 100 acks before the restart: {writer.diagnostics()}"
        crashed_at = time.monotonic()
        before = len(writer.acked)
        postgres.restart(mode="immediate", down_for=1.0)
        back_at = time.monotonic()
        assert writer.wait_acks(50, timeout=30, after=back_at), f"writes did not resume: {writer.diagnostics()}"
        resumed_at = min(at for at, _ in writer.acks if at > back_at)
        assert writer.process.poll() is None, f"the writer gave up: {writer.diagnostics()}"
    finally:
        writer.close()
    acked = writer.acked
    assert resumed_at - crashed_at < 30, "writes resumed more than 30 s after the crash"
    assert writer.retries, "the writer never saw the outage: the restart did not test anything"
    assert len(acked) > before + 50
    assert len(set(acked)) == len(acked) and acked == sorted(acked), "an acknowledged revision came twice"

    checker = db.make_engine(pg_url)
    try:
        revisions = _revisions(checker)
        with db.reading(checker) as s:
            keys = s.exec(select(Change.idempotency_key)).all()
    finally:
        checker.dispose()
    missing = sorted(set(acked) - set(revisions))
    assert not missing, f"acknowledged before the crash but lost: {missing[:20]}"
    assert revisions == list(range(1, len(revisions) + 1)), "gap in the change log after crash recovery"
    assert len(set(keys)) == len(keys) == len(revisions), "a retried write was applied twice"


def test_receipts_do_not_wait_for_an_open_mutation(migrated: Engine) -> None:
    """The fanout's receipt writes (serialised=False) pass an operator's open mutation, and it theirs.

    In a burst of 1,000 changes the fanout wrote tens of thousands of receipt rows under the writers' lock, and
    the operators' mutations queued behind them (about 5 commits a second on PostgreSQL).
    """
    with db.transaction(migrated) as s:
        node, _, _ = repo.add_node(s, "n1", [], [], 24.0)
        change = _log(s, "node.add", node_ids=[node.id])
    done = threading.Event()

    def write_receipt() -> None:
        with db.transaction(migrated, serialised=False) as s:
            s.add(Delivery(revision=change.revision, node_id=node.id or 0))
        done.set()

    with db.transaction(migrated) as s:  # an operator's mutation, holding the writers' lock
        _log(s, "node.set", node_ids=[node.id])
        thread = threading.Thread(target=write_receipt, daemon=True)
        thread.start()
        assert done.wait(30), "the receipt waited for the mutation's lock"
    thread.join(timeout=30)
    with db.reading(migrated) as s:
        assert s.exec(select(Delivery)).one().node_id == node.id
        assert repo.head_revision(s) == change.revision + 1


def test_head_probe_sees_commits_idles_outside_transactions_and_survives_a_restart(
    postgres: PostgresCluster, migrated: Engine
) -> None:
    """The fanout's 50-a-second poll (db.HeadProbe) on PostgreSQL: each commit seen at once, its backend
    never left "idle in transaction" (which would hold back vacuum for the server's life), and a server
    restart costs one "unknown" answer, not a wrong one."""
    probe = db.HeadProbe(migrated)
    try:
        assert probe() == _head_revision(migrated)
        with db.transaction(migrated) as s:
            node, _, _ = repo.add_node(s, "n1", [], [], 24.0)
            change = _log(s, "node.add", node_ids=[node.id])
        assert probe() == change.revision
        with migrated.connect() as connection:
            idle = connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = :s"),
                {"s": "idle in transaction"},
            ).scalar_one()
        assert idle == 0, "the probe left its connection inside a transaction"
        postgres.restart(mode="immediate", down_for=0.5)
        answers = [probe() for _ in range(2)]
        assert answers[-1] == change.revision, f"no head after the restart: {answers}"
        assert set(answers) <= {None, change.revision}, f"a wrong head after the restart: {answers}"
    finally:
        probe.close()
