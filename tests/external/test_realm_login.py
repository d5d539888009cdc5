"""End to end: agents log in as ``alice@corp`` (LDAP, real slapd) and ``bob@radius`` (real FreeRADIUS).

One real server (``coterie server up``) for the module reads both realms from its
config.toml; the agent uses the real login path (nodeagent.login), then runs
and receives a view that holds the VPN its user is allowed into. A wrong
password, a realm whose directory is down and an unknown realm each get the
refusal the agent prints, and the audit log says which realm said what.
"""

from __future__ import annotations

import secrets
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from bus.messages.auth import AuditLog, AuditRequest, UserAllow
from bus.messages.datastore import VpnCreate
from bus.messages.sync import NodeView
from nodeagent.agent import Agent, EnrollmentError
from nodeagent.login import login, server_key_from
from nodeagent.state import StateDir
from tests.conftest import wait_until
from tests.helpers.freeradius import FreeRadius, FreeRadiusUnavailable
from tests.helpers.server import CoterieServer, free_port
from tests.helpers.slapd import SUFFIX, Slapd, SlapdUnavailable, person

ALICE_PW = "alice's directory password"
BOB_PW = "bob's radius password"
RADIUS_SECRET = "coterie-radius-secret"


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("realm-login")


@pytest.fixture(scope="module")
def directories(tmp_module: Path) -> Iterator[tuple[Slapd, FreeRadius]]:
    tmp_path = tmp_module
    try:
        ldap = Slapd(tmp_path / "slapd", person("alice", ALICE_PW))
        radius = FreeRadius(tmp_path / "radius", RADIUS_SECRET, {"bob": BOB_PW})
    except (SlapdUnavailable, FreeRadiusUnavailable) as exc:
        pytest.skip(str(exc))
    try:
        yield ldap.start(), radius.start()
    finally:
        radius.stop()
        ldap.stop()


@pytest.fixture(scope="module")
def server(tmp_module: Path, directories: tuple[Slapd, FreeRadius]) -> Iterator[CoterieServer]:
    """One server for the module (it takes a while to start on a busy machine)."""
    ldap, radius = directories
    server = CoterieServer(tmp_module)
    path = server.home / "config.toml"
    config = tomllib.loads(path.read_text())
    config["realms"] = {
        "corp": {"kind": "ldap", "url": ldap.url, "base_dn": SUFFIX, "timeout": 2.0},
        "radius": {"kind": "radius", "server": "127.0.0.1", "port": radius.port, "secret": RADIUS_SECRET},
        "gone": {"kind": "ldap", "url": f"ldap://127.0.0.1:{free_port()}", "base_dn": SUFFIX, "timeout": 1.0},
    }
    path.write_text(tomli_w.dumps(config))
    try:
        yield server.start()
    finally:
        server.stop()


def agent_login(server: CoterieServer, state_dir: Path, user: str, password: str) -> str:
    state = StateDir(state_dir)
    server_key = server_key_from(str(server.home / "keys" / "server.pub"))
    name = f"n-{secrets.token_hex(4)}"  # one server serves the module: node names must not repeat
    info = login(state, f"tcp://127.0.0.1:{server.port}", server_key, user, password, node_name=name, timeout=20.0)
    return info.node


def view_of(agent: Agent) -> NodeView:
    return agent.replica.view or NodeView(node="")


def test_realm_users_log_in_and_get_their_vpn(server: CoterieServer, tmp_path: Path) -> None:
    server.mutate(VpnCreate, name="office", subnet="10.40.0.0/24")
    for user in ("alice@corp", "bob@radius"):
        server.request(UserAllow(name=user, vpn="office"), service="auth")

    nodes = {
        user: agent_login(server, tmp_path / user, user, password)
        for user, password in (("alice@corp", ALICE_PW), ("bob@radius", BOB_PW))
    }
    assert len(set(nodes.values())) == 2

    # The logged-in node runs with its own keys and receives a view with the VPN its user may join.
    agent = Agent(StateDir(tmp_path / "alice@corp"), heartbeat=0.5, timeout=2.0)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: "office" in view_of(agent).vpns, 30), "alice's node never got the office VPN"
        assert wait_until(lambda: nodes["bob@radius"] in view_of(agent).peers, 30), view_of(agent)
    finally:
        agent.stop()
        thread.join(timeout=10)

    audit = server.request(AuditRequest(limit=1000), service="auth")
    assert isinstance(audit, AuditLog)
    logins = {(e.identity, e.ok) for e in audit.entries if "login" in e.event}
    assert ("alice@corp", True) in logins and ("bob@radius", True) in logins


@pytest.mark.parametrize(
    "user, password, refusal, audited",
    [
        ("alice@corp", "wrong", "wrong user name or password", "realm corp: rejected: invalid credentials"),
        ("alice@corp", "", "wrong user name or password", "realm corp: empty password"),
        ("nobody@corp", ALICE_PW, "wrong user name or password", "realm corp: no such user"),
        ("bob@radius", "wrong", "wrong user name or password", "realm radius: rejected"),
        ("bob@nowhere", BOB_PW, "wrong user name or password", "no realm named 'nowhere'"),
        ("alice@gone", ALICE_PW, "unreachable", ""),
    ],
)
def test_refusals_reach_the_agent_and_the_audit(
    server: CoterieServer, tmp_path: Path, user: str, password: str, refusal: str, audited: str
) -> None:
    with pytest.raises(EnrollmentError, match=refusal):
        agent_login(server, tmp_path / "node", user, password)
    # A success clears this source's failure count, so that the next case is not throttled instead.
    agent_login(server, tmp_path / "good", "bob@radius", BOB_PW)
    if audited:
        audit = server.request(AuditRequest(limit=1000), service="auth")
        assert isinstance(audit, AuditLog)
        details = [e.detail for e in audit.entries if e.identity == user and not e.ok]
        assert any(audited in d for d in details), details
