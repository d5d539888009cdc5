"""Creating a node for a caller that proved a credential (a password or an enrollment token).

The caller's CURVE key, proven by its handshake, becomes the node's key, as
with a join string; the node joins the given VPNs with addresses allocated as
``member add`` does, and the change-log row makes the fanout send views.
"""

from __future__ import annotations

import re

from sqlmodel import Session, select

from bus import errors
from bus.errors import RemoteError
from bus.identity import Identity
from services.datastore import repo, validate
from services.datastore.models import Node, NodeOwner, Vpn

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def node_name(wanted: str, user: str, hostname: str) -> str:
    """The name asked for, else ``user-hostname`` (or the hostname alone), made safe."""
    if wanted:
        return validate.name(wanted, "node")
    base = "-".join(p for p in (user.split("@")[0], hostname.split(".")[0]) if p)
    name = _UNSAFE.sub("-", base).strip("-._")[:63] or "node"
    return validate.name(name, "node")


def create(
    session: Session,
    name: str,
    caller: Identity,
    vpns: list[Vpn],
    *,
    tags: list[str],
    sign_key: str,
    agent_version: str,
    owner: str | None,
    kind: str,
    summary: str,
) -> Node:
    if session.exec(select(Node).where(Node.curve_key == caller.key)).first() is not None:
        raise RemoteError(errors.REFUSED, "this key is already enrolled as another node")
    if session.exec(select(Node).where(Node.name == name)).first() is not None:
        raise RemoteError(
            errors.CONFLICT, f"a node named {name!r} already exists; choose another name with --node-name"
        )
    node = Node(
        name=name,
        tags=sorted(set(tags)),
        curve_key=caller.key,
        sign_key=sign_key or None,
        agent_version=(agent_version or None),
    )
    session.add(node)
    session.flush()
    vpn_ids = [repo.add_member(session, node, vpn, "member").vpn_id for vpn in vpns]
    if owner is not None:
        session.add(NodeOwner(node_id=node.id or 0, user_name=owner))
    repo.record(session, kind, summary, caller.caller if owner is None else f"user:{owner}", vpn_ids, [node.id or 0])
    return node
