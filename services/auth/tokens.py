"""Enrollment tokens: a join string for one VPN, reusable or not, limited in uses and in time.

The secret has 192 random bits, so only its SHA-256 is stored (as for the
one-time join strings of ``node add``); a token is refused with the reason
the agent prints: expired, revoked or used up.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from sqlmodel import Session, col, select

from bus.messages.auth import TokenInfo
from services.datastore import repo, validate
from services.datastore.models import EnrollToken, Vpn, utcnow


def create(
    session: Session,
    vpn_name: str,
    *,
    reusable: bool,
    uses: int | None,
    expires_hours: float,
    tags: list[str],
    actor: str,
) -> tuple[EnrollToken, str]:
    """A new token and its secret (shown once; only the hash is kept)."""
    vpn = repo.vpn_by_name(session, vpn_name)
    for tag in tags:
        validate.name(tag, "tag")
    max_uses = uses if uses is not None else (None if reusable else 1)
    secret = secrets.token_urlsafe(24)
    token = EnrollToken(
        secret_hash=repo.hash_secret(secret),
        vpn_id=vpn.id or 0,
        tags=sorted(set(tags)),
        max_uses=max_uses,
        expires_at=utcnow() + timedelta(hours=expires_hours),
        created_by=actor,
    )
    session.add(token)
    session.flush()
    return token, secret


def by_secret(session: Session, secret: str) -> EnrollToken | None:
    return session.exec(select(EnrollToken).where(EnrollToken.secret_hash == repo.hash_secret(secret))).first()


def state(token: EnrollToken, now: datetime) -> str:
    """valid, revoked, expired or used up (in that order of precedence after valid)."""
    if token.revoked_at is not None:
        return "revoked"
    if aware(token.expires_at) <= now:
        return "expired"
    if token.max_uses is not None and token.uses >= token.max_uses:
        return "used up"
    return "valid"


REFUSALS = {
    "revoked": "this enrollment token has been revoked; ask the operator for a new one",
    "expired": "this enrollment token has expired; ask the operator for a new one",
    "used up": "this enrollment token has been used up; ask the operator for a new one",
}


def revoke(session: Session, token_id: int) -> EnrollToken:
    token = session.get(EnrollToken, token_id)
    if token is None:
        raise repo.not_found("token", str(token_id))
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    session.flush()
    return token


def listing(session: Session) -> list[TokenInfo]:
    now = utcnow()
    rows = session.exec(
        select(EnrollToken, Vpn.name).join(Vpn, col(Vpn.id) == col(EnrollToken.vpn_id)).order_by(col(EnrollToken.id))
    ).all()
    return [
        TokenInfo(
            id=t.id or 0,
            vpn=vpn,
            tags=t.tags,
            uses=t.uses,
            max_uses=t.max_uses,
            expires_at=aware(t.expires_at),
            revoked=t.revoked_at is not None,
            state=state(t, now),
            created_by=t.created_by,
        )
        for t, vpn in rows
    ]


def aware(moment: datetime) -> datetime:
    """SQLite returns naive datetimes for stored UTC values."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
