"""The nodes' CURVE keys as a key registry, for the broker.

The broker asks on every message, so lookups are dictionary accesses; the
dictionary is reloaded when the change log's head revision moves, checked at
most every REFRESH seconds. Removing a node (or its key) therefore takes
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
from services.datastore.models import Node

log = logging.getLogger(__name__)

REFRESH = 0.2


class DatastoreKeyRegistry:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._keys: dict[str, Identity] = {}
        self._revision = -1
        self._checked = 0.0

    def lookup(self, key: str) -> Identity | None:
        now = time.monotonic()
        if now - self._checked >= REFRESH:
            self._checked = now
            self.refresh()
        return self._keys.get(key)

    def refresh(self) -> None:
        try:
            with reading(self.engine) as session:
                revision = repo.head_revision(session)
                if revision == self._revision:
                    return
                rows = session.exec(select(Node.curve_key, Node.name).where(col(Node.curve_key).is_not(None))).all()
        except SQLAlchemyError as exc:  # not migrated yet, or the database is restarting
            log.debug("node keys not refreshed: %s", exc)
            return
        self._keys = {key: Identity(Role.NODE, name, key) for key, name in rows if key}
        self._revision = revision
