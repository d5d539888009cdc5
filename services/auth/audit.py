"""The audit log: one row per login, failure, lockout, token use, password change and operator action.

Rows are written in the transaction of what they record when there is one
(a login that creates a node, an operator's change), so the log never claims
something that did not commit, nor misses something that did. Refusals have
no transaction of their own and are written alone.
"""

from __future__ import annotations

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from bus.messages.auth import AuditInfo
from services.datastore.db import transaction
from services.datastore.models import AuditEntry

# Event names (stable: scripts filter on them).
LOGIN_OK = "login.ok"
LOGIN_FAIL = "login.fail"
LOGIN_THROTTLED = "login.throttled"
LOCKOUT = "lockout"
ENROLL_OK = "enroll.ok"
ENROLL_FAIL = "enroll.fail"
TOKEN_USE = "token.use"
PASSWORD_CHANGE = "password.change"
PASSWORD_CHANGE_FAIL = "password.change.fail"
PASSWORD_ACK = "password.ack"
OPERATOR = "operator"


def add(session: Session, event: str, identity: str, source: str, ok: bool, detail: str = "") -> AuditEntry:
    entry = AuditEntry(event=event, identity=identity[:160], source=source[:80], ok=ok, detail=detail[:300])
    session.add(entry)
    session.flush()
    return entry


def write(engine: Engine, event: str, identity: str, source: str, ok: bool, detail: str = "") -> int:
    """Record one entry in a transaction of its own; returns its id."""
    with transaction(engine) as session:
        return add(session, event, identity, source, ok, detail).id or 0


def read(session: Session, since: int, limit: int) -> tuple[list[AuditInfo], int]:
    rows = session.exec(
        select(AuditEntry).where(col(AuditEntry.id) > since).order_by(col(AuditEntry.id)).limit(limit)
    ).all()
    head = session.exec(select(func.max(AuditEntry.id))).first() or 0
    return [AuditInfo.model_validate(row, from_attributes=True) for row in rows], int(head)
