"""The datastore: the one place that holds the truth (SQLModel, SQLite or PostgreSQL).

Only operators and the other services call it; nodes see the truth only as
their own view, pushed by the fanout. The foundation answers ping and health.
"""

from __future__ import annotations

from bus.identity import Role
from bus.worker import Worker


class DatastoreService(Worker):
    service = "datastore"
    allow = (Role.OPERATOR, Role.SERVICE)
