"""ESP with AES-256-GCM: window after auth (D3), ESN and exhaustion (D4), nonce/AAD (D5), trailer (D6).

Packets are checked three ways: by nodeagent.esp itself, by a second ESP
encoder written here with nothing but ``AESGCM`` and ``struct`` (``forge``,
``unseal``), and by scapy's independent ESP implementation.

What scapy's API needed (scapy 2.8): ``SecurityAssociation(ESP, spi=...,
crypt_algo="AES-GCM", crypt_key=key + salt, auth_algo="NULL", tunnel_header=
IP(...), esn_en=..., esn=...)``: the 4-byte salt rides at the end of
``crypt_key`` and AES-GCM needs no separate integrity algorithm. ESN is
supported for GCM (``esn_en=True``; ``esn`` is the high 32 bits, passed per
packet). scapy treats ``seq_num=0`` and ``esn=0`` passed to ``encrypt`` as
"use the SA's default" (``x or self.x``), so these tests give those defaults
on the SA instead. scapy's decrypt does not check the padding bytes, so the
trailer is compared here from its low-level ``crypt_algo.decrypt``. Importing
scapy prints nothing here; ``conf.verb = 0`` keeps it quiet should it want to.
"""

from __future__ import annotations

import os
import struct
from collections import Counter

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.config import conf
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.ipsec import ESP, IPSecIntegrityError, SecurityAssociation
from scapy.packet import Packet, Raw, raw

from nodeagent.constants import (
    REKEY_AFTER_PACKETS,
    SEQ_LOW_MASK,
    SEQ_MAX_32,
    SEQ_MAX_ESN,
)
from nodeagent.esp import (
    INBOUND_PIPELINE,
    Authenticated,
    DropReason,
    EspParseError,
    InboundSA,
    Opened,
    OutboundSA,
    RekeyRequired,
    SpiTable,
    associated_data,
    parse_header,
)
from nodeagent.replay import ReplayVerdict

conf.verb = 0

KEY = bytes(range(0x40, 0x60))
SALT = b"\x0a\x0b\x0c\x0d"
SPI = 0x1000_0001
B = 2**32


# -- an independent encoder and decoder (AESGCM + struct, nothing from nodeagent) -----------


def aad(spi: int, seq: int, esn: bool) -> bytes:
    return struct.pack("!III", spi, seq >> 32, seq & SEQ_LOW_MASK) if esn else struct.pack("!II", spi, seq)


def forge(plaintext: bytes, seq: int, *, esn: bool = True, spi: int = SPI, key: bytes = KEY) -> bytes:
    """An authenticated ESP packet with exactly *plaintext* inside (trailer included)."""
    iv = os.urandom(8)
    ciphertext = AESGCM(key).encrypt(SALT + iv, plaintext, aad(spi, seq, esn))
    return struct.pack("!II", spi, seq & SEQ_LOW_MASK) + iv + ciphertext


def unseal(packet: bytes, seq: int, *, esn: bool = True) -> bytes:
    """Decrypt one of our packets independently; returns the plaintext with its trailer."""
    spi, seq_low = struct.unpack_from("!II", packet)
    assert seq_low == seq & SEQ_LOW_MASK
    return AESGCM(KEY).decrypt(SALT + packet[8:16], packet[16:], aad(spi, seq, esn))


def ipv4(payload: bytes = b"", *, length: int | None = None) -> bytes:
    """An IPv4 header (192.0.2.1 -> 198.51.100.7, UDP) and *payload*; *length* overrides its length field."""
    total = 20 + len(payload) if length is None else length
    addresses = bytes((192, 0, 2, 1, 198, 51, 100, 7))
    return struct.pack("!BBHHHBBH", 0x45, 0, total, 1, 0, 64, 17, 0) + addresses + payload


def ipv6(payload: bytes = b"", *, length: int | None = None) -> bytes:
    """An IPv6 header (2001:db8::1 -> 2001:db8::2) and *payload*; *length* overrides its payload length."""
    plen = len(payload) if length is None else length
    addresses = bytes.fromhex("20010db8" + "00" * 11 + "01" + "20010db8" + "00" * 11 + "02")
    return struct.pack("!IHBB", 6 << 28, plen, 59, 64) + addresses + payload


INNER4, INNER6 = ipv4(b"data"), ipv6(b"data")  # 24 and 44 bytes: 2 bytes of padding each


def pair(*, esn: bool = True, window_size: int = 64, first_seq: int = 1) -> tuple[OutboundSA, InboundSA]:
    return (
        OutboundSA(SPI, KEY, SALT, esn=esn, first_seq=first_seq),
        InboundSA(SPI, KEY, SALT, esn=esn, window_size=window_size),
    )


def opened(result: Opened | DropReason) -> Opened:
    assert isinstance(result, Opened), result
    return result


def authenticated(result: Authenticated | DropReason) -> Authenticated:
    assert isinstance(result, Authenticated), result
    return result


def flip(packet: bytes, bit: int) -> bytes:
    changed = bytearray(packet)
    changed[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(changed)


# -- D3: the window moves only after authentication -----------------------------------------


@pytest.mark.parametrize("esn", [True, False])
def test_bad_tag_and_forged_far_sequence_leave_the_window_alone(esn: bool) -> None:
    outbound, inbound = pair(esn=esn)
    counts = Counter[DropReason]()
    for _ in range(5):
        opened(inbound.open(outbound.seal(ipv4(b"x"))))
    genuine = outbound.seal(ipv4(b"sixth"))
    before = inbound.window.snapshot()

    bad_tag = flip(genuine, len(genuine) * 8 - 1)
    far_low = (inbound.window.top + 2**31) & SEQ_LOW_MASK
    far_ahead = genuine[:4] + struct.pack("!I", far_low) + genuine[8:]
    far_seq = inbound.window.infer(far_low) if esn else far_low
    assert far_seq == inbound.window.top + 2**31
    assert inbound.window.check(far_seq) is ReplayVerdict.OK  # so only authentication can refuse it
    for forged in (bad_tag, far_ahead):
        result = inbound.open(forged)
        counts[result] += 1
        assert result is DropReason.AUTH_FAILED
        assert inbound.window.snapshot() == before
    assert counts == {DropReason.AUTH_FAILED: 2}
    assert opened(inbound.open(genuine)).seq == 6
    assert inbound.window.top == 6


@pytest.mark.parametrize("esn", [True, False])
def test_commit_refuses_what_the_batch_already_recorded(esn: bool) -> None:
    """authenticate() changes nothing, so one batch may pass two copies; commit() keeps one."""
    outbound, inbound = pair(esn=esn)
    first, older = outbound.seal(INNER4), outbound.seal(INNER6)
    newer = [outbound.seal(INNER4) for _ in range(64)]
    copies = [authenticated(inbound.authenticate(packet)) for packet in (first, first, older)]
    assert inbound.window.top == 0
    assert opened(inbound.commit(copies[0])).seq == 1
    assert inbound.commit(copies[1]) is DropReason.REPLAY_DUPLICATE
    for packet in newer:  # seq 3 .. 66 move the window past seq 2
        opened(inbound.open(packet))
    assert inbound.commit(copies[2]) is DropReason.REPLAY_TOO_OLD


# -- D4: extended sequence numbers and exhaustion ---------------------------------------------


def test_esn_crosses_into_the_next_subspace() -> None:
    outbound, inbound = pair(first_seq=B - 100)
    packets = {B - 100 + index: outbound.seal(ipv4(b"n")) for index in range(102)}
    for seq, packet in packets.items():
        assert opened(inbound.open(packet)).seq == seq
    assert inbound.window.top == B + 1
    crossing = packets[B]
    assert crossing[4:8] == bytes(4)  # the wire carries 0 ...
    assert unseal(crossing, B)  # ... and the ICV covers high = 1
    with pytest.raises(InvalidTag):
        AESGCM(KEY).decrypt(SALT + crossing[8:16], crossing[16:], aad(SPI, 0, esn=True))


def test_esn_far_past_and_far_future_are_refused() -> None:
    outbound, inbound = pair(first_seq=B - 100)
    sent = [outbound.seal(ipv4(b"n")) for _ in range(102)]  # B - 100 .. B + 1
    for packet in sent:
        opened(inbound.open(packet))
    before = inbound.window.snapshot()
    counts = Counter[DropReason]()

    # A replay from inside the window, across the boundary: its number is known.
    counts[inbound.open(sent[90])] += 1  # B - 10
    # A replay from below the window: A2.2 reads its low half as the future of subspace 1, so
    # only the ICV (which covers the real high half, 0) can refuse it.
    assert inbound.window.infer((B - 100) & SEQ_LOW_MASK) == 2 * B - 100
    counts[inbound.open(sent[0])] += 1
    # A genuine packet from 2**32 numbers ahead looks like the near future: the ICV refuses it.
    future = OutboundSA(SPI, KEY, SALT, first_seq=inbound.window.top + B + 1).seal(ipv4(b"f"))
    counts[inbound.open(future)] += 1

    assert counts == {DropReason.REPLAY_DUPLICATE: 1, DropReason.AUTH_FAILED: 2}
    assert inbound.window.snapshot() == before
    assert opened(inbound.open(outbound.seal(ipv4(b"next")))).seq == B + 2


def test_32bit_far_past_is_too_old_before_any_decryption() -> None:
    outbound, inbound = pair(esn=False)
    sent = [outbound.seal(ipv4()) for _ in range(100)]
    for packet in sent:
        opened(inbound.open(packet))
    before = inbound.window.snapshot()
    assert inbound.open(sent[0]) is DropReason.REPLAY_TOO_OLD
    assert inbound.open(sent[-1]) is DropReason.REPLAY_DUPLICATE
    assert inbound.window.snapshot() == before


def test_receiver_refuses_numbers_past_the_last_one() -> None:
    outbound, inbound = pair(first_seq=SEQ_MAX_ESN - 2)
    inbound.window.accept(SEQ_MAX_ESN - 3)  # it followed the sender this far: it knows the high half
    for _ in range(3):
        opened(inbound.open(outbound.seal(ipv4())))
    assert inbound.window.top == SEQ_MAX_ESN
    with pytest.raises(RekeyRequired):
        outbound.seal(ipv4())
    early = OutboundSA(SPI, KEY, SALT, first_seq=5).seal(ipv4())  # low half 5, read as 2**64 + 5
    before = inbound.window.snapshot()
    assert inbound.open(early) is DropReason.REPLAY_BEYOND_LIMIT
    assert inbound.window.snapshot() == before


@pytest.mark.parametrize(("esn", "limit"), [(True, None), (False, None), (True, 1000), (False, 1000)])
def test_sender_refuses_past_its_hard_limit(esn: bool, limit: int | None) -> None:
    last = limit or (SEQ_MAX_ESN if esn else SEQ_MAX_32)
    outbound = OutboundSA(SPI, KEY, SALT, esn=esn, limit=limit, first_seq=last - 1)
    packets = [outbound.seal(ipv4()) for _ in range(2)]
    assert [struct.unpack_from("!IQ", packet, 4) for packet in packets] == [
        ((last - 1) & SEQ_LOW_MASK, last - 1),
        (last & SEQ_LOW_MASK, last),
    ]
    assert unseal(packets[-1], last, esn=esn)
    for _ in range(3):
        with pytest.raises(RekeyRequired):
            outbound.seal(ipv4())
        with pytest.raises(RekeyRequired):
            outbound.seal_dummy()
    assert outbound.next_seq == last + 1  # never wraps back to 0 or 1
    assert outbound.needs_rekey


def test_rekey_is_asked_for_before_the_hard_limit() -> None:
    outbound = OutboundSA(SPI, KEY, SALT, first_seq=REKEY_AFTER_PACKETS)
    assert not outbound.needs_rekey
    outbound.seal(ipv4())
    assert outbound.needs_rekey


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spi": 255},
        {"spi": 0},
        {"key": bytes(16)},
        {"salt": bytes(3)},
        {"first_seq": 0},
        {"limit": SEQ_MAX_32 + 1, "esn": False},
        {"limit": 0},
    ],
)
def test_outbound_sa_parameters_are_checked(kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {"spi": SPI, "key": KEY, "salt": SALT} | kwargs
    with pytest.raises(ValueError):
        OutboundSA(**arguments)  # type: ignore[arg-type]


# -- D5: nonce, AAD and known answers -------------------------------------------------------

# draft-mcgrew-gcm-test-01 section 4 (GCM test cases for ESP, RFC 4106), its AES-256 cases;
# Snabb's lib/ipsec self-test uses the same ones. Their trailers end in next header 1 (they
# are transport-mode examples), which a tunnel receiver must refuse after authenticating.
DRAFT_VECTORS = [
    pytest.param(
        "abbccddef00112233445566778899aababbccddef00112233445566778899aab",
        "11223344", 0x4A2CBFE3, 2, False, "0102030405060708",
        "4500003069a6400080062690c0a801029389155e0a9e008b2dc57ee000000000"
        "7002400020bf0000020405b40101040201020201",
        "ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763"
        "748a637985771d347f0545659f14e99def842d8eb335f4eecfdbf831824b4c4915956c96",
        id="spi-4a2cbfe3-seq32",
    ),
    pytest.param(
        "abbccddef00112233445566778899aababbccddef00112233445566778899aab",
        "73616c74", 0x17405E67, 0x156F3126DD0DB99B, True, "616e640169766563",
        "45080028732c00004006e9f90a0106120a01038f06b88023dd6bafbecb71260250101f646d540001",
        "f2d69ecdbd5a0d5b8d5ef38bad4da58d1f278fde98ef67549d524a3018d9a57f"
        "f4d3a31ce673119e451626c2415771e3b7eebca614c89b35",
        id="spi-17405e67-esn",
    ),
    pytest.param(
        "abbccddef00112233445566778899aababbccddef00112233445566778899aab",
        "73616c74", 0x17405E67, 0x156F3126DD0DB99B, True, "616e640169766563",
        "636973636f0172756c657301746865016e6574776501646566696e6501746865"
        "746563686e6f6c6f67696573017468617477696c6c01646566696e65746f6d6f72726f7701020201",
        "d4b7ed86a1777f2ea13d6973d324c69e7b43f826fb56831226508bebd2dceb18d0a6df10e5487df074113e14c641024e"
        "3e6773d91a62ee429b043a10e3efe6b012a49363412364f8c0cac587f249e56b11e24f30e44ccc76",
        id="spi-17405e67-esn-text",
    ),
    pytest.param(
        "6c6567616c697a656d6172696a75616e61616e64646f69746265666f72656961",
        "7475726e", 0x796B6963, 0xFFFFFFFFFFFFFFFF, True, "333021696765746d",
        "45000030da3a00008001df3bc0a80005c0a800010800c6cd020007006162636465666768696a6b6c6d6e6f707172737401020201",
        "f97ab2aa356d8edce17644ac8c78e25dd24dedbb29ebf1b64a274b39b49c3a86"
        "4cd3d78ca4ae68a32b42458fb57dbe821dcc63b9d0937ba2945f669368661a329fb4c053",
        id="spi-796b6963-esn-last",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("key", "salt", "spi", "seq", "esn", "iv", "plain", "ctag"), DRAFT_VECTORS)
def test_published_vectors(key: str, salt: str, spi: int, seq: int, esn: bool, iv: str, plain: str, ctag: str) -> None:
    key_bytes, salt_bytes, iv_bytes = bytes.fromhex(key), bytes.fromhex(salt), bytes.fromhex(iv)
    nonce, aad_bytes = salt_bytes + iv_bytes, associated_data(spi, seq, esn)
    assert AESGCM(key_bytes).encrypt(nonce, bytes.fromhex(plain), aad_bytes).hex() == ctag

    inbound = InboundSA(spi, key_bytes, salt_bytes, esn=esn, window_size=64)
    inbound.window.accept(seq - 1)  # the receiver has seen the previous number: it knows the high half
    packet = struct.pack("!II", spi, seq & SEQ_LOW_MASK) + iv_bytes + bytes.fromhex(ctag)
    before = inbound.window.snapshot()
    assert inbound.open(flip(packet, len(packet) * 8 - 1)) is DropReason.AUTH_FAILED
    assert inbound.open(packet) is DropReason.BAD_NEXT_HEADER  # authenticated, then refused: next header 1
    assert inbound.window.snapshot() == before


@pytest.mark.parametrize(("esn", "seq"), [(True, 3 * B + 7), (True, 7), (False, 7), (False, SEQ_MAX_32)])
def test_aad_is_spi_and_sequence_with_the_esn_high_half(esn: bool, seq: int) -> None:
    packet = OutboundSA(SPI, KEY, SALT, esn=esn, first_seq=seq).seal(ipv4(b"aad"))
    expected = struct.pack("!III", SPI, seq >> 32, seq & SEQ_LOW_MASK) if esn else struct.pack("!II", SPI, seq)
    assert associated_data(SPI, seq, esn) == expected
    assert packet[:8] == struct.pack("!II", SPI, seq & SEQ_LOW_MASK)
    assert packet[8:16] == seq.to_bytes(8, "big")  # IV = the 64-bit sequence number
    assert unseal(packet, seq, esn=esn)[:23] == ipv4(b"aad")
    wrong = [aad(SPI, seq & SEQ_LOW_MASK, not esn), aad(SPI, seq + B, esn=True), aad(SPI + 1, seq, esn)]
    for other in wrong:
        with pytest.raises(InvalidTag):
            AESGCM(KEY).decrypt(SALT + packet[8:16], packet[16:], other)


def test_every_aad_bit_matters() -> None:
    seq = 5 * B + 9
    packet = OutboundSA(SPI, KEY, SALT, first_seq=seq).seal(ipv4(b"bits"))
    aad_bytes = aad(SPI, seq, esn=True)
    AESGCM(KEY).decrypt(SALT + packet[8:16], packet[16:], aad_bytes)
    for bit in range(len(aad_bytes) * 8):  # SPI, ESN high (never on the wire), seq low
        with pytest.raises(InvalidTag):
            AESGCM(KEY).decrypt(SALT + packet[8:16], packet[16:], flip(aad_bytes, bit))


SEQ_FIELD_DROPS = {DropReason.AUTH_FAILED, DropReason.REPLAY_TOO_OLD, DropReason.REPLAY_DUPLICATE}


@pytest.mark.parametrize("esn", [True, False])
def test_every_packet_bit_flip_is_refused(esn: bool) -> None:
    outbound, inbound = pair(esn=esn, first_seq=1000)
    inbound.window.accept(990)
    packet = outbound.seal(ipv4(b"flip me"))
    before = inbound.window.snapshot()
    for bit in range(len(packet) * 8):
        result = inbound.open(flip(packet, bit))
        if bit < 32:
            assert result is DropReason.UNKNOWN_SPI
        elif bit < 64:
            assert result in SEQ_FIELD_DROPS, bit  # the seq field: a replay verdict or a failed ICV
        else:
            assert result is DropReason.AUTH_FAILED, bit  # IV, ciphertext, ICV
        assert inbound.window.snapshot() == before
    assert opened(inbound.open(packet)).seq == 1000


def test_no_iv_repeats_over_a_million_packets() -> None:
    """10**6 packets on one SA (about 2 s here): every IV is the sequence number, so strictly rising.

    Rising IVs under one key means no (key, IV) pair repeats; a set of 10**6 IVs would say the
    same with 100 MB more memory.
    """
    outbound = OutboundSA(SPI, KEY, SALT)
    inner, previous = ipv4(), 0
    for seq in range(1, 10**6 + 1):
        iv = int.from_bytes(outbound.seal(inner)[8:16], "big")
        if iv != seq or iv <= previous:
            pytest.fail(f"packet {seq} has IV {iv} after {previous}")
        previous = iv
    assert outbound.next_seq == 10**6 + 1


# -- D6: the ESP trailer ---------------------------------------------------------------------

GENERATED_INNERS = [ipv4(bytes(n)) for n in range(8)] + [ipv6(bytes(n)) for n in range(8)]


@pytest.mark.parametrize("inner", GENERATED_INNERS, ids=lambda inner: f"v{inner[0] >> 4}-{len(inner)}")
def test_generated_trailers_align_to_4_with_padding_1_to_n(inner: bytes) -> None:
    outbound, inbound = pair()
    packet = outbound.seal(inner)
    plaintext = unseal(packet, 1)
    pad_length, next_header = plaintext[-2], plaintext[-1]
    assert len(plaintext) % 4 == 0 and (len(packet) - 16 - 16) % 4 == 0
    assert pad_length < 4  # the least padding that aligns
    assert plaintext[: len(inner)] == inner
    assert plaintext[len(inner) : -2] == bytes(range(1, pad_length + 1))
    assert next_header == (4 if inner[0] >> 4 == 4 else 41)
    result = opened(inbound.open(packet))
    assert bytes(result.inner) == inner and result.next_header == next_header


MALFORMED_TRAILERS = [
    pytest.param(INNER4 + b"\x00\x00\x02\x04", DropReason.BAD_PADDING, id="padding-zeros"),
    pytest.param(INNER4 + b"\x02\x01\x02\x04", DropReason.BAD_PADDING, id="padding-reversed"),
    pytest.param(INNER4 + b"\x01\x03\x02\x04", DropReason.BAD_PADDING, id="padding-skips"),
    pytest.param(bytes(range(1, 7)) + b"\x07\x04", DropReason.BAD_PADDING, id="pad-length-past-start"),
    pytest.param(INNER4 + b"\x01\x02\xff\x04", DropReason.BAD_PADDING, id="pad-length-255"),
    pytest.param(ipv4(b"data", length=28) + b"\x01\x02\x02\x04", DropReason.BAD_INNER_LENGTH, id="ipv4-length-long"),
    pytest.param(ipv4(b"data", length=20) + b"\x01\x02\x02\x04", DropReason.BAD_INNER_LENGTH, id="ipv4-length-short"),
    pytest.param(ipv6(b"data", length=5) + b"\x01\x02\x02\x29", DropReason.BAD_INNER_LENGTH, id="ipv6-length"),
    pytest.param(INNER4[:10] + b"\x00\x04", DropReason.BAD_INNER_LENGTH, id="shorter-than-ipv4-header"),
    pytest.param(INNER6[:30] + b"\x00\x29", DropReason.BAD_INNER_LENGTH, id="shorter-than-ipv6-header"),
    pytest.param(b"\x01\x02\x02\x04", DropReason.BAD_INNER_LENGTH, id="empty-inner"),
    pytest.param(INNER4 + bytes(4) + b"\x01\x02\x02\x04", DropReason.BAD_INNER_LENGTH, id="tfc-padding"),
    pytest.param(INNER6 + b"\x01\x02\x02\x04", DropReason.BAD_NEXT_HEADER, id="ipv6-under-4"),
    pytest.param(INNER4 + b"\x01\x02\x02\x29", DropReason.BAD_NEXT_HEADER, id="ipv4-under-41"),
    pytest.param(INNER4 + b"\x01\x02\x02\x11", DropReason.BAD_NEXT_HEADER, id="next-header-udp"),
    pytest.param(INNER4 + b"\x01\x02\x02\x00", DropReason.BAD_NEXT_HEADER, id="next-header-0"),
]


@pytest.mark.parametrize(("plaintext", "reason"), MALFORMED_TRAILERS)
def test_malformed_trailers_are_refused_without_moving_the_window(plaintext: bytes, reason: DropReason) -> None:
    outbound, inbound = pair(first_seq=2)
    before = inbound.window.snapshot()
    assert inbound.open(forge(plaintext, 1)) is reason
    assert inbound.window.snapshot() == before
    assert opened(inbound.open(outbound.seal(INNER4))).seq == 2


@pytest.mark.parametrize(
    "plaintext",
    [
        pytest.param(INNER4 + bytes(range(1, 7)) + b"\x06\x04", id="more-padding-than-needed"),
        pytest.param(INNER4 + b"\x00\x04", id="unaligned-but-well-formed"),
    ],
)
def test_receiver_accepts_any_well_formed_padding(plaintext: bytes) -> None:
    _, inbound = pair()
    assert bytes(opened(inbound.open(forge(plaintext, 1))).inner) == INNER4


def test_only_next_headers_4_and_41_are_delivered() -> None:
    _, inbound = pair(window_size=1024)
    counts, delivered = Counter[DropReason](), []
    seq = 0
    for inner in (INNER4, INNER6):
        for next_header in range(256):
            seq += 1
            result = inbound.open(forge(inner + b"\x01\x02\x02" + bytes((next_header,)), seq))
            if isinstance(result, Opened):
                delivered.append((inner[0] >> 4, result.next_header))
            else:
                counts[result] += 1
    assert delivered == [(4, 4), (6, 41)]
    assert counts == {DropReason.DUMMY: 2, DropReason.BAD_NEXT_HEADER: 2 * 256 - 4}


def test_dummy_packets_are_dropped_counted_and_still_use_their_number() -> None:
    outbound, inbound = pair()
    counts = Counter[DropReason]()
    dummies = [outbound.seal_dummy(), outbound.seal_dummy(b"filler" * 10)]
    for packet in dummies:
        counts[inbound.open(packet)] += 1
    assert unseal(dummies[0], 1) == b"\x01\x02\x02\x3b"
    assert counts == {DropReason.DUMMY: 2}
    assert inbound.window.top == 2  # authenticated, so their numbers are spent
    assert inbound.open(dummies[0]) is DropReason.REPLAY_DUPLICATE
    assert inbound.open(forge(b"\x00\x02\x3b", 3)) is DropReason.BAD_PADDING  # dummies need a valid trailer too
    assert opened(inbound.open(outbound.seal(INNER6))).seq == 3


# -- malformed input: only our own errors, never a state change ------------------------------


def test_every_prefix_of_a_packet_is_refused() -> None:
    outbound, inbound = pair()
    table = SpiTable()
    table.add(inbound)
    packet = outbound.seal(ipv4(b"prefix"))
    before = inbound.window.snapshot()
    for length in range(len(packet)):
        expected = DropReason.TRUNCATED if length < 34 else DropReason.AUTH_FAILED
        assert inbound.open(packet[:length]) is expected
        assert table.open(packet[:length]) is expected
        if length < 34:
            with pytest.raises(EspParseError):
                parse_header(packet[:length])
    assert inbound.window.snapshot() == before
    assert opened(table.open(packet)).seq == 1


def test_outbound_refuses_what_is_not_an_ip_packet() -> None:
    outbound = OutboundSA(SPI, KEY, SALT)
    for inner, reason in ((b"", DropReason.TRUNCATED), (b"\x50" + bytes(30), DropReason.BAD_NEXT_HEADER)):
        with pytest.raises(EspParseError) as info:
            outbound.seal(inner)
        assert info.value.reason is reason
    assert outbound.next_seq == 1  # no number was spent


@pytest.fixture(scope="module")
def sealed() -> bytes:
    return OutboundSA(SPI, KEY, SALT, first_seq=10).seal(ipv4(b"sealed"))


def fresh_inbound() -> InboundSA:
    inbound = InboundSA(SPI, KEY, SALT, window_size=64)
    inbound.window.accept(9)
    return inbound


@settings(max_examples=300)
@given(data=st.binary(max_size=200), keep_spi=st.booleans())
def test_random_bytes_never_raise_nor_change_state(data: bytes, keep_spi: bool) -> None:
    inbound = fresh_inbound()
    before = inbound.window.snapshot()
    packet = struct.pack("!I", SPI) + data if keep_spi else data
    assert isinstance(inbound.open(packet), DropReason)
    assert inbound.window.snapshot() == before


@settings(max_examples=300)
@given(changes=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4))
def test_mutated_packets_are_refused(sealed: bytes, changes: list[tuple[int, int]]) -> None:
    inbound = fresh_inbound()
    before = inbound.window.snapshot()
    mutated = bytearray(sealed)
    for position, xor in changes:
        mutated[position % len(mutated)] ^= xor
    result = inbound.open(bytes(mutated))
    if bytes(mutated) == sealed:  # the changes cancelled out
        assert opened(result).seq == 10
    else:
        assert isinstance(result, DropReason)
        assert inbound.window.snapshot() == before


def test_spi_table_dispatches_by_spi() -> None:
    table = SpiTable()
    first, second = InboundSA(SPI, KEY, SALT), InboundSA(SPI + 1, KEY, SALT)
    table.add(first)
    table.add(second)
    with pytest.raises(ValueError):
        table.add(InboundSA(SPI, KEY, SALT))
    packet = OutboundSA(SPI + 1, KEY, SALT).seal(INNER4)
    assert first.open(packet) is DropReason.UNKNOWN_SPI
    assert opened(table.open(packet)).seq == 1 and second.window.top == 1 and first.window.top == 0
    assert table.remove(SPI + 1) is second and SPI + 1 not in table and len(table) == 1
    assert table.open(packet) is DropReason.UNKNOWN_SPI


def test_every_drop_reason_belongs_to_a_stage() -> None:
    named = {reason for _, reasons in INBOUND_PIPELINE for reason in reasons}
    assert named == set(DropReason)


# -- conformance with scapy's ESP -------------------------------------------------------------

OUTER = {"src": "203.0.113.1", "dst": "203.0.113.2"}
SCAPY_INNERS = [
    IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=4000, dport=5000) / Raw(b"hello coterie"),
    IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=7, seq=1, data=b"ping" * 5),
    IP(src="10.1.0.3", dst="10.1.0.4") / UDP(sport=53, dport=53) / Raw(b"x"),
    IPv6(src="fd00::3", dst="fd00::4") / UDP(sport=1, dport=2) / Raw(bytes(1300)),
]


def scapy_sa(esn: bool, high: int = 0) -> SecurityAssociation:
    return SecurityAssociation(
        ESP,
        spi=SPI,
        crypt_algo="AES-GCM",
        crypt_key=KEY + SALT,
        auth_algo="NULL",
        tunnel_header=IP(**OUTER),
        esn_en=esn,
        esn=high,
    )


def outer(esp_packet: bytes) -> Packet:
    return IP(raw(IP(proto=50, **OUTER) / Raw(esp_packet)))


@pytest.mark.parametrize(("esn", "first_seq"), [(False, 1), (True, 1), (True, B - 1), (False, SEQ_MAX_32 - 1)])
@pytest.mark.parametrize("inner", SCAPY_INNERS, ids=lambda inner: f"{inner.name}-{len(inner)}")
def test_scapy_decrypts_what_we_seal(inner: Packet, esn: bool, first_seq: int) -> None:
    outbound = OutboundSA(SPI, KEY, SALT, esn=esn, first_seq=first_seq)
    for _ in range(2):  # from B - 1, the second packet has high half 1
        seq, packet = outbound.next_seq, outbound.seal(raw(inner))
        sa = scapy_sa(esn, seq >> 32)
        assert raw(sa.decrypt(outer(packet))) == raw(inner)
        plain = sa.crypt_algo.decrypt(sa, outer(packet)[ESP], sa.crypt_key, esn_en=esn, esn=seq >> 32)
        assert plain.seq == seq & SEQ_LOW_MASK
        assert plain.padding == bytes(range(1, plain.padlen + 1))
        assert plain.nh == (4 if inner.version == 4 else 41)
        assert (len(plain.iv) + len(raw(plain.data)) + plain.padlen + 2) % 4 == 0
        if esn:
            with pytest.raises(IPSecIntegrityError):
                scapy_sa(esn, (seq >> 32) + 1).decrypt(outer(packet))


@pytest.mark.parametrize(
    ("esn", "numbers"),
    [(False, [1, 2, 5, 4, 3, 1000]), (True, [1, 3, 2]), (True, [B - 200, B - 3, B - 1, B + 2, B + 1, 2 * B + 5])],
)
def test_we_open_what_scapy_seals(esn: bool, numbers: list[int]) -> None:
    inbound = InboundSA(SPI, KEY, SALT, esn=esn, window_size=64)
    packets = []
    for index, seq in enumerate(numbers):
        inner = SCAPY_INNERS[index % len(SCAPY_INNERS)]
        sa = scapy_sa(esn, seq >> 32)
        sa.seq_num = seq & SEQ_LOW_MASK
        packets.append(raw(sa.encrypt(inner)[ESP]))
        if seq > inbound.window.top + B // 2:  # a jump A2.2 cannot follow: tell the window
            inbound.window.accept(seq - 1)
        result = opened(inbound.open(packets[-1]))
        assert (result.seq, bytes(result.inner), result.next_header) == (
            seq,
            raw(inner),
            4 if inner.version == 4 else 41,
        )
    before = inbound.window.snapshot()
    replays = [inbound.open(packet) for packet in packets]
    assert replays[-1] is DropReason.REPLAY_DUPLICATE
    assert all(isinstance(result, DropReason) for result in replays)
    assert inbound.window.snapshot() == before


# -- batch APIs: open_many and seal_many --------------------------------------------------------


def test_open_many_drops_and_counts_bad_packets_and_delivers_the_rest() -> None:
    """Wrong ICV, a replay inside the batch, bad padding and a dummy in the middle: each costs only itself."""
    outbound, inbound = pair()
    inners = [ipv4(bytes([n]) * n) for n in range(1, 9)] + [ipv6(b"six")]
    sealed = [outbound.seal(inner) for inner in inners]  # seq 1 .. 9
    dummy = outbound.seal_dummy(b"pad")  # seq 10
    bad_padding = forge(INNER4 + b"\x02\x01\x02\x04", 11)
    last = outbound.seal(INNER6)  # seq 11: the forged packet's number is still free when this arrives
    batch = [
        sealed[0],
        flip(sealed[1], len(sealed[1]) * 8 - 1),  # wrong ICV: seq 2 stays unrecorded
        sealed[2],
        sealed[0],  # replay of a packet earlier in the same batch
        bad_padding,
        sealed[3],
        dummy,
        *sealed[4:],
        sealed[8],  # replay of the packet just before
        last,
    ]
    delivered, drops = inbound.open_many(batch)
    assert [bytes(inner) for inner in delivered] == [inners[0], inners[2], *inners[3:], INNER6]
    assert Counter(drops) == {
        DropReason.AUTH_FAILED: 1,
        DropReason.REPLAY_DUPLICATE: 2,
        DropReason.BAD_PADDING: 1,
        DropReason.DUMMY: 1,
    }
    assert inbound.window.top == 11
    assert opened(inbound.open(sealed[1])).seq == 2  # the forged copy did not spend seq 2


@pytest.mark.parametrize("esn", [True, False])
def test_open_many_agrees_with_open_one_by_one(esn: bool) -> None:
    outbound, batch_sa = pair(esn=esn, first_seq=B - 20 if esn else 1)
    single_sa = InboundSA(SPI, KEY, SALT, esn=esn, window_size=64)
    packets = [outbound.seal(ipv4(bytes(n))) for n in range(40)]
    stream = packets[5:] + packets[:5] + packets[30:35] + [b"short", flip(packets[7], 200)]
    expected = [single_sa.open(packet) for packet in stream]
    delivered, drops = batch_sa.open_many(stream)
    assert [bytes(inner) for inner in delivered] == [bytes(r.inner) for r in expected if isinstance(r, Opened)]
    assert drops == [r for r in expected if isinstance(r, DropReason)]
    assert batch_sa.window.snapshot() == single_sa.window.snapshot()


def test_open_many_of_nothing_changes_nothing() -> None:
    _, inbound = pair()
    before = inbound.window.snapshot()
    assert inbound.open_many([]) == ([], [])
    assert inbound.window.snapshot() == before


def test_seal_many_equals_seal_one_by_one() -> None:
    inners = [ipv4(bytes(n)) for n in range(6)] + [ipv6(bytes(n)) for n in range(6)]
    one_by_one = OutboundSA(SPI, KEY, SALT, first_seq=B - 3)
    batch = OutboundSA(SPI, KEY, SALT, first_seq=B - 3)
    assert batch.seal_many(inners) == [one_by_one.seal(inner) for inner in inners]
    assert batch.next_seq == one_by_one.next_seq == B - 3 + len(inners)
    _, inbound = pair()
    inbound.window.accept(B - 4)
    delivered, drops = inbound.open_many(batch.seal_many(inners))
    assert drops == [] and [bytes(inner) for inner in delivered] == inners


def test_seal_many_stops_at_the_limit_and_refuses_non_ip() -> None:
    outbound = OutboundSA(SPI, KEY, SALT, limit=5, first_seq=3)
    sealed = outbound.seal_many([INNER4] * 5)
    assert [struct.unpack_from("!I", packet, 4)[0] for packet in sealed] == [3, 4, 5]  # the rest waits
    assert outbound.seal_many([INNER4]) == []
    with pytest.raises(EspParseError):
        OutboundSA(SPI, KEY, SALT).seal_many([INNER4, b"\x50" + bytes(30)])
    with pytest.raises(EspParseError):
        OutboundSA(SPI, KEY, SALT).seal_many([b""])
