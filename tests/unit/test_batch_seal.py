"""One signature for a batch of views (bus/sealtree.py, bus/signing.seal_many): each view still checks alone.

The fanout seals a change to thousands of nodes with one Ed25519 signature over a hash tree; a node keeps
its own seal and path, and after a restart must accept exactly its own view at that revision, nothing else.
"""

from __future__ import annotations

import time

import pytest
from nacl.signing import SigningKey

from bus import sealtree
from bus.messages.sync import Seal
from bus.signing import seal_many, verify_seal

SIGNER = SigningKey.generate()
PUBLIC = SIGNER.verify_key.encode().hex()


def batch(count: int, revision: int = 9) -> list[tuple[str, int, str]]:
    return [(f"node-key-{i}", revision, f"{i:064x}") for i in range(count)]


@pytest.mark.parametrize("count", [1, 2, 3, 7, 8, 100, 257])
def test_every_view_of_a_batch_verifies_with_its_own_seal(count: int) -> None:
    views = batch(count)
    seals = seal_many(SIGNER, views)
    assert len(seals) == count
    assert len({s.signature for s in seals}) == 1  # one signature for the whole batch
    now = time.time()
    for (key, revision, digest), sealed in zip(views, seals, strict=True):
        assert verify_seal(PUBLIC, key, revision, digest, sealed, now) is None
    # A path is no longer than the tree is deep.
    assert max(len(s.proof or []) for s in seals) == (count - 1).bit_length()


def test_a_batch_seal_vouches_for_no_other_view_of_the_batch() -> None:
    """A node cannot present a neighbour's seal for its own view, nor its seal for a neighbour's view."""
    views = batch(16)
    seals = seal_many(SIGNER, views)
    now = time.time()
    for i, (key, revision, digest) in enumerate(views):
        other = seals[(i + 1) % len(seals)]
        problem = verify_seal(PUBLIC, key, revision, digest, other, now)
        assert problem is not None and "altered" in problem
    key, revision, digest = views[3]
    for changed in [(key + "x", revision, digest), (key, revision + 1, digest), (key, revision, views[4][2])]:
        problem = verify_seal(PUBLIC, *changed, seals[3], now)
        assert problem is not None and "altered" in problem


def test_a_tampered_path_or_expiry_fails_without_raising() -> None:
    views = batch(8)
    sealed = seal_many(SIGNER, views)[5]
    key, revision, digest = views[5]
    assert sealed.proof
    now = time.time()
    flipped = sealed.proof[0][:-1] + ("0" if sealed.proof[0][-1] != "0" else "1")
    variants = [
        Seal(expires=sealed.expires, signature=sealed.signature, proof=[flipped, *sealed.proof[1:]]),
        Seal(expires=sealed.expires, signature=sealed.signature, proof=sealed.proof[:-1]),  # a level short
        Seal(expires=sealed.expires, signature=sealed.signature, proof=[*sealed.proof, "00" * 32]),  # one too many
        Seal(expires=sealed.expires, signature=sealed.signature, proof=["abcd", *sealed.proof[1:]]),  # not a hash
        Seal(expires=sealed.expires, signature=sealed.signature, proof=["zz" * 32, *sealed.proof[1:]]),  # not hex
        Seal(expires=sealed.expires + 60, signature=sealed.signature, proof=sealed.proof),
        Seal(expires=sealed.expires, signature=sealed.signature),  # the batch signature read as a single one
    ]
    for variant in variants:
        problem = verify_seal(PUBLIC, key, revision, digest, variant, now)
        assert problem is not None and "altered" in problem
    assert verify_seal(PUBLIC, key, revision, digest, sealed, now) is None


def test_an_expired_batch_seal_is_refused() -> None:
    views = batch(4)
    sealed = seal_many(SIGNER, views, ttl=100)[2]
    key, revision, digest = views[2]
    assert verify_seal(PUBLIC, key, revision, digest, sealed, sealed.expires - 1) is None
    assert verify_seal(PUBLIC, key, revision, digest, sealed, sealed.expires + 1) == "the stored view has expired"


def test_a_leaf_cannot_pass_for_an_inner_node() -> None:
    """Leaves and inner nodes hash under different prefixes (the classic second-preimage on hash trees)."""
    a, b = sealtree.leaf(b"a"), sealtree.leaf(b"b")
    inner = sealtree.parent(a, b)
    assert sealtree.leaf(min(a, b) + max(a, b)) != inner
    assert sealtree.parent(a, b) == sealtree.parent(b, a)  # sorted pairs: a path needs no left/right bits
    with pytest.raises(ValueError):
        sealtree.build([])


def test_an_empty_batch_needs_no_signature() -> None:
    assert seal_many(SIGNER, []) == []
