"""Users: local ones with an argon2id hash, realm ones (user@realm) whose directory owns the password.

Repository functions in the datastore's style: they run in the caller's
transaction and never commit; bad input raises RemoteError with a code from
bus.errors. Hashing is not done here: callers hash outside the transaction
(120 ms that must not hold the database's write lock).
"""

from __future__ import annotations

import re

from sqlmodel import Session, col, select

from bus import errors
from bus.errors import RemoteError
from bus.messages.auth import UserInfo
from services.datastore import repo
from services.datastore.models import Node, NodeOwner, User, UserVpn, Vpn

USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}(@[A-Za-z0-9][A-Za-z0-9_.-]{0,62})?$")


def check_name(name: str) -> str:
    if not USER_NAME.match(name):
        raise RemoteError(
            errors.INVALID,
            f"user name {name!r} is invalid: use letters, digits, '-', '_' or '.', and @REALM for a realm user",
        )
    return name


def is_realm_user(name: str) -> bool:
    return "@" in name


def find(session: Session, name: str) -> User | None:
    return session.exec(select(User).where(User.name == name)).first()


def get(session: Session, name: str) -> User:
    user = find(session, name)
    if user is None:
        raise repo.not_found("user", name)
    return user


def add(session: Session, name: str, password_hash: str) -> User:
    check_name(name)
    if is_realm_user(name):
        raise RemoteError(errors.INVALID, f"{name} is a realm user: its directory owns the password")
    if find(session, name) is not None:
        raise repo.conflict(f"a user named {name!r} already exists")
    user = User(name=name, password_hash=password_hash)
    session.add(user)
    session.flush()
    return user


def allow(session: Session, name: str, vpn_name: str, allowed: bool) -> str:
    vpn = repo.vpn_by_name(session, vpn_name)
    user = find(session, check_name(name))
    if user is None and is_realm_user(name) and allowed:
        user = User(name=name)  # a realm user gets its row when first allowed somewhere
        session.add(user)
        session.flush()
    if user is None:
        raise repo.not_found("user", name)
    link = session.get(UserVpn, (user.id, vpn.id))
    if allowed and link is None:
        session.add(UserVpn(user_id=user.id or 0, vpn_id=vpn.id or 0))
    elif not allowed and link is not None:
        session.delete(link)
    session.flush()
    return f"{'allowed' if allowed else 'disallowed'} {name}'s nodes {'into' if allowed else 'from'} VPN {vpn_name}"


def allowed_vpns(session: Session, name: str) -> list[Vpn]:
    return list(
        session.exec(
            select(Vpn)
            .join(UserVpn, col(UserVpn.vpn_id) == col(Vpn.id))
            .join(User, col(User.id) == col(UserVpn.user_id))
            .where(User.name == name)
            .order_by(col(Vpn.name))
        ).all()
    )


def listing(session: Session) -> list[UserInfo]:
    users = session.exec(select(User).order_by(col(User.name))).all()
    vpns: dict[int, list[str]] = {}
    for user_id, vpn_name in session.exec(select(UserVpn.user_id, Vpn.name).join(Vpn)).all():
        vpns.setdefault(user_id, []).append(vpn_name)
    nodes: dict[str, list[str]] = {}
    for owner, node_name in session.exec(select(NodeOwner.user_name, Node.name).join(Node)).all():
        nodes.setdefault(owner, []).append(node_name)
    return [
        UserInfo(
            name=u.name,
            kind="realm" if is_realm_user(u.name) else "local",
            locked=u.locked,
            vpns=sorted(vpns.get(u.id or 0, [])),
            nodes=sorted(nodes.get(u.name, [])),
            created_at=u.created_at,
            password_changed_at=u.password_changed_at,
        )
        for u in users
    ]


def owner_of(session: Session, node_name: str) -> str | None:
    row = session.exec(
        select(NodeOwner.user_name).join(Node, col(Node.id) == col(NodeOwner.node_id)).where(Node.name == node_name)
    ).first()
    return row
