"""InboundSA.open_many's in-order stretch: the same verdicts, deliveries and window as ``open`` one by one.

open_many skips the window check for a packet that carries the next number in
order and records such a stretch with one ``ReplayWindow.accept_range``; it
checks the usual IPv4 trailer inline. Here every kind of packet that must end a
stretch or be dropped (a replay, a duplicate inside the run, a forged ICV in
the middle, a gap, a packet from before the window, malformed trailers under a
valid ICV, dummies, another SPI, truncation) is mixed into runs, and the
result is compared with ``open`` on each packet of a twin SA, including the
window after the run. The packets come from the real OutboundSA or, for
trailers it never writes, from an independent encoder (AESGCM + struct).
"""

from __future__ import annotations

import os
import struct
from collections import Counter

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.constants import SEQ_LOW_MASK
from nodeagent.esp import DropReason, InboundSA, Opened, OutboundSA
from nodeagent.replay import OK, ReplayWindow

KEY = bytes(range(0x20, 0x40))
SALT = b"\x01\x02\x03\x04"
SPI = 0x2000_0002
B = 2**32
WINDOW = 64


def ipv4(payload: bytes, *, ihl: int = 5, length: int | None = None) -> bytes:
    """An IPv4/UDP packet; *ihl* > 5 adds NOP option words, *length* overrides the length field."""
    options = b"\x01" * (4 * (ihl - 5))
    total = 4 * ihl + len(payload) if length is None else length
    header = struct.pack("!BBHHHBBH", 0x40 | ihl, 0, total, 1, 0, 64, 17, 0) + bytes((192, 0, 2, 1, 192, 0, 2, 2))
    return header + options + payload


def ipv6(payload: bytes) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), 59, 64) + bytes(15) + b"\x01" + bytes(15) + b"\x02" + payload


def forge(plaintext: bytes, seq: int, *, esn: bool) -> bytes:
    """An authenticated ESP packet with exactly *plaintext* (trailer included) under number *seq*."""
    iv = os.urandom(8)
    aad = struct.pack("!III", SPI, seq >> 32, seq & SEQ_LOW_MASK) if esn else struct.pack("!II", SPI, seq)
    return struct.pack("!II", SPI, seq & SEQ_LOW_MASK) + iv + AESGCM(KEY).encrypt(SALT + iv, plaintext, aad)


def flip_icv(packet: bytes) -> bytes:
    return packet[:-1] + bytes([packet[-1] ^ 0x40])


def twins(esn: bool, first: int) -> tuple[InboundSA, InboundSA]:
    """Two SAs in the same state, their windows just below *first*."""
    sas = InboundSA(SPI, KEY, SALT, esn=esn, window_size=WINDOW), InboundSA(SPI, KEY, SALT, esn=esn, window_size=WINDOW)
    if first > 1:
        for sa in sas:
            assert sa.window.accept(first - 1) is OK
    return sas


def one_by_one(sa: InboundSA, packets: list[bytes]) -> tuple[list[bytes], list[DropReason]]:
    results = [sa.open(packet) for packet in packets]
    return [bytes(r.inner) for r in results if isinstance(r, Opened)], [r for r in results if isinstance(r, DropReason)]


def stream(esn: bool, first: int, count: int) -> tuple[list[bytes], list[bytes]]:
    """*count* packets numbered first.. : inner packets of every trailer shape, every 9th a dummy.

    Returns the packets and what each delivers (b"" for a dummy).
    """
    outbound = OutboundSA(SPI, KEY, SALT, esn=esn, first_seq=first)
    packets, inners = [], []
    for n in range(count):
        if n % 9 == 4:
            packets.append(outbound.seal_dummy(bytes(n % 5)))
            inners.append(b"")
            continue
        kind = n % 4
        inner = (
            ipv4(bytes(n % 7) * (n % 13 + 1))
            if kind < 2
            else ipv4(b"opt" * (n % 5), ihl=6)
            if kind == 2
            else ipv6(bytes(n % 11))
        )
        packets.append(outbound.seal(inner))
        inners.append(inner)
    return packets, inners


# -- ReplayWindow.accept_range ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=300), max_size=20),
    st.integers(min_value=1, max_value=200),
    st.integers(min_value=0, max_value=150),
)
def test_accept_range_leaves_the_window_accept_one_by_one_leaves(before: list[int], gap: int, extra: int) -> None:
    ranged, single = ReplayWindow(WINDOW), ReplayWindow(WINDOW)
    for seq in before:
        ranged.accept(seq)
        single.accept(seq)
    first = ranged.top + gap
    last = first + extra
    ranged.accept_range(first, last)
    assert all(single.accept(seq) is OK for seq in range(first, last + 1))
    assert ranged.snapshot() == single.snapshot()
    assert ranged.check(last) is not OK and ranged.check(last + 1) is OK


def test_accept_range_refuses_what_is_not_above_the_window_or_past_the_limit() -> None:
    window = ReplayWindow(WINDOW, limit=100)
    window.accept(10)
    before = window.snapshot()
    for first, last in ((10, 12), (5, 12), (12, 11), (90, 101)):
        with pytest.raises(ValueError):
            window.accept_range(first, last)
    assert window.snapshot() == before


# -- open_many against open, packet by packet ---------------------------------------------------


@pytest.mark.parametrize("esn", [True, False])
def test_a_run_drops_and_counts_each_bad_packet_and_delivers_the_rest_in_order(esn: bool) -> None:
    """A replay, a duplicate inside the run, a forged ICV in the middle, a gap and a too-old packet in one run."""
    first = B - 30 if esn else 1000  # with ESN the run crosses into the next 2**32 numbers
    packets, inners = stream(esn, first, 120)
    batch_sa, single_sa = twins(esn, first)
    old = packets[:3]
    assert batch_sa.open_many(old)[1] == single_sa.open_many(old)[1] == []  # the window starts past these
    for sa in (batch_sa, single_sa):
        sa.window.accept(first + 90)  # now old[0] is more than WINDOW numbers back
    run = [
        *packets[91:100],
        packets[95],  # a duplicate inside the run
        flip_icv(packets[100]),  # forged in the middle: seq first+100 stays free
        packets[100],
        packets[102],  # a gap: 101 comes later
        packets[101],
        packets[0],  # too old
        packets[91],  # a replay of the run's first packet
        *packets[103:110],
    ]
    expected = one_by_one(single_sa, run)
    delivered, drops = batch_sa.open_many(run)
    assert [bytes(inner) for inner in delivered] == expected[0]
    assert drops == expected[1]
    # With ESN a number below the window is taken for one 2**32 later (RFC 4303 A2.2) and fails the ICV.
    too_old = {DropReason.AUTH_FAILED: 2} if esn else {DropReason.AUTH_FAILED: 1, DropReason.REPLAY_TOO_OLD: 1}
    assert Counter(drops) == {
        DropReason.REPLAY_DUPLICATE: 2,
        DropReason.DUMMY: sum(1 for n in range(91, 110) if n % 9 == 4),
        **too_old,
    }
    assert [bytes(inner) for inner in delivered] == [
        inners[n] for n in [*range(91, 101), 102, 101, *range(103, 110)] if inners[n]
    ]
    assert batch_sa.window.snapshot() == single_sa.window.snapshot()
    assert batch_sa.window.top == first + 109


@pytest.mark.parametrize("esn", [True, False])
def test_malformed_trailers_under_a_valid_icv_end_nothing_but_themselves(esn: bool) -> None:
    """Trailers the real sender never writes, each with the next number in order: the same verdicts as open."""
    first = 1
    batch_sa, single_sa = twins(esn, first)
    inner = ipv4(b"x" * 6)  # 26 bytes: minimal padding 2
    crafted = [
        inner + b"\x01\x02\x02\x04",  # well formed
        inner + b"\x01\x02\x03\x04\x05\x06\x06\x04",  # longer padding than needed: allowed (RFC 4303 2.4)
        inner + b"\x01\x03\x02\x04",  # wrong padding bytes
        ipv4(b"x" * 6, length=30) + b"\x01\x02\x02\x04",  # the inner length field disagrees
        inner + b"\x01\x02\x02\x29",  # next header IPv6 for an IPv4 packet
        bytes([0x45]) + bytes(2) + b"\x02\x04",  # a 3-byte "IPv4 packet"
        inner + b"\x01\x02\x02\x3b",  # a dummy (next header 59) of another shape
        inner + b"\x01\x02\x02\x04",
    ]
    packets = [forge(plaintext, first + n, esn=esn) for n, plaintext in enumerate(crafted)]
    expected = one_by_one(single_sa, packets)
    delivered, drops = batch_sa.open_many(packets)
    assert ([bytes(inner) for inner in delivered], drops) == expected
    assert expected[0] == [inner, inner, inner]
    assert set(drops) == {
        DropReason.BAD_PADDING,
        DropReason.BAD_INNER_LENGTH,
        DropReason.BAD_NEXT_HEADER,
        DropReason.DUMMY,
    }
    assert batch_sa.window.snapshot() == single_sa.window.snapshot()


_KINDS = ("as is", "forged", "truncated", "other spi")


@settings(max_examples=150, deadline=None)
@given(
    st.booleans(),
    st.lists(
        st.lists(st.tuples(st.integers(min_value=0, max_value=119), st.sampled_from(_KINDS)), max_size=50),
        min_size=1,
        max_size=3,
    ),
)
def test_open_many_agrees_with_open_for_any_order(esn: bool, batches: list[list[tuple[int, str]]]) -> None:
    """Any mix and order of packets, in several batches: delivered, drops and window all agree with open."""
    first = B - 50 if esn else 7
    packets, _ = STREAMS[esn]
    batch_sa, single_sa = twins(esn, first)
    for batch in batches:
        run = []
        for index, kind in batch:
            packet = packets[index]
            if kind == "forged":
                packet = flip_icv(packet)
            elif kind == "truncated":
                packet = packet[:30]
            elif kind == "other spi":
                packet = struct.pack("!I", SPI + 1) + packet[4:]
            run.append(packet)
        expected = one_by_one(single_sa, run)
        delivered, drops = batch_sa.open_many(run)
        assert ([bytes(inner) for inner in delivered], drops) == expected
        assert batch_sa.window.snapshot() == single_sa.window.snapshot()


STREAMS = {True: stream(True, B - 50, 120), False: stream(False, 7, 120)}
