"""Messages of keydist: signed ephemeral X25519 keys, published by nodes and relayed to their peers.

Each node publishes, per epoch, an X25519 public key with the time it becomes
usable (``not_before``) and the time it must no longer be used (``expires``),
both Unix seconds, signed with the node's Ed25519 identity key (whose public
half the datastore holds as ``Node.sign_key``). Keydist checks the signature
and relays the key only to the node's peers; peers check the signature again
against the ``sign_key`` of their netmap, so a server that forges or swaps a
key is caught at the receiving node. Only public keys ever cross the bus.

The signature covers :func:`publication_payload`, a fixed binary layout (no
JSON, no field order to agree on)::

    b"coterie/epoch-key/v1\\0" | len(node) u16 | node (UTF-8) | epoch u64 | public key (32)
    | not_before u64 | expires u64
"""

from __future__ import annotations

import struct

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from pydantic import BaseModel, ConfigDict, Field

from bus.messages import Message, register

SIGNATURE_CONTEXT = b"coterie/epoch-key/v1\x00"
PUBLIC_KEY_SIZE = 32  # X25519 (RFC 7748 section 5)
SIGNATURE_SIZE = 64  # Ed25519 (RFC 8032 section 5.1.6)
MAX_NODE_NAME = 64
_U64 = 2**64 - 1
_NUMBERS = struct.Struct("!Q32sQQ")


def publication_payload(node: str, epoch: int, public_key: bytes, not_before: int, expires: int) -> bytes:
    """The exact bytes a node signs for one epoch key (the layout of the module docstring)."""
    name = node.encode()
    return b"".join(
        (SIGNATURE_CONTEXT, struct.pack("!H", len(name)), name, _NUMBERS.pack(epoch, public_key, not_before, expires))
    )


class PeerKey(BaseModel):
    """One node's signed epoch key, as keydist stores and relays it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: str = Field(min_length=1, max_length=MAX_NODE_NAME)
    epoch: int = Field(ge=0, le=_U64)
    public_key: bytes = Field(min_length=PUBLIC_KEY_SIZE, max_length=PUBLIC_KEY_SIZE)
    not_before: int = Field(ge=0, le=_U64)
    expires: int = Field(ge=0, le=_U64)
    signature: bytes = Field(min_length=SIGNATURE_SIZE, max_length=SIGNATURE_SIZE)

    def payload(self) -> bytes:
        return publication_payload(self.node, self.epoch, self.public_key, self.not_before, self.expires)

    def verify(self, sign_key_hex: str | None) -> bool:
        """True if *sign_key_hex* (the node's Ed25519 identity, hex) signed exactly this key."""
        if not sign_key_hex:
            return False
        try:
            VerifyKey(bytes.fromhex(sign_key_hex)).verify(self.payload(), self.signature)
        except (BadSignatureError, ValueError):
            return False
        return True


@register
class PublishKey(Message):
    """Node -> keydist: my key for one epoch. Reply: KeyPublished.

    The node is the caller (its CURVE key); the signature must cover the
    caller's node name. Publishing the key keydist already holds for that
    epoch again is accepted (agents republish periodically and on reconnect).
    Errors: ``bad_signature`` (not signed by the node's identity key, or the
    node has none), ``stale_epoch`` (older than the newest epoch keydist holds
    for the node, or a different key for an epoch it holds), ``expired``
    (``expires`` has passed), ``invalid`` (a lifetime or start outside the
    bounds keydist accepts), ``forbidden`` (the caller is not an enrolled node).
    """

    KIND = "keydist.publish"
    epoch: int = Field(ge=0, le=_U64)
    public_key: bytes = Field(min_length=PUBLIC_KEY_SIZE, max_length=PUBLIC_KEY_SIZE)
    not_before: int = Field(ge=0, le=_U64)
    expires: int = Field(ge=0, le=_U64)
    signature: bytes = Field(min_length=SIGNATURE_SIZE, max_length=SIGNATURE_SIZE)

    def as_peer_key(self, node: str) -> PeerKey:
        return PeerKey(node=node, **self.model_dump())


@register
class KeyPublished(Message):
    """Reply to PublishKey: the epoch is stored; ``relayed``: how many peers (online or lately seen) got it."""

    KIND = "keydist.published"
    epoch: int
    relayed: int = 0
    fresh: bool = True  # False when keydist already held this exact key (a republish)


@register
class FetchPeerKeys(Message):
    """Node -> keydist: the keys keydist holds for my peers (all, or those named). Reply: PeerKeys.

    Names that are not the caller's peers (no shared VPN, or not visible in its
    netmap) are left out silently, exactly like peers without keys yet.
    Errors: ``forbidden`` (the caller is not an enrolled node).
    """

    KIND = "keydist.fetch"
    peers: list[str] | None = Field(default=None, max_length=10_000)


@register
class PeerKeys(Message):
    """Reply to FetchPeerKeys: up to the two newest unexpired epochs of each peer."""

    KIND = "keydist.peer_keys"
    keys: list[PeerKey] = Field(default_factory=list)


@register
class PeerKeyUpdate(Message):
    """Push, keydist -> node: a peer published a new epoch key."""

    KIND = "keydist.update"
    key: PeerKey
