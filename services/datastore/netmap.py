"""Each node's view of the truth (its "netmap"), computed from the datastore.

One pure function of the database state, used by the fanout (to push
deltas) and by the datastore (to preview a change with --dry-run), so a
preview lists exactly the nodes the real change then reaches.

Who sees whom:
  - mesh VPN: every member sees every other member;
  - hub-spoke VPN: hubs see everyone, everyone else sees the hubs only;
  - a VPN with ACL rules: a peer is listed only if some rule lets traffic
    flow between the two nodes in either direction.
A peer seen through several VPNs is one entry with one address per VPN.

Native addressing (a VPN created with ``--addressing native``): no virtual
IPs. A node's address there is its real one (the first IPv4 local address it
reported), and a peer's is where this viewer reaches it: its public mapping,
or its local address when both sit behind the same public address (the same
endpoint the path uses). A peer whose address is not known yet is listed
without one. The agents' RNAT (nodeagent/rnat.py) makes the inner headers
agree with these addresses.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TypeVar

from sqlalchemy import select as sa_select
from sqlmodel import Session, col
from sqlmodel import select as sqlmodel_select

from bus.messages import construct
from bus.messages.sync import AclView, NodeView, PeerView, RouteView, VpnView
from services.datastore import repo
from services.datastore.models import AclRule, Change, GatewayRoute, Membership, Node, Vpn
from services.datastore.paths import GSO, choose_path, native_address, own_native_address, pick_endpoint

T = TypeVar("T")

# Changes that rewrite only the rows of the nodes they name: presence, reported endpoints and offloads, a path
# pin. (A rename is not one of them: ACL selectors name nodes.)
NODE_ROW_KINDS = frozenset({"node.online", "node.offline", "node.endpoints", "node.set"})
# Changes confined to one small table (routes, ACL rules), which World.advance rereads whole.
SMALL_TABLE_KINDS = frozenset({"route.add", "route.remove", "acl.add", "acl.remove"})


@dataclass
class World:
    """Every row that views are made of, loaded once per read transaction."""

    vpns: dict[int, Vpn]
    nodes: dict[int, Node]
    members: dict[int, list[Membership]]  # vpn id -> memberships
    by_node: dict[int, list[Membership]]  # node id -> memberships
    routes: dict[tuple[int, int], list[str]]  # (vpn id, node id) -> CIDRs
    rules: dict[int, list[AclRule]]  # vpn id -> rules
    _views: dict[int, NodeView] = field(default_factory=dict)
    _by_key: dict[str, int] | None = None
    same_nodes: bool = False  # made by advance(): the previous World's nodes, none added, removed or re-keyed
    _hubs: dict[int, list[Membership]] | None = None  # vpn id -> its hubs, built on first use
    # peer id -> (its parts, the viewer's class) -> entry. By node first, so that advance() drops a changed
    # node's entries in O(1) rather than scanning all: at 10,000 nodes presence makes a batch every 20 ms.
    _peers: dict[int, dict[tuple[object, ...], PeerView]] = field(default_factory=dict)
    # node id -> vpn id -> the node's own VpnView, kept across advance() like _peers: an unchanged part keeps
    # its identity, so deltas skip it with one `is` and digests reuse its cached JSON.
    _vpn_views: dict[int, dict[int, VpnView]] = field(default_factory=dict)

    @classmethod
    def load(cls, session: Session) -> World:
        """Read everything views need, as plain rows (see :func:`_rows`) that outlive the session."""
        members: dict[int, list[Membership]] = defaultdict(list)
        by_node: dict[int, list[Membership]] = defaultdict(list)
        for m in _rows(session, Membership):
            members[m.vpn_id].append(m)
            by_node[m.node_id].append(m)
        return cls(
            vpns={v.id: v for v in _rows(session, Vpn)},
            nodes={n.id: n for n in _rows(session, Node)},
            members=members,
            by_node=by_node,
            routes=_routes(session),
            rules=_rules(session),
        )

    def advance(self, session: Session, changes: list[Change]) -> World:
        """This world after *changes*, rereading only the rows they can have touched; a full load otherwise.

        At 10,000 nodes a full load costs about a second, and most batches are presence, reported endpoints
        or a route: one node's row or one small table. Views are built afresh (they are cached per World).
        """
        kinds = {c.kind for c in changes}
        if not kinds <= (NODE_ROW_KINDS | SMALL_TABLE_KINDS):
            return World.load(session)
        nodes = self.nodes
        touched = sorted({n for c in changes if c.kind in NODE_ROW_KINDS for n in c.node_ids})
        if touched:
            nodes = dict(nodes)
            for start in range(0, len(touched), 500):
                for row in _rows(session, Node, where=touched[start : start + 500]):
                    nodes[row.id] = row
        routes, rules = self.routes, self.rules
        if kinds & {"route.add", "route.remove"}:
            routes = _routes(session)
        if kinds & {"acl.add", "acl.remove"}:
            rules = _rules(session)
        # A peer entry depends on the peer's row and routes and on the viewer (part of its cache key): keep the
        # entries of every other peer, so a hub's view of 10,000 spokes is not rebuilt (and rehashed) per batch.
        changed = set(touched) | {n for (_, n) in routes.keys() ^ self.routes.keys()}
        changed |= {n for (v, n), cidrs in routes.items() if self.routes.get((v, n)) != cidrs}
        return World(
            vpns=self.vpns,
            nodes=nodes,
            members=self.members,
            by_node=self.by_node,
            routes=routes,
            rules=rules,
            same_nodes=True,
            _by_key=self._by_key,  # these kinds never add, remove or re-key a node
            _hubs=self._hubs,  # nor change a membership
            _peers=_without(self._peers, changed),
            _vpn_views=_without(self._vpn_views, changed),
        )

    def node_id(self, key: str) -> int | None:
        if self._by_key is None:
            self._by_key = {n.curve_key: i for i, n in self.nodes.items() if n.curve_key}
        return self._by_key.get(key)

    def view(self, node_id: int) -> NodeView:
        if node_id not in self._views:
            self._views[node_id] = self._build(node_id)
        return self._views[node_id]

    def _build(self, node_id: int) -> NodeView:
        me = self.nodes[node_id]
        vpns: dict[str, VpnView] = {}
        peer_parts: dict[int, dict[str, tuple[str, str]]] = defaultdict(dict)  # peer -> vpn -> (vip, role)
        acl: list[AclView] = []
        for mine in self.by_node.get(node_id, []):
            vpn = self.vpns[mine.vpn_id]
            own = self._vpn_views.setdefault(node_id, {})
            part = own.get(mine.vpn_id)
            if part is None:
                routes = self.routes.get((mine.vpn_id, node_id), [])
                part = own[mine.vpn_id] = _vpn_view(vpn, mine, routes, me)
            vpns[vpn.name] = part
            rules = self.rules.get(vpn.id or 0, [])
            acl += [acl_view(vpn, r) for r in rules if _matches(r.src, me) or _matches(r.dst, me)]
            for other in self._candidates(vpn, mine):
                if other.node_id != node_id and self._visible(vpn, mine, other, rules):
                    peer_parts[other.node_id][vpn.name] = (other.vip, other.role)
        peers = {}
        # The path and endpoint depend on the viewer only through its class, pin, offloads and public address.
        viewer = (me.nat_class, _path_pin(me), GSO in me.caps, _public_host(me))
        for peer_id, parts in peer_parts.items():
            # Most viewers see a peer the same way: build each distinct entry once per World.
            seen_as = self._peers.setdefault(peer_id, {})
            key = (tuple(sorted(parts.items())), viewer)
            entry = seen_as.get(key)
            if entry is None:
                entry = seen_as[key] = self._peer_view(me, self.nodes[peer_id], parts)
            peers[entry.name] = entry
        # Built without validation (model_construct): every value comes from rows the datastore validated, and
        # validating 10,000 views per change to all was a fifth of the fanout's batch. Agents validate on receipt.
        return construct(
            NodeView,
            node=me.name,
            vpns=dict(sorted(vpns.items())),
            peers=dict(sorted(peers.items())),
            acl=sorted(acl, key=lambda a: a.id),
            tags=sorted(me.tags),
        )

    def _candidates(self, vpn: Vpn, mine: Membership) -> list[Membership]:
        """The members *mine* might see: a spoke only the hubs, so that its view costs O(hubs), not O(members).

        With 10,000 spokes in one VPN, scanning every member for every spoke made one batch O(N^2).
        """
        if vpn.topology != "hub-spoke" or mine.role == "hub":
            return self.members.get(mine.vpn_id, [])
        return self._hubs_of(mine.vpn_id)

    def _hubs_of(self, vpn_id: int) -> list[Membership]:
        if self._hubs is None:
            self._hubs = {v: [m for m in rows if m.role == "hub"] for v, rows in self.members.items()}
        return self._hubs.get(vpn_id, [])

    def _visible(self, vpn: Vpn, mine: Membership, other: Membership, rules: list[AclRule]) -> bool:
        if vpn.topology == "hub-spoke" and "hub" not in (mine.role, other.role):
            return False
        if not rules:
            return True
        me, peer = self.nodes[mine.node_id], self.nodes[other.node_id]
        return any(_allows(r, me, peer) or _allows(r, peer, me) for r in rules)

    def _peer_view(self, me: Node, peer: Node, parts: dict[str, tuple[str, str]]) -> PeerView:
        name_to_id = {self.vpns[m.vpn_id].name: m.vpn_id for m in self.by_node.get(peer.id or 0, [])}
        routes = [
            RouteView.model_construct(vpn=vpn, cidr=cidr)
            for vpn in sorted(parts)
            for cidr in self.routes.get((name_to_id[vpn], peer.id or 0), [])
        ]
        endpoint = pick_endpoint(me.public_endpoint, peer.public_endpoint, list(peer.endpoints))
        native = {v.name for v in self.vpns.values() if v.addressing == "native"}
        seen = native_address(endpoint)  # a native VPN's address for the peer: where this viewer reaches it
        vips = {vpn: (seen if vpn in native else vip) for vpn, (vip, _) in sorted(parts.items())}
        return PeerView.model_construct(
            name=peer.name,
            vips={vpn: vip for vpn, vip in vips.items() if vip},
            roles={vpn: role for vpn, (_, role) in sorted(parts.items())},
            routes=routes,
            endpoints=list(peer.endpoints),
            public_endpoint=peer.public_endpoint,
            nat_class=peer.nat_class,
            online=peer.online,
            sign_key=peer.sign_key,
            tags=sorted(peer.tags),
            path=choose_path(me.nat_class, _path_pin(me), peer.nat_class, _path_pin(peer), me.caps, peer.caps),
            endpoint=endpoint,
            caps=list(peer.caps),
        )

    def affected(self, change: Change) -> set[int]:
        """Nodes whose view this change may alter: its nodes, the members of its VPNs, and who sees its nodes.

        A change to a node alone (online, endpoints, path pin, name) reaches those that may list it as a
        peer: in a hub-spoke VPN a spoke is seen by the hubs only, so 10,000 spokes coming online do not
        each make the fanout recompute 10,000 views.
        """
        nodes = {n for n in change.node_ids if n in self.nodes}
        reached = set(nodes)
        for vpn_id in change.vpn_ids:
            reached |= {m.node_id for m in self.members.get(vpn_id, [])}
        for node_id in nodes:
            for mine in self.by_node.get(node_id, []):
                if mine.vpn_id in change.vpn_ids:
                    continue  # every member is in already
                vpn = self.vpns[mine.vpn_id]
                seen_by = self._candidates(vpn, mine)
                reached |= {m.node_id for m in seen_by}
        return reached


def latest(session: Session, world: World | None, revision: int) -> tuple[World, int]:
    """The world at the head revision and that revision: *world* itself when nothing was committed since
    *revision*, else *world* advanced by the changes since (a full load when there is no world yet).

    For services that keep a World between requests (keydist, the relay): each used to reload every node
    whenever presence moved the head, a second per reload at 10,000 nodes.
    """
    head = repo.head_revision(session)
    if world is not None and head == revision:
        return world, head
    if world is None or revision < 0:
        return World.load(session), head
    changes = list(session.exec(sqlmodel_select(Change).where(col(Change.revision) > revision)).all())
    return world.advance(session, changes), head


def _routes(session: Session) -> dict[tuple[int, int], list[str]]:
    routes: dict[tuple[int, int], list[str]] = defaultdict(list)
    for r in _rows(session, GatewayRoute, "cidr"):
        routes[(r.vpn_id, r.node_id)].append(r.cidr)
    return routes


def _rules(session: Session) -> dict[int, list[AclRule]]:
    rules: dict[int, list[AclRule]] = defaultdict(list)
    for rule in _rows(session, AclRule, "id"):
        rules[rule.vpn_id].append(rule)
    return rules


def _rows(session: Session, model: type[T], order_by: str = "", where: list[int] | None = None) -> list[T]:
    """Every row of *model*'s table (or those whose id is in *where*) as a plain object with the model's
    attribute names (read-only by intent).

    Not ORM instances: their identity map, instance state and pydantic set-up cost more than half of each
    fanout batch at 1,000 nodes, and views only read. Through the session, so what it flushed is seen.
    """
    table = model.__table__  # type: ignore[attr-defined]
    query = sa_select(table).order_by(table.c[order_by]) if order_by else sa_select(table)
    if where is not None:
        query = query.where(table.c.id.in_(where))
    result = session.execute(query)
    keys = list(result.keys())
    return [SimpleNamespace(**dict(zip(keys, row, strict=True))) for row in result]  # type: ignore[misc]


def _path_pin(node: Node) -> str | None:
    return node.path_pin


def _public_host(node: Node) -> str | None:
    return node.public_endpoint.rpartition(":")[0] if node.public_endpoint else None


def _without(cache: dict[int, T], changed: set[int]) -> dict[int, T]:
    """*cache* without the entries of *changed* nodes. The copy is one C call, atomic under the GIL: the
    fanout's heartbeat thread may be adding to the old World's cache meanwhile."""
    kept = dict(cache)
    for node_id in changed:
        kept.pop(node_id, None)
    return kept


def _vpn_view(vpn: Vpn, mine: Membership, routes: list[str], me: Node) -> VpnView:
    vip = mine.vip
    if vpn.addressing == "native":
        vip = own_native_address(list(me.endpoints)) or ""  # "" until the node reports its addresses
    return VpnView.model_construct(
        name=vpn.name,
        subnet=vpn.subnet,
        addressing=vpn.addressing,
        topology=vpn.topology,
        cipher=vpn.cipher,
        mtu=vpn.mtu,
        keepalive=vpn.keepalive,
        vip=vip,
        role=mine.role,
        routes=list(routes),
    )


def acl_view(vpn: Vpn, rule: AclRule) -> AclView:
    return AclView.model_construct(
        id=rule.id or 0, vpn=vpn.name, src=rule.src, dst=rule.dst, proto=rule.proto, ports=rule.ports
    )


def _matches(selector: str, node: Node) -> bool:
    if selector == "any":
        return True
    if selector.startswith("tag:"):
        return selector[4:] in node.tags
    return selector == node.name


def _allows(rule: AclRule, src: Node, dst: Node) -> bool:
    return _matches(rule.src, src) and _matches(rule.dst, dst)
