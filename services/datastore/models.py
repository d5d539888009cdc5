"""The datastore schema (DESIGN.md section 2), as SQLModel tables.

Surrogate ids use AUTOINCREMENT on SQLite, as sequences do on PostgreSQL:
an id is never reused after a delete (ACL ids appear in node views, and a
reused id would name two rules over time).

Schema changes are made by adding an Alembic migration under migrations/,
never by editing an old one; ``db.migrate`` brings any database up to date.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class Vpn(SQLModel, table=True):
    __table_args__ = {"sqlite_autoincrement": True}
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=64)
    subnet: str = Field(max_length=64)
    addressing: str = Field(default="overlay", max_length=16)  # overlay | native
    topology: str = Field(default="mesh", max_length=16)  # mesh | hub-spoke
    cipher: str = Field(default="aes256gcm", max_length=32)
    mtu: int = 1400
    keepalive: int = 25
    created_at: datetime = Field(default_factory=utcnow)


class Node(SQLModel, table=True):
    __table_args__ = {"sqlite_autoincrement": True}
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=64)
    curve_key: str | None = Field(default=None, index=True, unique=True, max_length=40)
    sign_key: str | None = Field(default=None, max_length=64)  # Ed25519 identity (hex), from enrollment
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    endpoints: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    public_endpoint: str | None = Field(default=None, max_length=80)
    nat_class: str = Field(default="unknown", max_length=16)  # public | nat | pat | firewalled | unknown
    path_pin: str | None = Field(default=None, max_length=16)  # esp | udp | tcp443 | relay: an operator's choice
    # what the agent's data plane reported it can do (services/datastore/paths.py CAPS)
    caps: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]"))
    online: bool = False
    last_seen: datetime | None = None
    agent_version: str | None = Field(default=None, max_length=32)
    created_at: datetime = Field(default_factory=utcnow)


class Membership(SQLModel, table=True):
    __table_args__ = (
        UniqueConstraint("vpn_id", "vip"),
        UniqueConstraint("node_id", "vpn_id"),
        {"sqlite_autoincrement": True},
    )
    id: int | None = Field(default=None, primary_key=True)
    node_id: int = Field(foreign_key="node.id", index=True, ondelete="CASCADE")
    vpn_id: int = Field(foreign_key="vpn.id", index=True, ondelete="CASCADE")
    vip: str = Field(max_length=64)
    role: str = Field(default="member", max_length=16)  # member | gateway | hub


class GatewayRoute(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("vpn_id", "cidr"), {"sqlite_autoincrement": True})
    id: int | None = Field(default=None, primary_key=True)
    vpn_id: int = Field(foreign_key="vpn.id", index=True, ondelete="CASCADE")
    node_id: int = Field(foreign_key="node.id", index=True, ondelete="CASCADE")
    cidr: str = Field(max_length=64)


class AclRule(SQLModel, table=True):
    __table_args__ = {"sqlite_autoincrement": True}
    id: int | None = Field(default=None, primary_key=True)
    vpn_id: int = Field(foreign_key="vpn.id", index=True, ondelete="CASCADE")
    src: str = Field(max_length=80)  # any | NODE | tag:TAG
    dst: str = Field(max_length=80)
    proto: str = Field(default="any", max_length=8)  # any | tcp | udp | icmp
    ports: str = Field(default="", max_length=200)  # "" (all) or "22,80,8000-8100"


class JoinToken(SQLModel, table=True):
    __table_args__ = {"sqlite_autoincrement": True}
    """A one-time enrollment secret for one node; only its hash is stored."""

    id: int | None = Field(default=None, primary_key=True)
    node_id: int = Field(foreign_key="node.id", index=True, ondelete="CASCADE")
    secret_hash: str = Field(index=True, unique=True, max_length=64)
    expires_at: datetime
    used_at: datetime | None = None


class Counter(SQLModel, table=True):
    """Named counters; the ``revision`` row serialises writers so revisions commit in order."""

    name: str = Field(primary_key=True, max_length=32)
    value: int = 0


class Change(SQLModel, table=True):
    """The append-only change log: one row per committed mutation, in revision order."""

    revision: int = Field(primary_key=True)
    at: datetime = Field(default_factory=utcnow)
    kind: str = Field(max_length=32)
    summary: str = Field(max_length=300)
    actor: str = Field(max_length=120)
    vpn_ids: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    node_ids: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    idempotency_key: str | None = Field(default=None, index=True, unique=True, max_length=64)


class Delivery(SQLModel, table=True):
    """Receipts: which affected node was sent which revision, and when it applied it."""

    revision: int = Field(primary_key=True)
    node_id: int = Field(primary_key=True, foreign_key="node.id", ondelete="CASCADE")
    pushed_at: datetime = Field(default_factory=utcnow)
    applied_at: datetime | None = None


# ---------------------------------------------------------------------- authentication (migration 0002)
class User(SQLModel, table=True):
    """A person whose nodes log in with a password: local (an argon2id hash here) or of a proxy realm.

    A realm user (``alice@corp``) has no hash: the directory owns the password; the row exists so
    that an operator can allow the user into VPNs and lock it.
    """

    __tablename__ = "appuser"  # "user" is a reserved word in PostgreSQL
    __table_args__ = {"sqlite_autoincrement": True}
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=128)
    password_hash: str | None = Field(default=None, max_length=200)
    locked: bool = False
    created_at: datetime = Field(default_factory=utcnow)
    password_changed_at: datetime | None = None


class UserVpn(SQLModel, table=True):
    """An operator's decision: nodes of this user join this VPN when they log in."""

    user_id: int = Field(primary_key=True, foreign_key="appuser.id", ondelete="CASCADE")
    vpn_id: int = Field(primary_key=True, foreign_key="vpn.id", ondelete="CASCADE")


class NodeOwner(SQLModel, table=True):
    """Which user's password logged a node in (for `agent passwd` and the audit)."""

    node_id: int = Field(primary_key=True, foreign_key="node.id", ondelete="CASCADE")
    user_name: str = Field(index=True, max_length=128)


class EnrollToken(SQLModel, table=True):
    """A pre-auth token for one VPN: reusable or not, limited in uses and time; only its hash is stored."""

    __table_args__ = {"sqlite_autoincrement": True}
    id: int | None = Field(default=None, primary_key=True)
    secret_hash: str = Field(index=True, unique=True, max_length=64)
    vpn_id: int = Field(foreign_key="vpn.id", index=True, ondelete="CASCADE")
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    max_uses: int | None = None  # None: unlimited (a reusable token without --uses)
    uses: int = 0
    expires_at: datetime
    revoked_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    created_by: str = Field(default="", max_length=120)


class AuditEntry(SQLModel, table=True):
    """The append-only audit log: logins, failures, lockouts, token uses, password changes, operator actions."""

    __table_args__ = {"sqlite_autoincrement": True}
    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    event: str = Field(max_length=32)  # e.g. login.ok, login.fail, lockout, token.use, password.change, operator
    identity: str = Field(max_length=160)  # the user, node or operator concerned
    source: str = Field(default="", max_length=80)  # peer address as the broker saw it
    ok: bool = True
    detail: str = Field(default="", max_length=300)
