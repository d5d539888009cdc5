"""World.advance: the fanout's incremental reread gives the views a full load gives.

Why: at 10,000 nodes a full load costs the fanout about a second per batch,
so batches of presence, endpoints, path pins, routes and ACL rules reread
only what those changes touch. If the reread ever missed a row, a node would
be sent a stale view and never told: so after every step of random
mutation sequences, every node's view from the advanced world must equal the
view from a fresh load of the same database state.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from services.datastore import repo
from services.datastore.db import make_engine, migrate, reading, transaction
from services.datastore.models import AclRule, Change, GatewayRoute, Node
from services.datastore.netmap import World

NODES = 8
STEPS = 40


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'coterie.db'}")
    migrate(engine)
    with transaction(engine) as s:
        repo.create_vpn(s, "office", "10.1.0.0/24", "overlay", "mesh")
        repo.create_vpn(s, "field", "10.2.0.0/24", "overlay", "hub-spoke")
        for i in range(NODES):
            node, _, _ = repo.add_node(s, f"n{i}", ["office"] if i % 2 else ["office", "field"], [f"t{i % 3}"], 24.0)
            node.curve_key = f"key{i}"
        repo.record(s, "vpn.create", "setup", "operator:test", [], [])
    with transaction(engine) as s:
        field = repo.vpn_by_name(s, "field")
        hub = repo.node_by_name(s, "n0")
        repo.remove_member(s, hub, field)
        repo.add_member(s, hub, field, "hub")
        repo.record(s, "member.add", "hub", "operator:test", [field.id or 0], [hub.id or 0])
    yield engine
    engine.dispose()


def _node(s: Session, rng: random.Random) -> Node:
    return repo.node_by_name(s, f"n{rng.randrange(NODES)}")


def _presence(s: Session, rng: random.Random) -> tuple[str, list[int], list[int]]:
    nodes = [_node(s, rng) for _ in range(rng.randint(1, 3))]
    state = rng.choice([True, False])
    for node in nodes:
        node.online = state
    return ("node.online" if state else "node.offline"), [], [n.id or 0 for n in nodes]


def _endpoints(s: Session, rng: random.Random) -> tuple[str, list[int], list[int]]:
    node = _node(s, rng)
    address = f"198.18.{rng.randrange(4)}.{rng.randrange(2, 9)}:7871"
    node.endpoints, node.public_endpoint = [address], rng.choice([address, None])
    node.nat_class = rng.choice(["public", "cone", "symmetric", "unknown"])
    node.caps = sorted(rng.sample(["csum", "gso"], rng.randint(0, 2)))
    return "node.endpoints", [], [node.id or 0]


def _pin(s: Session, rng: random.Random) -> tuple[str, list[int], list[int]]:
    node = _node(s, rng)
    node.path_pin = rng.choice([None, "udp", "esp", "tcp443"])
    return "node.set", [], [node.id or 0]


def _route(s: Session, rng: random.Random) -> tuple[str, list[int], list[int]]:
    existing = s.exec(select(GatewayRoute)).all()
    if existing and rng.random() < 0.5:
        route = rng.choice(existing)
        s.delete(route)
        return "route.remove", [route.vpn_id], [route.node_id]
    node, vpn = _node(s, rng), repo.vpn_by_name(s, "office")
    cidr = f"192.168.{rng.randrange(200)}.0/24"
    if not s.exec(select(GatewayRoute).where(col(GatewayRoute.cidr) == cidr)).first():
        repo.add_route(s, node, vpn, cidr)
    return "route.add", [vpn.id or 0], [node.id or 0]


def _acl(s: Session, rng: random.Random) -> tuple[str, list[int], list[int]]:
    existing = s.exec(select(AclRule)).all()
    if existing and rng.random() < 0.5:
        rule = rng.choice(existing)
        s.delete(rule)
        return "acl.remove", [rule.vpn_id], []
    vpn = repo.vpn_by_name(s, "office")
    src, dst = rng.choice(["any", "tag:t0", "n1"]), rng.choice(["any", "tag:t1", "n2"])
    repo.add_acl(s, vpn, src, dst, "any", "")
    return "acl.add", [vpn.id or 0], []


def _retag(s: Session, rng: random.Random) -> tuple[str, list[int], list[int]]:
    """A kind advance does not know: it must fall back to a full load, which sees the new tags."""
    node = _node(s, rng)
    node.tags = sorted(rng.sample(["t0", "t1", "t2"], rng.randint(0, 2)))
    return "node.tags", [], [node.id or 0]


MUTATIONS = [_presence, _endpoints, _pin, _route, _acl, _retag]


def _views(world: World) -> dict[int, object]:
    return {node_id: world.view(node_id) for node_id in world.nodes}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_an_advanced_world_gives_every_node_the_view_a_full_load_gives(engine: Engine, seed: int) -> None:
    rng = random.Random(seed)
    with reading(engine) as s:
        world, head = World.load(s), repo.head_revision(s)
        _views(world)  # warm its caches: an advanced world must not reuse a stale one
    for step in range(STEPS):
        with transaction(engine) as s:
            batch = rng.randint(1, 3)  # several changes may land in one fanout batch
            for _ in range(batch):
                kind, vpn_ids, node_ids = rng.choice(MUTATIONS)(s, rng)
                s.flush()
                repo.record(s, kind, kind, "operator:test", vpn_ids, node_ids)
        with reading(engine) as s:
            changes = list(s.exec(select(Change).where(col(Change.revision) > head)).all())
            head = repo.head_revision(s)
            world = world.advance(s, changes)
            assert _views(world) == _views(World.load(s)), f"seed {seed}, step {step}: {[c.kind for c in changes]}"


def test_presence_and_routes_reread_only_their_rows_and_anything_else_loads_all(engine: Engine) -> None:
    """What advance reuses is what makes it cheap: memberships and nodes nobody changed are not reread."""
    with reading(engine) as s:
        world = World.load(s)
    with transaction(engine) as s:
        node = repo.node_by_name(s, "n3")
        node.online = True
        presence = repo.record(s, "node.online", "n3 online", "service:fanout", [], [node.id or 0])
    with reading(engine) as s:
        online = world.advance(s, [presence])
    assert online.members is world.members and online.rules is world.rules
    assert online.same_nodes and not world.same_nodes  # the fanout then skips its scan for removed nodes
    assert online.nodes is not world.nodes and online.nodes[node.id or 0].online
    assert all(online.nodes[i] is world.nodes[i] for i in world.nodes if i != node.id)
    assert not world.nodes[node.id or 0].online  # the world it came from is untouched (streams hold its views)
    with transaction(engine) as s:
        renamed = repo.rename_node(s, "n3", "n3b")
        change = repo.record(s, "node.rename", "rename", "operator:test", [], [renamed.id or 0])
    with reading(engine) as s:
        after = online.advance(s, [change])
    assert after.members is not online.members  # a rename rewrites ACL rules: everything is reread
    assert not after.same_nodes
    assert after.nodes[renamed.id or 0].name == "n3b"
