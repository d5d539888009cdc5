"""The server's Ed25519 signing key: it seals the views pushed to nodes.

A node stores its last view with the server's seal, and trusts it after a
restart only if the seal verifies with the key it learnt at enrollment and
has not expired. The key file holds the 32-byte seed in hex, mode 0600.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path

from nacl.bindings import crypto_sign, crypto_sign_BYTES, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from bus import sealtree
from bus.errors import KeyFileError
from bus.messages import construct
from bus.messages.sync import Seal, batch_payload, seal_payload

VIEW_TTL = 7 * 24 * 3600.0  # how long a stored view stays trusted without the server


def generate_signing_key(path: Path, *, force: bool = False) -> str:
    """Write a new signing key to *path* (0600); return its public half in hex."""
    if path.exists() and not force:
        raise KeyFileError(f"{path} already exists (use --force to replace it)")
    key = SigningKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.encode().hex().encode() + b"\n")
    finally:
        os.close(fd)
    return key.verify_key.encode().hex()


def load_signing_key(path: Path) -> SigningKey:
    try:
        seed = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        raise KeyFileError(f"signing key {path} does not exist; run `coterie init`") from None
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"signing key {path} is corrupt: {exc}") from None
    if len(seed) != 32:
        raise KeyFileError(f"signing key {path} is corrupt: expected 32 bytes, got {len(seed)}")
    return SigningKey(seed)


def seal(key: SigningKey, node_key: str, revision: int, digest: str, ttl: float = VIEW_TTL) -> Seal:
    expires = int(time.time() + ttl)
    signed = crypto_sign(seal_payload(node_key, revision, digest, expires), _secret(key))
    return Seal.model_construct(expires=expires, signature=signed[: crypto_sign_BYTES].hex())


def seal_many(key: SigningKey, views: list[tuple[str, int, str]], ttl: float = VIEW_TTL) -> list[Seal]:
    """Seals for several (node key, revision, digest) with one signature, in the same order.

    Each seal signs the root of a hash tree over all their payloads and carries its own path to
    that root (bus/sealtree.py): one Ed25519 signature per batch instead of one per node.
    """
    if not views:
        return []
    expires = int(time.time() + ttl)
    root, paths = sealtree.build([sealtree.leaf(seal_payload(k, r, d, expires)) for k, r, d in views])
    signature = crypto_sign(batch_payload(root), _secret(key))[:crypto_sign_BYTES].hex()
    hexes: dict[bytes, str] = {}  # a hash near the root is on many paths: hex it once
    return [
        construct(
            Seal,
            expires=expires,
            signature=signature,
            proof=[hexes.get(h) or hexes.setdefault(h, h.hex()) for h in path],
        )
        for path in paths
    ]


@lru_cache(maxsize=4)
def _secret(key: SigningKey) -> bytes:
    """The 64-byte libsodium secret key: the fanout seals one view per node and change, and SigningKey.sign
    wraps each signature in a SignedMessage it throws away (a third of a seal's cost)."""
    return crypto_sign_seed_keypair(key.encode())[1]


def verify_seal(public_hex: str, node_key: str, revision: int, digest: str, sealed: Seal, now: float) -> str | None:
    """None if the seal is good and current, else the reason it is not."""
    try:
        signed = seal_payload(node_key, revision, digest, sealed.expires)
        if sealed.proof is not None:  # one of a batch: the signature is over the root this view's path leads to
            signed = batch_payload(sealtree.root_of(sealtree.leaf(signed), [bytes.fromhex(h) for h in sealed.proof]))
        VerifyKey(bytes.fromhex(public_hex)).verify(signed, bytes.fromhex(sealed.signature))
    except (BadSignatureError, ValueError):
        return "the server's signature does not match (the stored view was altered)"
    if now > sealed.expires:
        return "the stored view has expired"
    return None
