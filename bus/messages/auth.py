"""Messages of the auth service: enrollment, password login, password change, users, tokens, audit.

Anonymous callers may send Enroll and Login (and PasswordChange naming a user); nodes may send
PasswordChange for their own user; the rest is for operators. Refusals of credentials are
``refused`` errors whose text is the same for an unknown user, a wrong password and a locked
user; the agent prints it as it comes.
"""

from __future__ import annotations

import base64
from datetime import datetime

import msgpack
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from bus.messages import Message, register

NAME_MAX = 128  # user names: local names, or user@realm
PASSWORD_MAX = 1024  # bytes; longer passwords are refused before hashing


@register
class Enroll(Message):
    """Anonymous -> auth: trade a join secret for membership of the key registry.

    The caller's CURVE key (its connection's key) becomes the node's key; the
    secret is then spent. Reply: Enrolled. Errors: ``refused`` (unknown,
    used or expired secret; the message says which).
    """

    KIND = "auth.enroll"
    secret: str = Field(min_length=16, max_length=128)
    sign_key: str = Field(default="", max_length=64)  # the node's Ed25519 identity key (hex)
    agent_version: str = ""
    node_name: str = Field(default="", max_length=64)  # for enrollment tokens: the name wanted (default hostname)
    hostname: str = Field(default="", max_length=64)


@register
class Enrolled(Message):
    """Reply to Enroll: who the node is now, and the key the server signs views with."""

    KIND = "auth.enrolled"
    node: str
    server_sign_key: str


JOIN_PREFIX = "coterie1:"


class JoinString(BaseModel):
    """What a node needs to enroll, as one line: server endpoints, server keys, a one-time secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: list[str] = Field(min_length=1)
    server_key: str = Field(min_length=40, max_length=40)  # CURVE, Z85
    sign_key: str = Field(min_length=64, max_length=64)  # Ed25519, hex
    secret: str = Field(min_length=16, max_length=128)

    def encode(self) -> str:
        packed = msgpack.packb([self.endpoints, self.server_key, self.sign_key, self.secret])
        return JOIN_PREFIX + base64.urlsafe_b64encode(packed).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JoinString:
        """Parse a join string; ValueError says what is wrong with it."""
        text = text.strip()
        if not text.startswith(JOIN_PREFIX):
            raise ValueError(f"a join string starts with {JOIN_PREFIX!r}")
        body = text[len(JOIN_PREFIX) :]
        try:
            fields = msgpack.unpackb(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            endpoints, server_key, sign_key, secret = fields
            return cls(endpoints=endpoints, server_key=server_key, sign_key=sign_key, secret=secret)
        except (ValueError, TypeError, msgpack.UnpackException, pydantic.ValidationError) as exc:
            raise ValueError(f"the join string is damaged (copy it again whole): {type(exc).__name__}") from None


@register
class Login(Message):
    """Anonymous -> auth: log a new node in with a user's password (local, or user@realm).

    On success the node is created (named ``node_name``, else ``user-hostname``), joins the VPNs the
    user is allowed into, and the caller's CURVE key becomes its key, as with Enroll. Reply: Enrolled.
    Errors: ``refused`` (wrong user or password, locked user, or too many attempts: one text for all),
    ``conflict`` (the node name is taken), ``invalid``.
    """

    KIND = "auth.login"
    user: str = Field(min_length=1, max_length=NAME_MAX)
    password: str = Field(max_length=PASSWORD_MAX, repr=False)
    node_name: str = Field(default="", max_length=64)
    hostname: str = Field(default="", max_length=64)
    sign_key: str = Field(default="", max_length=64)
    agent_version: str = ""


@register
class PasswordChange(Message):
    """Node (or anonymous user) -> auth: change a password, proving the old one.

    A node changes the password of the user that logged it in (``user`` may be empty); an anonymous
    caller names the user. Reply: PasswordChanged. Errors: ``refused`` (old password wrong, or a
    realm user: the directory owns the password), ``invalid`` (the new password is too short).
    """

    KIND = "auth.password_change"
    user: str = Field(default="", max_length=NAME_MAX)
    old_password: str = Field(max_length=PASSWORD_MAX, repr=False)
    new_password: str = Field(max_length=PASSWORD_MAX, repr=False)


@register
class PasswordChanged(Message):
    """Reply to PasswordChange: applied; ``change_id`` is what the agent acknowledges."""

    KIND = "auth.password_changed"
    user: str
    change_id: int


@register
class PasswordChangeAck(Message):
    """Node -> auth (a notification): the agent has told its user that the change is done. Reply: Done."""

    KIND = "auth.password_change_ack"
    change_id: int


# ---------------------------------------------------------------------- operator requests
@register
class Done(Message):
    """Reply to an operator request of the auth service: what it did, in one line."""

    KIND = "auth.done"
    summary: str


@register
class UserAdd(Message):
    """Create a local user with a password (hashed with argon2id at once). Errors: conflict, invalid."""

    KIND = "auth.user_add"
    name: str = Field(min_length=1, max_length=NAME_MAX)
    password: str = Field(max_length=PASSWORD_MAX, repr=False)


@register
class UserRemove(Message):
    """Remove a user (its nodes stay; they cannot log in again by password). Errors: not_found."""

    KIND = "auth.user_remove"
    name: str = Field(max_length=NAME_MAX)


@register
class UserLock(Message):
    """Lock (or unlock) a user: a locked user's logins are refused like a wrong password."""

    KIND = "auth.user_lock"
    name: str = Field(max_length=NAME_MAX)
    locked: bool = True


@register
class UserAllow(Message):
    """Allow (or disallow) a user's nodes into a VPN at their next login. A realm user's row is made on demand."""

    KIND = "auth.user_allow"
    name: str = Field(max_length=NAME_MAX)
    vpn: str = Field(max_length=64)
    allow: bool = True


@register
class UserListRequest(Message):
    KIND = "auth.user_list_request"


class UserInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: str  # local | realm
    locked: bool
    vpns: list[str]
    nodes: list[str]
    created_at: datetime
    password_changed_at: datetime | None = None


@register
class UserList(Message):
    KIND = "auth.user_list"
    users: list[UserInfo]


@register
class TokenCreate(Message):
    """Create an enrollment token for one VPN; the reply's ``join`` is the join string to hand out."""

    KIND = "auth.token_create"
    vpn: str = Field(max_length=64)
    reusable: bool = False
    uses: int | None = Field(default=None, ge=1, le=1_000_000)
    expires_hours: float = Field(default=24.0, gt=0, le=24 * 365)
    tags: list[str] = Field(default_factory=list)


@register
class TokenCreated(Message):
    KIND = "auth.token_created"
    id: int
    join: str
    summary: str


@register
class TokenListRequest(Message):
    KIND = "auth.token_list_request"


class TokenInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int
    vpn: str
    tags: list[str]
    uses: int
    max_uses: int | None
    expires_at: datetime
    revoked: bool
    state: str  # valid | expired | revoked | used up
    created_by: str


@register
class TokenList(Message):
    KIND = "auth.token_list"
    tokens: list[TokenInfo]


@register
class TokenRevoke(Message):
    KIND = "auth.token_revoke"
    id: int


@register
class AuditRequest(Message):
    """Operator -> auth: audit entries after ``since`` (an entry id), oldest first. Reply: AuditLog."""

    KIND = "auth.audit_request"
    since: int = Field(default=0, ge=0)
    limit: int = Field(default=100, ge=1, le=1000)


class AuditInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int
    at: datetime
    event: str
    identity: str
    source: str
    ok: bool
    detail: str


@register
class AuditLog(Message):
    KIND = "auth.audit_log"
    entries: list[AuditInfo]
    head: int  # the newest entry's id
