"""The operator's auth commands end to end: user, token and audit against a real server, as scripts use them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from bus.messages.auth import JoinString
from bus.messages.datastore import VpnCreate
from tests.conftest import ROOT, wait_until
from tests.helpers.server import CoterieServer
from tests.process.auth_helpers import START_TIMEOUT


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoterieServer]:
    srv = CoterieServer(tmp_path_factory.mktemp("authcli")).start(timeout=START_TIMEOUT)
    srv.mutate(VpnCreate, name="office", subnet="10.7.0.0/24")
    yield srv
    srv.stop()


def coterie(server: CoterieServer, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tui.cli", *args, "--dir", str(server.home)]
    return subprocess.run(argv, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.startswith("coterie: error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_user_lifecycle(server: CoterieServer) -> None:
    assert "added user bob" in ok(coterie(server, "user", "add", "bob", "--password-stdin", stdin="s3cret-pass\n"))
    ok(coterie(server, "user", "allow", "bob", "office"))
    ok(coterie(server, "user", "allow", "carol@corp", "office"))  # a realm user's row is made on demand
    users = {u["name"]: u for u in json.loads(ok(coterie(server, "user", "list", "--json")))}
    assert users["bob"]["kind"] == "local" and users["bob"]["vpns"] == ["office"] and not users["bob"]["locked"]
    assert users["carol@corp"]["kind"] == "realm"
    ok(coterie(server, "user", "lock", "bob"))
    assert json.loads(ok(coterie(server, "user", "list", "--json")))[0]["locked"] is True
    ok(coterie(server, "user", "unlock", "bob"))
    ok(coterie(server, "user", "disallow", "bob", "office"))
    assert "bob" in ok(coterie(server, "user", "list"))  # the table
    ok(coterie(server, "user", "remove", "bob"))
    assert "bob" not in {u["name"] for u in json.loads(ok(coterie(server, "user", "list", "--json")))}
    # The password never appears anywhere we print.
    assert "s3cret-pass" not in server.log_text()


@pytest.mark.parametrize(
    ("args", "stdin", "needle"),
    [
        (["user", "add", "dave", "--password-stdin"], "short\n", "at least 8 characters"),
        (["user", "add", "x y", "--password-stdin"], "long enough pw\n", "is invalid"),
        (["user", "add", "erin@corp", "--password-stdin"], "long enough pw\n", "realm user"),
        (["user", "add", "erin", "--password-stdin"], "", "no password on stdin"),
        (["user", "add", "erin"], "", "use --password-stdin"),
        (["user", "remove", "nobody"], "", "does not exist"),
        (["user", "allow", "nobody", "office"], "", "does not exist"),
        (["user", "allow", "x@corp", "novpn"], "", "does not exist"),
        (["token", "revoke", "9999"], "", "does not exist"),
        (["token", "create", "--vpn", "novpn"], "", "does not exist"),
    ],
)
def test_bad_input_gives_one_line_and_exit_1(server: CoterieServer, args: list[str], stdin: str, needle: str) -> None:
    assert needle in one_line_error(coterie(server, *args, stdin=stdin))


def test_duplicate_user_is_a_conflict(server: CoterieServer) -> None:
    ok(coterie(server, "user", "add", "frank", "--password-stdin", stdin="long enough pw\n"))
    assert "already exists" in one_line_error(
        coterie(server, "user", "add", "frank", "--password-stdin", stdin="long enough pw\n")
    )


def test_bad_expiry_is_a_usage_error(server: CoterieServer) -> None:
    one_line_error(coterie(server, "token", "create", "--vpn", "office", "--expires", "soon"), code=2)


def test_tokens_create_list_revoke(server: CoterieServer) -> None:
    created = json.loads(
        ok(
            coterie(
                server,
                "token",
                "create",
                "--vpn",
                "office",
                "--reusable",
                "--uses",
                "3",
                "--expires",
                "90m",
                "--tag",
                "ci",
                "--json",
            )
        )
    )
    join = JoinString.decode(created["join"])
    assert join.endpoints == [f"tcp://127.0.0.1:{server.port}"]
    human = ok(coterie(server, "token", "create", "--vpn", "office"))
    assert "join string:" in human and "coterie1:" in human
    tokens = {t["id"]: t for t in json.loads(ok(coterie(server, "token", "list", "--json")))}
    mine = tokens[created["id"]]
    assert (mine["vpn"], mine["max_uses"], mine["uses"], mine["tags"], mine["state"]) == (
        "office",
        3,
        0,
        ["ci"],
        "valid",
    )
    ok(coterie(server, "token", "revoke", str(created["id"])))
    tokens = {t["id"]: t for t in json.loads(ok(coterie(server, "token", "list", "--json")))}
    assert tokens[created["id"]]["state"] == "revoked"
    assert "revoked" in ok(coterie(server, "token", "list"))


def test_audit_lists_operator_actions_with_source(server: CoterieServer) -> None:
    ok(coterie(server, "user", "add", "gina", "--password-stdin", stdin="long enough pw\n"))
    entries = [json.loads(line) for line in ok(coterie(server, "audit", "--json", "--limit", "1000")).splitlines()]
    details = [(e["event"], e["identity"], e["source"], e["detail"]) for e in entries]
    assert ("operator", "operator:admin", "127.0.0.1", "added user gina") in details
    assert any(d[3].startswith("r1 created VPN office") for d in details), "datastore actions are audited too"
    human = ok(coterie(server, "audit", "--limit", "3"))
    assert len(human.splitlines()) == 3 and "added user gina" in human


def test_audit_follow_prints_new_entries(server: CoterieServer) -> None:
    argv = [sys.executable, "-m", "tui.cli", "audit", "--follow", "--json", "--dir", str(server.home)]
    follower = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []

    def read() -> None:  # a reader thread, so that the wait below is bounded in time
        assert follower.stdout is not None
        for line in follower.stdout:
            seen.append(json.loads(line)["detail"])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        ok(coterie(server, "user", "add", "hank", "--password-stdin", stdin="long enough pw\n"))
        assert wait_until(lambda: "added user hank" in seen, 30), seen[-5:]
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        reader.join(timeout=10)
