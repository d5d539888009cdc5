"""A1 end to end: password logins, refusals, tokens, rehash and password change, each seen at the real agent.

Every refusal is checked where the person sees it: the one-line error of the real `coterie agent up`.
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bus.errors import RemoteError
from bus.messages.auth import (
    Enrolled,
    Login,
    TokenCreate,
    TokenCreated,
    TokenRevoke,
    UserAdd,
    UserAllow,
    UserLock,
)
from bus.messages.datastore import NodeDetail, NodeShowRequest, VpnCreate
from services.auth import passwords
from services.auth.service import REFUSED
from tests.helpers.server import CoterieServer
from tests.process.auth_helpers import (
    PASSWORD,
    START_TIMEOUT,
    AgentProcess,
    agent_up,
    anonymous_client,
    audit_entries,
    auth_request,
    login_args,
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoterieServer]:
    srv = CoterieServer(tmp_path).start(timeout=START_TIMEOUT)
    srv.mutate(VpnCreate, name="office", subnet="10.5.0.0/24")
    srv.mutate(VpnCreate, name="lab", subnet="10.6.0.0/24")
    auth_request(srv, UserAdd(name="alice", password=PASSWORD))
    auth_request(srv, UserAllow(name="alice", vpn="office"))
    auth_request(srv, UserAllow(name="alice", vpn="lab"))
    yield srv
    srv.stop()


pytestmark = pytest.mark.timeout(300)  # several real agent processes per test, on a shared machine


def _error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("coterie: error: ")
    return last.removeprefix("coterie: error: ")


def test_password_login_creates_the_node_in_the_users_vpns(server: CoterieServer, tmp_path: Path) -> None:
    state = tmp_path / "laptop"
    agent = AgentProcess(
        tmp_path, ["--state-dir", str(state), *login_args(server, "alice", "--node-name", "laptop")], PASSWORD + "\n"
    )
    try:
        assert agent.wait_for("logged in as alice: node laptop"), agent.text()
        assert agent.wait_for("snapshot at revision"), agent.text()
    finally:
        agent.stop()
    detail = server.request(NodeShowRequest(name="laptop"))
    assert isinstance(detail, NodeDetail)
    assert detail.node.enrolled and detail.node.vips == {"office": "10.5.0.1", "lab": "10.6.0.1"}
    # The next start needs no password: the node kept its own keys. Its stored view is current, so the
    # server resumes its stream on the first heartbeat instead of sending a snapshot.
    again = AgentProcess(tmp_path, ["--state-dir", str(state)], "")
    try:
        assert again.wait_for("resumed at revision"), again.text()
    finally:
        again.stop()
    entries = [e for e in audit_entries(server) if e.event == "login.ok"]
    assert len(entries) == 1 and entries[0].identity == "alice" and entries[0].source == "127.0.0.1"


def test_wrong_password_unknown_user_and_locked_user_get_one_refusal(server: CoterieServer, tmp_path: Path) -> None:
    auth_request(server, UserAdd(name="lockedout", password=PASSWORD))
    auth_request(server, UserLock(name="lockedout"))
    wrong = _error_line(agent_up(server, tmp_path / "a", *login_args(server, "alice"), stdin="not it\n"))
    unknown = _error_line(agent_up(server, tmp_path / "b", *login_args(server, "mallory"), stdin=PASSWORD + "\n"))
    locked = _error_line(agent_up(server, tmp_path / "c", *login_args(server, "lockedout"), stdin=PASSWORD + "\n"))
    assert wrong == unknown == locked == REFUSED
    failures = {e.identity: e.detail for e in audit_entries(server) if e.event == "login.fail"}
    assert failures == {"alice": "wrong password", "mallory": "unknown user", "lockedout": "user is locked"}
    assert not (tmp_path / "a" / "server.toml").exists(), "a refused agent must not think it is enrolled"


def test_unknown_user_and_wrong_password_take_the_same_time(server: CoterieServer) -> None:
    """A1: medians within 10%. Each attempt from its own loopback address and name, so no throttle interferes."""
    names = [f"u{i}" for i in range(12)]
    for name in names:
        auth_request(server, UserAdd(name=name, password=PASSWORD))
    timings: dict[str, list[float]] = {"wrong": [], "unknown": []}
    for i, name in enumerate(names):  # interleaved, so that load from other tests hits both alike
        for kind, user in (("wrong", name), ("unknown", f"ghost{i}")):
            with anonymous_client(server, source=f"127.0.{1 + i}.{10 if kind == 'wrong' else 20}") as client:
                started = time.perf_counter()
                with pytest.raises(RemoteError) as refused:
                    client.request("auth", Login(user=user, password="wrong password"))
                timings[kind].append(time.perf_counter() - started)
                assert refused.value.message == REFUSED
    wrong, unknown = statistics.median(timings["wrong"]), statistics.median(timings["unknown"])
    assert abs(wrong - unknown) <= 0.10 * max(wrong, unknown), timings


def test_weak_hash_is_upgraded_at_login(server: CoterieServer, tmp_path: Path) -> None:
    weak = passwords.hash_password(PASSWORD, opslimit=1, memlimit=8 * 1024 * 1024)
    with sqlite3.connect(server.home / "coterie.db") as db:
        db.execute("UPDATE appuser SET password_hash = ? WHERE name = 'alice'", (weak,))
    with anonymous_client(server) as client:
        reply = client.request("auth", Login(user="alice", password=PASSWORD, node_name="rehashed"))
    assert isinstance(reply, Enrolled) and reply.node == "rehashed"
    with sqlite3.connect(server.home / "coterie.db") as db:
        stored = db.execute("SELECT password_hash FROM appuser WHERE name = 'alice'").fetchone()[0]
    assert stored != weak and passwords.params_of(stored) == passwords.CURRENT
    assert passwords.verify_password(stored, PASSWORD)


def _token(server: CoterieServer, **fields: object) -> TokenCreated:
    reply = auth_request(server, TokenCreate(vpn="office", **fields))  # type: ignore[arg-type]
    assert isinstance(reply, TokenCreated)
    return reply


def test_token_enrolls_with_tags_and_is_refused_when_reused(server: CoterieServer, tmp_path: Path) -> None:
    once = _token(server, tags=["printer"])
    agent = AgentProcess(tmp_path, ["--state-dir", str(tmp_path / "p1"), "--join", once.join, "--node-name", "p1"], "")
    try:
        assert agent.wait_for("enrolled as node p1"), agent.text()
    finally:
        agent.stop()
    detail = server.request(NodeShowRequest(name="p1"))
    assert isinstance(detail, NodeDetail) and detail.node.tags == ["printer"] and "office" in detail.node.vips

    reused = _error_line(agent_up(server, tmp_path / "p2", "--join", once.join, "--node-name", "p2"))
    assert reused == "enrollment refused: this enrollment token has been used up; ask the operator for a new one"
    events = [(e.event, e.ok) for e in audit_entries(server) if e.event.startswith(("token", "enroll"))]
    assert events == [("token.use", True), ("enroll.fail", False)]


def test_revoked_and_expired_tokens_are_refused(server: CoterieServer, tmp_path: Path) -> None:
    revoked = _token(server, reusable=True)
    auth_request(server, TokenRevoke(id=revoked.id))
    line = _error_line(agent_up(server, tmp_path / "p3", "--join", revoked.join, "--node-name", "p3"))
    assert line == "enrollment refused: this enrollment token has been revoked; ask the operator for a new one"

    expired = _token(server, reusable=True)
    past = (datetime.now(UTC) - timedelta(minutes=1)).replace(tzinfo=None).isoformat(sep=" ")
    with sqlite3.connect(server.home / "coterie.db") as db:
        db.execute("UPDATE enrolltoken SET expires_at = ? WHERE id = ?", (past, expired.id))
    line = _error_line(agent_up(server, tmp_path / "p4", "--join", expired.join, "--node-name", "p4"))
    assert line == "enrollment refused: this enrollment token has expired; ask the operator for a new one"
    failures = [e.detail for e in audit_entries(server) if e.event == "enroll.fail"]
    assert len(failures) == 2 and "revoked" in failures[0] and "expired" in failures[1]


def test_reusable_token_with_a_use_limit(server: CoterieServer, tmp_path: Path) -> None:
    token = _token(server, reusable=True, uses=2)
    for name in ("r1", "r2"):
        agent = AgentProcess(
            tmp_path, ["--state-dir", str(tmp_path / name), "--join", token.join, "--node-name", name], ""
        )
        try:
            assert agent.wait_for(f"enrolled as node {name}"), agent.text()
        finally:
            agent.stop()
    line = _error_line(agent_up(server, tmp_path / "r3", "--join", token.join, "--node-name", "r3"))
    assert "used up" in line


def test_password_change_end_to_end(server: CoterieServer, tmp_path: Path) -> None:
    state = tmp_path / "desk"
    agent = AgentProcess(
        tmp_path, ["--state-dir", str(state), *login_args(server, "alice", "--node-name", "desk")], PASSWORD + "\n"
    )
    try:
        assert agent.wait_for("snapshot at revision"), agent.text()
        changed = _passwd(state, f"{PASSWORD}\nbrand new secret\n")
        assert changed.returncode == 0, changed.stderr
        assert "password of alice changed (confirmed by the server" in changed.stdout
        wrong_old = _passwd(state, "not the old one\nanother new one\n")
        assert _error_line(wrong_old) == f"password not changed: {REFUSED}"
    finally:
        agent.stop()
    old = _error_line(agent_up(server, tmp_path / "x", *login_args(server, "alice"), stdin=PASSWORD + "\n"))
    assert old == REFUSED
    with anonymous_client(server) as client:
        assert isinstance(
            client.request("auth", Login(user="alice", password="brand new secret", node_name="y")), Enrolled
        )
    events = [e.event for e in audit_entries(server)]
    assert "password.change" in events and "password.change.fail" in events
    from tests.conftest import wait_until

    assert wait_until(lambda: "password.ack" in [e.event for e in audit_entries(server)], 10)


def _passwd(state: Path, stdin: str):  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from tests.conftest import ROOT

    argv = [sys.executable, "-m", "tui.cli", "agent", "passwd", "--state-dir", str(state), "--password-stdin"]
    return subprocess.run(argv, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120)
