"""Repository functions: every mutation of the truth, each writing its change-log row.

Each mutation runs inside the caller's transaction (transactions are owned at
the edge; nothing here commits) and ends with :func:`record`, which takes the
next global revision from the ``revision`` counter row. Taking that row
(``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite)
serialises writers, so revisions commit in order and a reader of the change
log never sees revision N+1 before N.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from datetime import timedelta

from sqlmodel import Session, col, delete, select

from bus import errors
from bus.errors import RemoteError
from services.datastore import validate
from services.datastore.db import HEAD_REVISION
from services.datastore.models import (
    AclRule,
    Change,
    Counter,
    GatewayRoute,
    JoinToken,
    Membership,
    Node,
    Vpn,
    utcnow,
)

REVISION = "revision"


def not_found(what: str, name: str) -> RemoteError:
    return RemoteError(errors.NOT_FOUND, f"{what} {name!r} does not exist")


def conflict(message: str) -> RemoteError:
    return RemoteError(errors.CONFLICT, message)


# ---------------------------------------------------------------------- lookups
def vpn_by_name(session: Session, name: str) -> Vpn:
    vpn = session.exec(select(Vpn).where(Vpn.name == name)).first()
    if vpn is None:
        raise not_found("VPN", name)
    return vpn


def node_by_name(session: Session, name: str) -> Node:
    node = session.exec(select(Node).where(Node.name == name)).first()
    if node is None:
        raise not_found("node", name)
    return node


def membership(session: Session, node: Node, vpn: Vpn) -> Membership | None:
    return session.exec(select(Membership).where(Membership.node_id == node.id, Membership.vpn_id == vpn.id)).first()


def vpn_ids_of(session: Session, node_id: int) -> list[int]:
    return sorted(session.exec(select(Membership.vpn_id).where(Membership.node_id == node_id)).all())


def head_revision(session: Session) -> int:
    # Plain SQL: the fanout asks this many times a second, and the ORM's identity map adds nothing here.
    row = session.connection().exec_driver_sql(HEAD_REVISION).first()
    return int(row[0]) if row else 0


# ---------------------------------------------------------------------- change log
def replayed(session: Session, idempotency_key: str | None) -> Change | None:
    if not idempotency_key:
        return None
    return session.exec(select(Change).where(Change.idempotency_key == idempotency_key)).first()


def record(
    session: Session,
    kind: str,
    summary: str,
    actor: str,
    vpn_ids: list[int],
    node_ids: list[int],
    idempotency_key: str | None = None,
) -> Change:
    """Append the change-log row of the mutation just made; returns it with its revision."""
    counter = session.exec(select(Counter).where(Counter.name == REVISION).with_for_update()).first()
    if counter is None:
        counter = Counter(name=REVISION, value=0)
        session.add(counter)
    counter.value += 1
    change = Change(
        revision=counter.value,
        kind=kind,
        summary=summary[:300],
        actor=actor[:120],
        vpn_ids=sorted(set(vpn_ids)),
        node_ids=sorted(set(node_ids)),
        idempotency_key=idempotency_key,
    )
    session.add(change)
    session.flush()
    return change


# ---------------------------------------------------------------------- VPNs
def create_vpn(session: Session, name: str, subnet: str, addressing: str, topology: str) -> tuple[Vpn, str]:
    validate.name(name, "VPN")
    network = validate.subnet(subnet)
    if session.exec(select(Vpn).where(Vpn.name == name)).first():
        raise conflict(f"a VPN named {name!r} already exists")
    vpn = Vpn(name=name, subnet=str(network), addressing=addressing, topology=topology)
    session.add(vpn)
    session.flush()
    return vpn, f"created VPN {name} ({network}, {addressing}, {topology})"


def delete_vpn(session: Session, name: str) -> tuple[list[int], list[int], str]:
    vpn = vpn_by_name(session, name)
    node_ids = list(session.exec(select(Membership.node_id).where(Membership.vpn_id == vpn.id)).all())
    for table in (Membership, GatewayRoute, AclRule):
        session.exec(delete(table).where(table.vpn_id == vpn.id))  # type: ignore[attr-defined]
    session.delete(vpn)
    session.flush()
    return [vpn.id or 0], node_ids, f"deleted VPN {name} ({len(node_ids)} members)"


# ---------------------------------------------------------------------- nodes
def add_node(
    session: Session, name: str, vpns: list[str], tags: list[str], expires_hours: float
) -> tuple[Node, str, list[int]]:
    """Create a node, its memberships and a one-time join secret; returns (node, secret, vpn ids)."""
    validate.name(name, "node")
    for tag in tags:
        validate.name(tag, "tag")
    if session.exec(select(Node).where(Node.name == name)).first():
        raise conflict(f"a node named {name!r} already exists")
    node = Node(name=name, tags=sorted(set(tags)))
    session.add(node)
    session.flush()
    vpn_ids = [add_member(session, node, vpn_by_name(session, v), "member").vpn_id for v in dict.fromkeys(vpns)]
    secret = secrets.token_urlsafe(24)
    expires = utcnow() + timedelta(hours=expires_hours)
    session.add(JoinToken(node_id=node.id or 0, secret_hash=hash_secret(secret), expires_at=expires))
    session.flush()
    return node, secret, vpn_ids


def hash_secret(secret: str) -> str:
    # The secret has 192 random bits: a plain hash is enough (no dictionary to slow down).
    return hashlib.sha256(secret.encode()).hexdigest()


def remove_node(session: Session, name: str) -> tuple[Node, list[int]]:
    node = node_by_name(session, name)
    vpn_ids = vpn_ids_of(session, node.id or 0)
    for table in (Membership, GatewayRoute, JoinToken):
        session.exec(delete(table).where(table.node_id == node.id))  # type: ignore[attr-defined]
    session.delete(node)
    session.flush()
    return node, vpn_ids


def rename_node(session: Session, name: str, new_name: str) -> Node:
    node = node_by_name(session, name)
    validate.name(new_name, "node")
    if new_name != name and session.exec(select(Node).where(Node.name == new_name)).first():
        raise conflict(f"a node named {new_name!r} already exists")
    for rule in session.exec(select(AclRule).where((AclRule.src == name) | (AclRule.dst == name))).all():
        rule.src = new_name if rule.src == name else rule.src
        rule.dst = new_name if rule.dst == name else rule.dst
    node.name = new_name
    session.flush()
    return node


# ---------------------------------------------------------------------- memberships
def add_member(session: Session, node: Node, vpn: Vpn, role: str) -> Membership:
    if membership(session, node, vpn) is not None:
        raise conflict(f"node {node.name!r} is already a member of VPN {vpn.name!r}")
    member = Membership(node_id=node.id or 0, vpn_id=vpn.id or 0, vip=allocate_vip(session, vpn), role=role)
    session.add(member)
    session.flush()
    return member


def allocate_vip(session: Session, vpn: Vpn) -> str:
    """The lowest free host address of the VPN's subnet (freed addresses are reused)."""
    network = ipaddress.ip_network(vpn.subnet)
    used = set(session.exec(select(Membership.vip).where(Membership.vpn_id == vpn.id)).all())
    for address in network.hosts():
        if str(address) not in used:
            return str(address)
    raise conflict(f"VPN {vpn.name!r} has no free address left in {vpn.subnet}")


def remove_member(session: Session, node: Node, vpn: Vpn) -> None:
    member = membership(session, node, vpn)
    if member is None:
        raise not_found("membership", f"{node.name} in {vpn.name}")
    session.exec(delete(GatewayRoute).where(GatewayRoute.vpn_id == vpn.id, GatewayRoute.node_id == node.id))  # type: ignore[arg-type]
    session.delete(member)
    session.flush()


# ---------------------------------------------------------------------- routes and ACLs
def add_route(session: Session, node: Node, vpn: Vpn, cidr: str) -> str:
    network = validate.cidr(cidr)
    if membership(session, node, vpn) is None:
        raise RemoteError(errors.INVALID, f"node {node.name!r} is not a member of VPN {vpn.name!r}")
    if session.exec(select(GatewayRoute).where(GatewayRoute.vpn_id == vpn.id, GatewayRoute.cidr == network)).first():
        raise conflict(f"route {network} already exists in VPN {vpn.name!r}")
    session.add(GatewayRoute(vpn_id=vpn.id or 0, node_id=node.id or 0, cidr=network))
    session.flush()
    return network


def remove_route(session: Session, node: Node, vpn: Vpn, cidr: str) -> str:
    network = validate.cidr(cidr)
    route = session.exec(
        select(GatewayRoute).where(
            GatewayRoute.vpn_id == vpn.id, GatewayRoute.node_id == node.id, GatewayRoute.cidr == network
        )
    ).first()
    if route is None:
        raise not_found("route", f"{network} via {node.name} in {vpn.name}")
    session.delete(route)
    session.flush()
    return network


def add_acl(session: Session, vpn: Vpn, src: str, dst: str, proto: str, ports: str) -> AclRule:
    rule = AclRule(
        vpn_id=vpn.id or 0,
        src=validate.selector(src),
        dst=validate.selector(dst),
        proto=proto,
        ports=validate.ports(ports),
    )
    if rule.ports and proto not in ("tcp", "udp"):
        raise RemoteError(errors.INVALID, "ports apply to tcp or udp only: add --proto tcp or --proto udp")
    session.add(rule)
    session.flush()
    return rule


def remove_acl(session: Session, rule_id: int) -> AclRule:
    rule = session.get(AclRule, rule_id)
    if rule is None:
        raise not_found("ACL rule", str(rule_id))
    session.delete(rule)
    session.flush()
    return rule


def all_members_of(session: Session, vpn_ids: list[int]) -> list[int]:
    if not vpn_ids:
        return []
    return sorted(set(session.exec(select(Membership.node_id).where(col(Membership.vpn_id).in_(vpn_ids))).all()))
