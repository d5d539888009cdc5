"""200 agents, 500 random operator changes, with and without SIGKILLs: everyone converges (issue 3, C3).

Real server processes (supervisor, broker, datastore, fanout, auth), 200 real
agents with their own CURVE keys and connections (threads sharing one
ZeroMQ context). At the end each agent's view digest must equal the digest
the server computes for that node from the database, and every change the
operator was told had committed must be in the change log.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlmodel import select

from bus.errors import RemoteError
from bus.messages.datastore import (
    AclAdd,
    AclRemove,
    MemberAdd,
    MemberRemove,
    Mutated,
    NodeRename,
    RouteAdd,
    RouteRemove,
    VpnCreate,
)
from services.datastore.db import make_engine, reading
from services.datastore.models import Change
from tests.conftest import wait_until
from tests.helpers.server import AgentThread, CoterieServer, shared

AGENTS = 200
CHANGES = 500
VPNS = ["v0", "v1", "v2", "v3"]


@dataclass
class Model:
    """What the test believes the operator has done, to pick sensible random changes."""

    names: list[str]
    members: dict[str, set[str]]  # vpn -> node names
    routes: list[tuple[str, str, str]] = field(default_factory=list)
    acls: list[int] = field(default_factory=list)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[CoterieServer, list[AgentThread], Model]]:
    server = CoterieServer(tmp_path, presence_timeout=20.0).start()
    context = shared()
    agents: list[AgentThread] = []
    try:
        for i, vpn in enumerate(VPNS):
            server.mutate(VpnCreate, name=vpn, subnet=f"10.{40 + i}.0.0/22")
        model = Model(names=[], members={v: set() for v in VPNS})
        for i in range(AGENTS):
            name = f"n{i}"
            vpns = [VPNS[i % 4]] + ([VPNS[(i + 1) % 4]] if i % 5 == 0 else [])
            join = server.add_node(name, vpns)
            agents.append(AgentThread(tmp_path / "agents" / name, join, heartbeat=1.0, context=context))
            model.names.append(name)
            for vpn in vpns:
                model.members[vpn].add(name)
        for agent in agents:
            agent.start()
        assert wait_until(lambda: all(a.view is not None for a in agents), 120, interval=0.5)
        yield server, agents, model
    finally:
        for agent in agents:
            agent.agent.stop()
        for agent in agents:
            agent.thread.join(timeout=10)
        server.stop()
        context.term()


def _random_change(rng: random.Random, model: Model) -> tuple[type, dict[str, object]]:
    kind = rng.choice(["rename", "member_add", "member_remove", "route_add", "route_remove", "acl_add", "acl_remove"])
    vpn = rng.choice(VPNS)
    if kind == "rename":
        return NodeRename, {"name": rng.choice(model.names), "new_name": f"m{uuid.uuid4().hex[:8]}"}
    if kind == "member_add":
        return MemberAdd, {"node": rng.choice(model.names), "vpn": vpn}
    if kind == "member_remove" and len(model.members[vpn]) > 30:
        return MemberRemove, {"node": rng.choice(sorted(model.members[vpn])), "vpn": vpn}
    if kind == "route_add" and model.members[vpn]:
        node = rng.choice(sorted(model.members[vpn]))
        return RouteAdd, {"node": node, "vpn": vpn, "cidr": f"172.{16 + rng.randrange(16)}.{rng.randrange(256)}.0/24"}
    if kind == "route_remove" and model.routes:
        node, vpn, cidr = rng.choice(model.routes)
        return RouteRemove, {"node": node, "vpn": vpn, "cidr": cidr}
    if kind == "acl_remove" and model.acls:
        return AclRemove, {"id": rng.choice(model.acls)}
    src, dst = rng.choice(["any", rng.choice(model.names)]), rng.choice(model.names)
    return AclAdd, {"vpn": vpn, "src": src, "dst": dst, "proto": rng.choice(["any", "tcp"])}


def _apply_to_model(model: Model, kind: type, fields: dict[str, object], reply: Mutated) -> None:
    if kind is NodeRename:
        old, new = str(fields["name"]), str(fields["new_name"])
        model.names[model.names.index(old)] = new
        for members in model.members.values():
            if old in members:
                members.discard(old)
                members.add(new)
        model.routes = [(new if n == old else n, v, c) for n, v, c in model.routes]
    elif kind is MemberAdd:
        model.members[str(fields["vpn"])].add(str(fields["node"]))
    elif kind is MemberRemove:
        model.members[str(fields["vpn"])].discard(str(fields["node"]))
        model.routes = [r for r in model.routes if (r[0], r[1]) != (fields["node"], fields["vpn"])]
    elif kind is RouteAdd:
        model.routes.append((str(fields["node"]), str(fields["vpn"]), str(fields["cidr"])))
    elif kind is RouteRemove:
        model.routes.remove((str(fields["node"]), str(fields["vpn"]), str(fields["cidr"])))
    elif kind is AclAdd:
        model.acls.append(int(reply.summary.split("#")[1].split(" ")[0]))
    elif kind is AclRemove:
        model.acls.remove(int(str(fields["id"])))


def _burst(server: CoterieServer, model: Model, kills: dict[int, str]) -> dict[int, str]:
    """Send CHANGES random changes; SIGKILL the named process at the given indexes. Returns acked revisions."""
    rng = random.Random(3)
    acknowledged: dict[int, str] = {}
    for index in range(CHANGES):
        if index in kills:
            os.kill(server.pids()[kills[index]], signal.SIGKILL)
        kind, fields = _random_change(rng, model)
        try:
            reply = server.mutate(kind, **fields)
        except RemoteError as exc:
            if exc.code in ("conflict", "not_found", "invalid"):
                continue  # a random change that makes no sense now: refused, nothing committed
            raise
        acknowledged[reply.revision] = reply.summary
        _apply_to_model(model, kind, fields, reply)
    return acknowledged


def _converged(server: CoterieServer, agents: list[AgentThread]) -> bool:
    try:
        truth = server.server_views()
    except Exception:
        return False
    return all(truth.get(a.key) == a.digest for a in agents)


def _check(server: CoterieServer, agents: list[AgentThread], acknowledged: dict[int, str]) -> None:
    ok = wait_until(lambda: _converged(server, agents), 120, interval=1.0)
    if not ok:
        truth = server.server_views()
        behind = [a.name for a in agents if truth.get(a.key) != a.digest]
        pytest.fail(f"{len(behind)} agents did not converge, e.g. {behind[:5]}")
    engine = make_engine(server.database_url)
    try:
        with reading(engine) as session:
            log = {c.revision: c.summary for c in session.exec(select(Change)).all()}
    finally:
        engine.dispose()
    missing = {r: s for r, s in acknowledged.items() if log.get(r) != s}
    assert not missing, f"acknowledged changes lost: {missing}"
    assert len(acknowledged) >= CHANGES // 3, "too few changes were accepted for the test to mean anything"


def test_500_changes_reach_200_agents(fleet: tuple[CoterieServer, list[AgentThread], Model]) -> None:
    server, agents, model = fleet
    started = time.monotonic()
    acknowledged = _burst(server, model, kills={})
    _check(server, agents, acknowledged)
    assert time.monotonic() - started < 400


def test_500_changes_converge_through_sigkill_of_fanout_and_datastore(
    fleet: tuple[CoterieServer, list[AgentThread], Model],
) -> None:
    server, agents, model = fleet
    pids = server.pids()
    acknowledged = _burst(server, model, kills={150: "fanout", 300: "datastore"})
    after = server.pids()
    assert after["fanout"] != pids["fanout"] and after["datastore"] != pids["datastore"], "not restarted"
    _check(server, agents, acknowledged)
