"""Keydist's memory: the newest two signed epoch keys of each node, and the rules a key must pass.

Memory only, by design: every agent republishes its live keys every
``REPUBLISH_INTERVAL`` seconds and on each (re)connection, so a restarted
keydist holds every online node's keys again within one interval, and no
key material (public as it is) outlives its use on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from bus import errors
from bus.errors import RemoteError
from bus.messages.keys import PeerKey

KEPT_EPOCHS = 2  # current and next (or previous, during a rollover)
MAX_LIFETIME = 24 * 3600  # seconds from not_before to expires
MAX_AHEAD = 600  # seconds not_before may lie in the future (clock skew plus the agent's lead)


@dataclass(frozen=True)
class Stored:
    key: PeerKey
    sign_key: str  # the identity key that verified it: a node re-enrolled with another one loses it


class KeyStore:
    """Node id -> epoch -> stored key; ``put`` checks a publication, ``keys_of`` relays the unexpired ones."""

    def __init__(self, kept: int = KEPT_EPOCHS) -> None:
        self.kept = kept
        self.by_node: dict[int, dict[int, Stored]] = {}

    def put(self, node_id: int, sign_key: str | None, key: PeerKey, now: float) -> bool:
        """Store *key* for *node_id*; True if new, False for a republish. RemoteError says why not."""
        check(key, sign_key, now)
        assert sign_key is not None
        held = self.by_node.setdefault(node_id, {})
        same = held.get(key.epoch)
        if same is not None:
            if same.key == key and same.sign_key == sign_key:
                return False
            raise RemoteError(errors.STALE_EPOCH, f"epoch {key.epoch} is already held with another key")
        if held and key.epoch < max(held):
            raise RemoteError(errors.STALE_EPOCH, f"epoch {key.epoch} is older than the held {max(held)}")
        held[key.epoch] = Stored(key, sign_key)
        for old in sorted(held)[: -self.kept]:
            del held[old]
        return True

    def keys_of(self, node_id: int, now: float) -> list[PeerKey]:
        return [s.key for _, s in sorted(self.by_node.get(node_id, {}).items()) if s.key.expires > now]

    def retain(self, sign_keys: dict[int, str | None]) -> int:
        """Forget nodes that are gone or whose identity key changed; return how many keys went."""
        dropped = 0
        for node_id in list(self.by_node):
            current = sign_keys.get(node_id)
            held = self.by_node[node_id]
            for epoch in [e for e, s in held.items() if s.sign_key != current]:
                del held[epoch]
                dropped += 1
            if not held:
                del self.by_node[node_id]
        return dropped

    def prune(self, now: float) -> int:
        """Drop expired keys; return how many."""
        dropped = 0
        for node_id in list(self.by_node):
            held = self.by_node[node_id]
            for epoch in [e for e, s in held.items() if s.key.expires <= now]:
                del held[epoch]
                dropped += 1
            if not held:
                del self.by_node[node_id]
        return dropped


def check(key: PeerKey, sign_key: str | None, now: float) -> None:
    """Raise RemoteError unless *key* is signed by *sign_key* and its times are sane and current."""
    if not sign_key:
        raise RemoteError(errors.BAD_SIGNATURE, f"node {key.node} has no identity key (enrolled without one)")
    if not key.verify(sign_key):
        raise RemoteError(errors.BAD_SIGNATURE, f"the key of epoch {key.epoch} is not signed by node {key.node}")
    if key.expires <= now:
        raise RemoteError(errors.EXPIRED, f"the key of epoch {key.epoch} expired {now - key.expires:.0f}s ago")
    if key.expires <= key.not_before or key.expires - key.not_before > MAX_LIFETIME:
        raise RemoteError(errors.INVALID, f"a key must live between 1s and {MAX_LIFETIME}s")
    if key.not_before > now + MAX_AHEAD:
        raise RemoteError(errors.INVALID, f"not_before is more than {MAX_AHEAD}s ahead (check the node's clock)")
