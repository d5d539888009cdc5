"""Who may use the relay, and who may reach whom through it: one snapshot of the datastore per revision.

A node authenticates with its Ed25519 identity key (``Node.sign_key``, set
at enrollment). A packet from A is forwarded to B only while B is in A's
netmap (World.view: nodes sharing a VPN, less hub-spoke spokes and pairs no
ACL rule connects), the same relation keydist relays keys on, so the relay
never joins two nodes that could not have derived keys for each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from services.datastore.db import reading
from services.datastore.netmap import World, latest


@dataclass
class Trust:
    revision: int
    world: World
    sign_keys: dict[str, str]  # node name -> Ed25519 public key (hex)
    _ids: dict[str, int]
    _peers: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> Trust:
        return cls(-1, World({}, {}, {}, {}, {}, {}), {}, {})

    @classmethod
    def from_world(cls, revision: int, world: World) -> Trust:
        sign_keys = {n.name: n.sign_key for n in world.nodes.values() if n.sign_key}
        return cls(revision, world, sign_keys, {n.name: i for i, n in world.nodes.items()})

    def peers(self, name: str) -> frozenset[str]:
        """The nodes *name* may send to (computed once per snapshot; only the relay thread calls it)."""
        found = self._peers.get(name)
        if found is None:
            node_id = self._ids.get(name)
            found = frozenset(self.world.view(node_id).peers) if node_id is not None else frozenset()
            self._peers[name] = found
        return found


def load_trust(engine: Engine, current: Trust) -> Trust:
    """The datastore's newest snapshot; *current* itself (one cheap query) when no revision was committed."""
    with reading(engine) as session:
        world, head = latest(session, current.world if current.revision >= 0 else None, current.revision)
    return current if head == current.revision else Trust.from_world(head, world)
