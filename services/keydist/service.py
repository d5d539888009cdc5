"""Key distribution: relays signed ephemeral public keys between co-members.

Nodes call it to publish and fetch keys. The foundation answers ping and health.
"""

from __future__ import annotations

from bus.identity import Role
from bus.worker import Worker


class KeydistService(Worker):
    service = "keydist"
    allow = (Role.NODE, Role.OPERATOR, Role.SERVICE)
