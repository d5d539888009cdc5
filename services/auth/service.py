"""Authentication: enrollment with one-time join secrets (credentials and realms come later).

Anonymous callers are allowed here and nowhere else: a node that has not
enrolled yet has no known key, and enrollment is how it gets one. The
caller's CURVE key (proven by its handshake) becomes the node's key, so the
secret alone is useless to someone who cannot also hold that connection.
"""

from __future__ import annotations

import logging

from sqlmodel import select

from bus import errors
from bus.errors import RemoteError
from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.messages.auth import Enroll, Enrolled
from bus.worker import Handler, Worker
from services.datastore import repo
from services.datastore.db import make_engine, migrate, transaction
from services.datastore.models import JoinToken, Node, utcnow

log = logging.getLogger(__name__)


class AuthService(Worker):
    service = "auth"
    allow = (Role.ANONYMOUS, Role.NODE, Role.OPERATOR, Role.SERVICE)

    def __init__(self, endpoint: str, keypair: KeyPair, server_key: bytes, *, database_url: str, sign_key: str) -> None:
        super().__init__(endpoint, keypair, server_key)
        self.engine = make_engine(database_url)
        migrate(self.engine)
        self.sign_key = sign_key

    def handlers(self) -> dict[type, Handler]:
        return {**super().handlers(), Enroll: self.on_enroll}

    def on_enroll(self, request: Enroll, caller: Identity) -> Enrolled:
        with transaction(self.engine) as session:
            token = session.exec(
                select(JoinToken).where(JoinToken.secret_hash == repo.hash_secret(request.secret))
            ).first()
            reason = _refusal(token, caller)
            if reason is not None:
                log.warning("enrollment refused for %s: %s", caller.caller, reason)
                raise RemoteError(errors.REFUSED, reason)
            assert token is not None
            node = session.get(Node, token.node_id)
            assert node is not None
            if session.exec(select(Node).where(Node.curve_key == caller.key)).first() is not None:
                raise RemoteError(errors.REFUSED, "this key is already enrolled as another node")
            node.curve_key = caller.key
            node.sign_key = request.sign_key or None
            node.agent_version = request.agent_version or None
            token.used_at = utcnow()
            repo.record(session, "node.enroll", f"node {node.name} enrolled", f"node:{node.name}", [], [node.id or 0])
            name = node.name
        log.info("node %s enrolled with key %s", name, caller.key)
        return Enrolled(node=name, server_sign_key=self.sign_key)


def _refusal(token: JoinToken | None, caller: Identity) -> str | None:
    if token is None:
        return "unknown join secret (check the join string, or ask for a new one)"
    if token.used_at is not None:
        return "this join string has been used already; ask the operator for a new one"
    if _aware(token.expires_at) < utcnow():
        return "this join string has expired; ask the operator for a new one"
    if caller.role not in (Role.ANONYMOUS, Role.NODE):
        return "only nodes enroll"
    return None


def _aware(moment):  # type: ignore[no-untyped-def]
    """SQLite returns naive datetimes for stored UTC values."""
    from datetime import UTC

    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
