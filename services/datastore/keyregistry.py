"""The nodes' CURVE keys as a key registry, for the broker.

The broker asks on every message, so lookups are dictionary accesses; the
dictionary is reloaded when the change log's head revision moves, checked at
most every REFRESH seconds (MISS_REFRESH for a key not known yet, so that a
node may call the moment its enrollment commits). Removing a node (or its key) therefore takes
effect on live connections within REFRESH plus one request.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from bus.identity import Identity, Role
from services.datastore import repo
from services.datastore.db import reading
from services.datastore.models import Change, Node

log = logging.getLogger(__name__)

REFRESH = 0.2
# Changes that never add, remove or rename a node key: when every change since the last load is one of
# these, the keys are not read again. Presence alone (10,000 agents coming online) moved the head several
# times a second and made the broker re-read every node key each time, stalling it for seconds.
KEY_NEUTRAL = frozenset(
    {
        "node.online",
        "node.offline",
        "node.endpoints",
        "node.set",
        "route.add",
        "route.remove",
        "acl.add",
        "acl.remove",
        "member.add",
        "member.remove",
        "vpn.create",
    }
)
MISS_REFRESH = 0.02  # an unknown key re-reads sooner: a node that just enrolled calls at once


class DatastoreKeyRegistry:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._keys: dict[str, Identity] = {}
        self._revision = -1
        self._checked = 0.0

    def lookup(self, key: str) -> Identity | None:
        now = time.monotonic()
        identity = self._keys.get(key)
        if now - self._checked >= (REFRESH if identity is not None else MISS_REFRESH):
            self._checked = now
            self.refresh()
            identity = self._keys.get(key)
        return identity

    def refresh(self) -> None:
        try:
            with reading(self.engine) as session:
                revision = repo.head_revision(session)
                if revision == self._revision:
                    return
                if self._revision >= 0 and self._only_neutral(session, revision):
                    self._revision = revision
                    return
                rows = session.exec(select(Node.curve_key, Node.name).where(col(Node.curve_key).is_not(None))).all()
        except SQLAlchemyError as exc:  # not migrated yet, or the database is restarting
            log.debug("node keys not refreshed: %s", exc)
            return
        self._keys = {key: Identity(Role.NODE, name, key) for key, name in rows if key}
        self._revision = revision

    def _only_neutral(self, session, revision: int) -> bool:  # type: ignore[no-untyped-def]
        """True if every change after the keys were loaded, up to *revision*, leaves node keys alone."""
        kinds = session.exec(
            select(Change.kind).where(Change.revision > self._revision, Change.revision <= revision).distinct()
        ).all()
        return set(kinds) <= KEY_NEUTRAL
