"""Event fan-out: turns the change log into per-node deltas of each node's view.

Nodes call it for snapshots; it pushes their updates through the broker.
The foundation answers ping and health.
"""

from __future__ import annotations

from bus.identity import Role
from bus.worker import Worker


class FanoutService(Worker):
    service = "fanout"
    allow = (Role.NODE, Role.OPERATOR, Role.SERVICE)
