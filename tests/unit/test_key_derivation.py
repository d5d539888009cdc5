"""Pair derivation (X25519 + HKDF-SHA256) and signed epoch keys: both ends agree, forgeries fail.

A packet sealed by one end with nodeagent.esp opens at the other end, in
both directions; anything that changes the transcript (a name, an epoch, a
key) changes every SA; SPIs never fall in 0..255; a key signed by anyone but
the node's identity, or altered after signing, is refused by the receiving
node and by the message's own check.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from scapy.layers.inet import IP, UDP
from scapy.packet import raw

from bus.messages.keys import PeerKey, PeerKeyUpdate
from nodeagent.esp import DropReason, InboundSA, Opened, OutboundSA
from nodeagent.keys import MIN_SPI, EpochKeys, KeyRing, derive_pair, public_bytes, spi_from

NOW = 1_800_000_000.0


def _packet(payload: bytes = b"hello") -> bytes:
    return raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / payload)


def _pair(name_a: str = "alpha", name_b: str = "bravo", epoch_a: int = 7, epoch_b: int = 9):
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    at_a = derive_pair(name_a, a, epoch_a, name_b, public_bytes(b), epoch_b)
    at_b = derive_pair(name_b, b, epoch_b, name_a, public_bytes(a), epoch_a)
    return at_a, at_b


def test_both_ends_derive_mirrored_sas() -> None:
    at_a, at_b = _pair()
    assert at_a.outbound == at_b.inbound
    assert at_a.inbound == at_b.outbound
    assert at_a.outbound.spi != at_a.inbound.spi
    assert at_a.outbound.key != at_a.inbound.key


@pytest.mark.parametrize(("name_a", "name_b"), [("alpha", "bravo"), ("zulu", "alpha"), ("n1", "n10")])
def test_a_packet_sealed_by_one_end_opens_at_the_other(name_a: str, name_b: str) -> None:
    at_a, at_b = _pair(name_a, name_b)
    for sender, receiver in ((at_a, at_b), (at_b, at_a)):
        out = OutboundSA(sender.outbound.spi, sender.outbound.key, sender.outbound.salt)
        inbound = InboundSA(receiver.inbound.spi, receiver.inbound.key, receiver.inbound.salt)
        inner = _packet(b"x" * 100)
        opened = inbound.open(out.seal(inner))
        assert isinstance(opened, Opened)
        assert bytes(opened.inner) == inner
        # The reverse SA is a different key: a packet on the wrong direction fails.
        wrong = InboundSA(sender.outbound.spi, receiver.outbound.key, receiver.outbound.salt)
        assert wrong.open(out.seal(inner)) is DropReason.AUTH_FAILED


def test_the_transcript_binds_names_epochs_and_keys() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    base = derive_pair("alpha", a, 1, "bravo", public_bytes(b), 2)
    variants = [
        derive_pair("alpha", a, 1, "bravo", public_bytes(b), 3),  # peer epoch
        derive_pair("alpha", a, 5, "bravo", public_bytes(b), 2),  # my epoch
        derive_pair("alpha", a, 1, "charlie", public_bytes(b), 2),  # peer name
        derive_pair("aaron", a, 1, "bravo", public_bytes(b), 2),  # my name
        derive_pair("alpha", X25519PrivateKey.generate(), 1, "bravo", public_bytes(b), 2),  # my key
    ]
    for other in variants:
        assert other.outbound.key != base.outbound.key
        assert other.inbound.key != base.inbound.key


def test_degenerate_pairs_are_refused() -> None:
    key = X25519PrivateKey.generate()
    with pytest.raises(ValueError, match="itself"):
        derive_pair("alpha", key, 1, "alpha", public_bytes(key), 1)
    with pytest.raises(ValueError):
        derive_pair("alpha", key, 1, "bravo", bytes(32), 1)  # a low-order point: all-zero secret


@given(st.binary(min_size=4, max_size=4))
@settings(max_examples=300, deadline=None)
def test_spis_never_reserved(raw4: bytes) -> None:
    assert MIN_SPI <= spi_from(raw4) <= 0xFFFF_FFFF


def test_spi_edges() -> None:
    assert spi_from(bytes(4)) == MIN_SPI
    assert spi_from(b"\xff" * 4) <= 0xFFFF_FFFF
    assert spi_from((0xFFFF_FFFF - MIN_SPI + 1).to_bytes(4, "big")) == MIN_SPI


# ---------------------------------------------------------------------------- signatures
def _signed(identity: SigningKey, node: str = "alpha") -> PeerKey:
    keys = EpochKeys(node, identity, NOW)
    pub = keys.newest.publication()
    return pub.as_peer_key(node)


def test_a_signed_key_verifies_with_its_identity_only() -> None:
    identity = SigningKey.generate()
    key = _signed(identity)
    assert key.verify(identity.verify_key.encode().hex())
    assert not key.verify(SigningKey.generate().verify_key.encode().hex())
    assert not key.verify(None)
    assert not key.verify("not hex")


@pytest.mark.parametrize(
    "change",
    [
        {"node": "bravo"},
        {"epoch": 1},
        {"public_key": bytes(32)},
        {"not_before": 1},
        {"expires": 2**40},
    ],
)
def test_any_altered_field_breaks_the_signature(change: dict[str, object]) -> None:
    identity = SigningKey.generate()
    key = _signed(identity)
    altered = key.model_copy(update=change)
    assert not altered.verify(identity.verify_key.encode().hex())


def test_the_receiving_node_refuses_keys_not_signed_by_the_peer() -> None:
    alpha, bravo, mallory = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    ring = KeyRing("alpha", alpha, NOW)
    ring.set_peers({"bravo": bravo.verify_key.encode().hex()}, NOW)
    forged = _signed(mallory, "bravo")  # signed by someone else, claiming to be bravo
    assert not ring.on_push(PeerKeyUpdate(key=forged), NOW)
    assert ring.counters["key_bad_signature"] == 1
    assert ring.peers["bravo"].keys == {}
    wrong_name = _signed(bravo, "charlie")
    assert not ring.on_push(PeerKeyUpdate(key=wrong_name), NOW)
    assert ring.counters["key_not_a_peer"] == 1
    genuine = _signed(bravo, "bravo")
    assert ring.on_push(PeerKeyUpdate(key=genuine), NOW)
    assert genuine.epoch in ring.peers["bravo"].keys


def test_every_start_makes_new_keys_with_a_higher_epoch() -> None:
    """D5: a restarted agent never reuses a key, so never an SA counter."""
    identity = SigningKey.generate()
    first = EpochKeys("alpha", identity, NOW).newest
    second = EpochKeys("alpha", identity, NOW + 0.002).newest
    assert second.public != first.public
    assert second.epoch > first.epoch
    assert first.not_before >= NOW and first.expires > first.not_before
