"""The datastore: the one place that holds the truth (SQLModel on SQLite or PostgreSQL).

Operators (and services) call it; nodes never do: they see the truth only as
their own view, pushed by the fanout. Every mutation commits its change-log
row in the same transaction and answers with the revision it committed and
the nodes whose view it changes; with ``dry_run`` it commits nothing and
answers with each of those nodes' view diffs instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from bus import errors
from bus.client import Client
from bus.errors import RemoteError
from bus.identity import Identity, Role
from bus.messages import Message
from bus.messages.auth import JoinString
from bus.messages.common import Error
from bus.messages.datastore import (
    AclAdd,
    AclList,
    AclListRequest,
    AclRemove,
    EventInfo,
    Events,
    EventsRequest,
    MemberAdd,
    MemberInfo,
    MemberRemove,
    Mutated,
    NodeAdd,
    NodeDetail,
    NodeDiff,
    NodeInfo,
    NodeList,
    NodeListRequest,
    NodeRemove,
    NodeRename,
    NodeSet,
    NodeShowRequest,
    RouteAdd,
    RouteRemove,
    VpnCreate,
    VpnDelete,
    VpnDetail,
    VpnInfo,
    VpnList,
    VpnListRequest,
    VpnSet,
    VpnShowRequest,
    _Mutation,
)
from bus.messages.sync import Committed, NodeView, ViewDelta
from bus.worker import Handler, Worker
from services.auth import audit
from services.datastore import repo
from services.datastore.db import make_engine, migrate, reading, transaction
from services.datastore.models import AclRule, Change, Delivery, Membership, Node, Vpn
from services.datastore.netmap import World, acl_view

log = logging.getLogger(__name__)

GROUP_COMMIT_MAX = 32  # requests the broker may hand the datastore at once, so at most this many per commit


@dataclass
class Outcome:
    """What a mutation did, for its change-log row and its reply."""

    kind: str
    summary: str
    vpn_ids: list[int] = field(default_factory=list)
    node_ids: list[int] = field(default_factory=list)
    join: str | None = None


class _DryRun(Exception):
    """Raised inside the transaction of a dry run, so that it rolls back."""

    def __init__(self, reply: Mutated) -> None:
        self.reply = reply


class DatastoreService(Worker):
    service = "datastore"
    allow = (Role.OPERATOR, Role.SERVICE)
    # Group commit: mutations waiting together commit in one transaction, one savepoint each. With a durable
    # commit (an fsync on SQLite) per mutation, a burst of operator changes queued at ~75 commits a second.
    batch_requests = True
    capacity = GROUP_COMMIT_MAX

    def __init__(
        self,
        endpoint: str,
        keypair: object,
        server_key: bytes,
        *,
        database_url: str,
        join_endpoints: list[str],
        sign_key: str,
    ) -> None:
        super().__init__(endpoint, keypair, server_key)  # type: ignore[arg-type]
        self.engine = make_engine(database_url)
        migrate(self.engine)
        self.join_endpoints = join_endpoints
        self.sign_key = sign_key
        self._fanout: Client | None = None  # for telling the fanout of commits; made and used in run's thread

    def handlers(self) -> dict[type, Handler]:
        mutations: dict[type, Callable[[Session, _Mutation], Outcome]] = {
            VpnCreate: self._vpn_create,
            VpnDelete: self._vpn_delete,
            VpnSet: self._vpn_set,
            NodeAdd: self._node_add,
            NodeRemove: self._node_remove,
            NodeRename: self._node_rename,
            NodeSet: self._node_set,
            MemberAdd: self._member_add,
            MemberRemove: self._member_remove,
            RouteAdd: self._route_add,
            RouteRemove: self._route_remove,
            AclAdd: self._acl_add,
            AclRemove: self._acl_remove,
        }
        self._mutations = mutations
        table: dict[type, Handler] = {
            kind: (lambda request, caller, apply=apply: self._mutate(request, caller, apply))
            for kind, apply in mutations.items()
        }
        return {
            **super().handlers(),
            **table,
            VpnListRequest: self.on_vpn_list,
            VpnShowRequest: self.on_vpn_show,
            NodeListRequest: self.on_node_list,
            NodeShowRequest: self.on_node_show,
            AclListRequest: self.on_acl_list,
            EventsRequest: self.on_events,
        }

    def run(self) -> None:
        # The connection that tells the fanout of commits is made before the first request, so that its CURVE
        # handshake is done by the first commit (a word sent before it is lost, and the fanout's poll covers it).
        self._fanout = Client(self.endpoint, self.keypair, self.server_key, retries=0)
        try:
            super().run()
        finally:
            self._fanout.close()

    def _tell_fanout(self, revision: int) -> None:
        """Tell the fanout that *revision* is committed, without waiting for an answer (``Committed``).

        It polls the head revision every 20 ms anyway; this spares each change that wait (10 ms on average,
        a third of a change to one node's whole time in bench/control.py). Best effort: a word that cannot
        be sent at once is counted and dropped, never waited for.
        """
        client = self._fanout
        if client is None:
            return
        for _ in client.incoming():  # the answers to earlier words: nothing to do with them
            pass
        sent = client.notify("fanout", Committed(revision=revision))
        self.counters["fanout_told" if sent else "fanout_not_told"] += 1

    # ------------------------------------------------------------------ mutations
    def _mutate(self, request: _Mutation, caller: Identity, apply: Callable[[Session, _Mutation], Outcome]) -> Mutated:
        try:
            with transaction(self.engine) as session:
                reply = self._record(session, request, caller, apply)
        except _DryRun as dry:
            return dry.reply
        _log_committed(reply, caller)
        return reply

    def _record(
        self, session: Session, request: _Mutation, caller: Identity, apply: Callable[[Session, _Mutation], Outcome]
    ) -> Mutated:
        """Apply one mutation and its change-log row inside the caller's transaction.

        A dry run raises _DryRun with its preview instead, so that the caller's transaction rolls back.
        """
        prior = repo.replayed(session, request.idempotency_key)
        if prior is not None:
            return Mutated(revision=prior.revision, summary=prior.summary, replayed=True)
        # A dry run computes every view before the change: the ORM objects change in place.
        before = _frozen_views(World.load(session)) if request.dry_run else None
        outcome = apply(session, request)
        change = repo.record(
            session,
            outcome.kind,
            outcome.summary,
            caller.caller,
            outcome.vpn_ids,
            outcome.node_ids,
            request.idempotency_key,
        )
        if before is not None:
            diffs = _diffs(before, World.load(session), change)
            reached = sorted(d.node for d in diffs)
            raise _DryRun(Mutated(revision=0, summary=outcome.summary, dry_run=True, reached=reached, preview=diffs))
        audit.add(session, audit.OPERATOR, caller.caller, caller.address, True, f"r{change.revision} {outcome.summary}")
        return Mutated(revision=change.revision, summary=outcome.summary, join=outcome.join)

    def serve_many(self, items: list[tuple[bytes, bytes, str]]) -> list[Message]:
        """Answer in order; consecutive mutations (not dry runs) commit together (``_commit_group``)."""
        replies: list[Message | None] = []
        group: list[tuple[int, _Mutation, Identity]] = []
        for caller_text, body, address in items:
            opened = self._open(caller_text, body, address)
            if isinstance(opened, Error):
                replies.append(opened)
                continue
            request, caller = opened
            if type(request) in self._mutations and not request.dry_run:  # type: ignore[attr-defined]
                group.append((len(replies), request, caller))  # type: ignore[arg-type]
                replies.append(None)
                continue
            self._commit_group(group, replies)  # what came before is committed before this is served
            group = []
            replies.append(self._handle(request, caller))
        self._commit_group(group, replies)
        committed = [r.revision for r in replies if type(r) is Mutated and not (r.replayed or r.dry_run)]
        if committed:
            self._tell_fanout(max(committed))
        return replies  # type: ignore[return-value]  # every slot is filled

    def _commit_group(self, group: list[tuple[int, _Mutation, Identity]], replies: list[Message | None]) -> None:
        """Commit *group* as one transaction, each mutation in a savepoint: one that fails costs only itself.

        If the commit itself fails, none of them happened and each is told so (clients retry with their
        idempotency keys)."""
        if len(group) <= 1:
            for index, request, caller in group:
                replies[index] = self._handle(request, caller)
            return
        self.counters["group_commits"] += 1
        done: list[tuple[int, Message, Identity]] = []
        try:
            with transaction(self.engine) as session:
                for index, request, caller in group:
                    self.keepalive()
                    done.append((index, self._in_savepoint(session, request, caller), caller))
        except Exception:
            log.exception("datastore: a group of %d mutations could not be committed", len(group))
            for index, request, _ in group:
                replies[index] = self._error(errors.INTERNAL, f"{request.KIND} was not committed; nothing changed")
            return
        for index, reply, caller in done:
            replies[index] = reply
            if isinstance(reply, Mutated):
                _log_committed(reply, caller)

    def _in_savepoint(self, session: Session, request: _Mutation, caller: Identity) -> Message:
        """One mutation of a group: its reply, or the error that rolled back its savepoint (only)."""
        try:
            with session.begin_nested():
                return self._record(session, request, caller, self._mutations[type(request)])
        except RemoteError as exc:
            return self._error(exc.code, exc.message)
        except Exception:
            log.exception("datastore: %s failed", request.KIND)
            return self._error(errors.INTERNAL, f"datastore failed to handle {request.KIND}")

    def _vpn_create(self, s: Session, r: VpnCreate) -> Outcome:  # type: ignore[override]
        vpn, summary = repo.create_vpn(s, r.name, r.subnet, r.addressing, r.topology)
        return Outcome("vpn.create", summary, vpn_ids=[vpn.id or 0])

    def _vpn_set(self, s: Session, r: VpnSet) -> Outcome:  # type: ignore[override]
        vpn = repo.vpn_by_name(s, r.name)
        changed = []
        for field_name in ("keepalive", "mtu"):
            value = getattr(r, field_name)
            if value is not None and value != getattr(vpn, field_name):
                setattr(vpn, field_name, value)
                changed.append(f"{field_name} {value}")
        s.add(vpn)
        return Outcome("vpn.set", f"vpn {vpn.name}: {', '.join(changed) or 'no change'}", [vpn.id or 0])

    def _vpn_delete(self, s: Session, r: VpnDelete) -> Outcome:  # type: ignore[override]
        vpn_ids, node_ids, summary = repo.delete_vpn(s, r.name)
        return Outcome("vpn.delete", summary, vpn_ids, node_ids)

    def _node_add(self, s: Session, r: NodeAdd) -> Outcome:  # type: ignore[override]
        node, secret, vpn_ids = repo.add_node(s, r.name, r.vpns, r.tags, r.expires_hours)
        join = JoinString(
            endpoints=self.join_endpoints, server_key=self.server_key.decode(), sign_key=self.sign_key, secret=secret
        )
        where = f" in {', '.join(r.vpns)}" if r.vpns else ""
        return Outcome("node.add", f"added node {r.name}{where}", vpn_ids, [node.id or 0], join=join.encode())

    def _node_remove(self, s: Session, r: NodeRemove) -> Outcome:  # type: ignore[override]
        _, vpn_ids = repo.remove_node(s, r.name)
        return Outcome("node.remove", f"removed node {r.name}", vpn_ids, [])

    def _node_set(self, s: Session, r: NodeSet) -> Outcome:  # type: ignore[override]
        node = repo.node_by_name(s, r.name)
        node.path_pin = None if r.path == "auto" else r.path
        how = "the server's choice" if node.path_pin is None else node.path_pin
        return Outcome("node.set", f"node {node.name}: path {how} for all its pairs", [], [node.id or 0])

    def _node_rename(self, s: Session, r: NodeRename) -> Outcome:  # type: ignore[override]
        node = repo.rename_node(s, r.name, r.new_name)
        return Outcome("node.rename", f"renamed node {r.name} to {r.new_name}", [], [node.id or 0])

    def _member_add(self, s: Session, r: MemberAdd) -> Outcome:  # type: ignore[override]
        node, vpn = repo.node_by_name(s, r.node), repo.vpn_by_name(s, r.vpn)
        member = repo.add_member(s, node, vpn, r.role)
        summary = f"added {r.node} to {r.vpn} as {r.role} ({member.vip})"
        return Outcome("member.add", summary, [vpn.id or 0], [node.id or 0])

    def _member_remove(self, s: Session, r: MemberRemove) -> Outcome:  # type: ignore[override]
        node, vpn = repo.node_by_name(s, r.node), repo.vpn_by_name(s, r.vpn)
        repo.remove_member(s, node, vpn)
        return Outcome("member.remove", f"removed {r.node} from {r.vpn}", [vpn.id or 0], [node.id or 0])

    def _route_add(self, s: Session, r: RouteAdd) -> Outcome:  # type: ignore[override]
        node, vpn = repo.node_by_name(s, r.node), repo.vpn_by_name(s, r.vpn)
        cidr = repo.add_route(s, node, vpn, r.cidr)
        return Outcome("route.add", f"route {cidr} via {r.node} in {r.vpn}", [vpn.id or 0], [node.id or 0])

    def _route_remove(self, s: Session, r: RouteRemove) -> Outcome:  # type: ignore[override]
        node, vpn = repo.node_by_name(s, r.node), repo.vpn_by_name(s, r.vpn)
        cidr = repo.remove_route(s, node, vpn, r.cidr)
        return Outcome("route.remove", f"removed route {cidr} via {r.node} in {r.vpn}", [vpn.id or 0], [node.id or 0])

    def _acl_add(self, s: Session, r: AclAdd) -> Outcome:  # type: ignore[override]
        vpn = repo.vpn_by_name(s, r.vpn)
        rule = repo.add_acl(s, vpn, r.src, r.dst, r.proto, r.ports)
        ports = f" ports {rule.ports}" if rule.ports else ""
        summary = f"ACL #{rule.id} in {r.vpn}: allow {rule.src} -> {rule.dst} {rule.proto}{ports}"
        return Outcome("acl.add", summary, [vpn.id or 0])

    def _acl_remove(self, s: Session, r: AclRemove) -> Outcome:  # type: ignore[override]
        rule = repo.remove_acl(s, r.id)
        return Outcome("acl.remove", f"removed ACL #{r.id} ({rule.src} -> {rule.dst})", [rule.vpn_id])

    # ------------------------------------------------------------------ queries
    def on_vpn_list(self, request: VpnListRequest, caller: Identity) -> VpnList:
        with reading(self.engine) as s:
            world = World.load(s)
            return VpnList(vpns=[_vpn_info(world, v) for v in sorted(world.vpns.values(), key=lambda v: v.name)])

    def on_vpn_show(self, request: VpnShowRequest, caller: Identity) -> VpnDetail:
        with reading(self.engine) as s:
            vpn = repo.vpn_by_name(s, request.name)
            world = World.load(s)
            members = [
                MemberInfo(
                    node=world.nodes[m.node_id].name,
                    vip=m.vip,
                    role=m.role,
                    online=world.nodes[m.node_id].online,
                    routes=world.routes.get((vpn.id or 0, m.node_id), []),
                )
                for m in sorted(world.members.get(vpn.id or 0, []), key=lambda m: world.nodes[m.node_id].name)
            ]
            acl = [acl_view(vpn, r) for r in world.rules.get(vpn.id or 0, [])]
            return VpnDetail(vpn=_vpn_info(world, vpn), members=members, acl=acl)

    def on_node_list(self, request: NodeListRequest, caller: Identity) -> NodeList:
        with reading(self.engine) as s:
            world = World.load(s)
            nodes = sorted(world.nodes.values(), key=lambda n: n.name)
            return NodeList(nodes=[_node_info(world, n) for n in nodes])

    def on_node_show(self, request: NodeShowRequest, caller: Identity) -> NodeDetail:
        with reading(self.engine) as s:
            node = repo.node_by_name(s, request.name)
            return NodeDetail(node=_node_info(World.load(s), node))

    def on_acl_list(self, request: AclListRequest, caller: Identity) -> AclList:
        with reading(self.engine) as s:
            query = select(AclRule, Vpn).join(Vpn, col(AclRule.vpn_id) == col(Vpn.id))
            if request.vpn is not None:
                repo.vpn_by_name(s, request.vpn)
                query = query.where(Vpn.name == request.vpn)
            rows = s.exec(query.order_by(col(AclRule.id))).all()
            return AclList(rules=[acl_view(vpn, rule) for rule, vpn in rows])

    def on_events(self, request: EventsRequest, caller: Identity) -> Events:
        with reading(self.engine) as s:
            changes = s.exec(
                select(Change)
                .where(Change.revision > request.since)
                .order_by(col(Change.revision))
                .limit(request.limit)
            ).all()
            receipts = _receipts(s, [c.revision for c in changes])
            events = [_event(c, receipts.get(c.revision, [])) for c in changes]
            return Events(events=events, head=repo.head_revision(s))


# ---------------------------------------------------------------------- helpers
def _log_committed(reply: Mutated, caller: Identity) -> None:
    if not reply.replayed:
        log.info("r%d %s by %s", reply.revision, reply.summary, caller.caller)


def _frozen_views(world: World) -> dict[int, NodeView]:
    return {node_id: world.view(node_id) for node_id in world.nodes}


def _diffs(before: dict[int, NodeView], after: World, change: Change) -> list[NodeDiff]:
    """The view diff of every enrolled node the change reaches (those whose view changes)."""
    diffs = []
    for node_id in sorted(after.affected(change) | set(change.node_ids)):
        node = after.nodes.get(node_id)
        if node is None or not node.curve_key or node_id not in before:
            continue  # removed (revoked) or not enrolled: no agent to reach
        delta = ViewDelta.between(before[node_id], after.view(node_id))
        if not delta.is_empty():
            diffs.append(NodeDiff(node=node.name, delta=delta))
    return diffs


def _vpn_info(world: World, vpn: Vpn) -> VpnInfo:
    members = world.members.get(vpn.id or 0, [])
    return VpnInfo(
        name=vpn.name,
        subnet=vpn.subnet,
        addressing=vpn.addressing,
        topology=vpn.topology,
        members=len(members),
        online=sum(1 for m in members if world.nodes[m.node_id].online),
        keepalive=vpn.keepalive,
        mtu=vpn.mtu,
    )


def _node_info(world: World, node: Node) -> NodeInfo:
    memberships: list[Membership] = world.by_node.get(node.id or 0, [])
    return NodeInfo(
        name=node.name,
        enrolled=node.curve_key is not None,
        online=node.online,
        vips={world.vpns[m.vpn_id].name: m.vip for m in memberships},
        roles={world.vpns[m.vpn_id].name: m.role for m in memberships},
        tags=node.tags,
        nat_class=node.nat_class,
        path_pin=node.path_pin,
        endpoints=node.endpoints,
        public_endpoint=node.public_endpoint,
        agent_version=node.agent_version,
        last_seen=node.last_seen,
        caps=list(node.caps),
    )


def _receipts(s: Session, revisions: list[int]) -> dict[int, list[tuple[Delivery, str]]]:
    if not revisions:
        return {}
    rows = s.exec(
        select(Delivery, Node.name)
        .join(Node, col(Node.id) == col(Delivery.node_id))
        .where(col(Delivery.revision).in_(revisions))
    ).all()
    grouped: dict[int, list[tuple[Delivery, str]]] = {}
    for delivery, name in rows:
        grouped.setdefault(delivery.revision, []).append((delivery, name))
    return grouped


def _event(change: Change, receipts: list[tuple[Delivery, str]]) -> EventInfo:
    pending = [(d, name) for d, name in receipts if d.applied_at is None]
    return EventInfo(
        revision=change.revision,
        at=change.at,
        kind=change.kind,
        summary=change.summary,
        actor=change.actor,
        reached=len(receipts),
        applied=len(receipts) - len(pending),
        pending=sorted(name for _, name in pending),
        pending_since=min((d.pushed_at for d, _ in pending), default=None),
    )
