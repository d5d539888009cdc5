"""The UDP demultiplexer and the inbound stages behind it, fuzzed (RELIABILITY.md D8).

``classify_udp`` is compared with an oracle written from its documented
rules (transport.py's docstring), over arbitrary bytes and crafted
datagrams: keepalive 0xFF, the RFC 3948 non-ESP marker, the masquerade
marker 00 00 00 FE followed by ESP, RFC 3948 ESP (SPI >= 256), SPI 0..255,
truncations and bit flips of genuine packets. The same datagrams go through
a real ``DataPlane.inbound_udp`` (real sockets, real AES-GCM, a real SA
installed): it never raises, never changes state for a packet it refuses
(SPI table, learned endpoints, replay windows, per-peer counts), and counts
every packet under exactly one reason. The agent reports no parse error of
its own: every refusal is a counted reason, so "only ParseError escapes"
here means nothing escapes. Time per packet is not asserted (shared,
noisy machine); hypothesis' deadline is off for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP
from scapy.packet import raw

from nodeagent.constants import ESP_MIN_PACKET_SIZE
from nodeagent.dataplane import DataPlane
from nodeagent.esp import DropReason, OutboundSA
from nodeagent.transport import (
    KEEPALIVE,
    MASQUERADE_MARKER,
    NON_ESP_MARKER,
    Kind,
    classify_udp,
    strip_ipv4_header,
)
from tests.helpers.planes import Pair, make_pair, outbound_sa, sa_material

SPI_B_FROM_A = sa_material("a", "b")[0]
EVENT_COUNTERS = {"endpoint_moved"}  # things that happened to a packet already counted, not a disposition
ESP_REFUSALS = {f"in_{r.value}" for r in DropReason} | {"in_rate_limited"}  # a source past its forged-tag budget


def oracle(datagram: bytes) -> tuple[Kind, int]:
    """transport.py's documented rules, written independently."""
    if datagram == KEEPALIVE:
        return Kind.KEEPALIVE, 1
    if len(datagram) < 4:
        return Kind.GARBAGE, 0
    if datagram[:4] == MASQUERADE_MARKER:
        return (Kind.ESP, 4) if len(datagram) >= 4 + ESP_MIN_PACKET_SIZE else (Kind.GARBAGE, 0)
    if datagram[:4] == NON_ESP_MARKER:
        return Kind.CONTROL, 4
    spi = int.from_bytes(datagram[:4], "big")
    if 1 <= spi <= 255 or len(datagram) < ESP_MIN_PACKET_SIZE:
        return Kind.GARBAGE, 0
    return Kind.ESP, 0


def inner_ping(src: str = "10.1.0.1", dst: str = "10.1.0.2") -> bytes:
    """A valid ICMP echo request from the plane's peer to it (no TUN here: the test is the TUN)."""
    return raw(IP(src=src, dst=dst) / ICMP(type=8, id=1, seq=1))


# Genuine packets from a to b: sealed once, then only ever cut or damaged in the fuzz (never accepted there).
_SEALER = outbound_sa("a", "b")
GENUINE = [_SEALER.seal(inner_ping()) for _ in range(3)]


def flip_one_bit(data: bytes, bit: int) -> bytes:
    changed = bytearray(data)
    bit %= len(changed) * 8
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


DATAGRAMS = st.one_of(
    st.binary(max_size=120),
    st.just(KEEPALIVE),
    st.binary(min_size=1, max_size=8).map(lambda tail: KEEPALIVE + tail),
    st.binary(max_size=80).map(lambda tail: NON_ESP_MARKER + tail),
    st.binary(max_size=80).map(lambda tail: MASQUERADE_MARKER + tail),
    st.binary(max_size=80).map(lambda tail: MASQUERADE_MARKER + SPI_B_FROM_A.to_bytes(4, "big") + tail),
    st.binary(max_size=80).map(lambda tail: SPI_B_FROM_A.to_bytes(4, "big") + tail),  # RFC 3948 with a known SPI
    st.tuples(st.integers(0, 255), st.binary(max_size=80)).map(lambda t: t[0].to_bytes(4, "big") + t[1]),
    st.tuples(st.integers(256, 2**32 - 1), st.binary(min_size=30, max_size=80)).map(
        lambda t: t[0].to_bytes(4, "big") + t[1]
    ),
    st.tuples(st.sampled_from(GENUINE), st.booleans(), st.integers(0, 200)).map(
        lambda t: ((MASQUERADE_MARKER if t[1] else b"") + t[0])[: t[2] % (len(t[0]) + (4 if t[1] else 0))]
    ),  # strict truncations, with and without the marker
    st.tuples(st.sampled_from(GENUINE), st.booleans(), st.integers(0, 10**6)).map(
        lambda t: flip_one_bit((MASQUERADE_MARKER if t[1] else b"") + t[0], t[2])
    ),  # one flipped bit anywhere, marker included
)


@settings(max_examples=1000, deadline=None)
@given(DATAGRAMS)
def test_classify_matches_the_documented_rules(datagram: bytes) -> None:
    kind, start = classify_udp(datagram)
    assert (kind, start) == oracle(datagram)
    assert classify_udp(memoryview(datagram)) == (kind, start)
    if kind is Kind.ESP:
        assert len(datagram) - start >= ESP_MIN_PACKET_SIZE


@pytest.mark.parametrize(
    ("datagram", "kind", "start"),
    [
        (b"\xff", Kind.KEEPALIVE, 1),
        (b"", Kind.GARBAGE, 0),
        (b"\x00\x00\x00", Kind.GARBAGE, 0),
        (NON_ESP_MARKER, Kind.CONTROL, 4),
        (NON_ESP_MARKER + b"punch", Kind.CONTROL, 4),
        (MASQUERADE_MARKER + bytes(ESP_MIN_PACKET_SIZE - 1), Kind.GARBAGE, 0),
        (MASQUERADE_MARKER + bytes(ESP_MIN_PACKET_SIZE), Kind.ESP, 4),
        ((255).to_bytes(4, "big") + bytes(60), Kind.GARBAGE, 0),
        ((256).to_bytes(4, "big") + bytes(60), Kind.ESP, 0),
        ((256).to_bytes(4, "big") + bytes(ESP_MIN_PACKET_SIZE - 5), Kind.GARBAGE, 0),
    ],
)
def test_classify_examples(datagram: bytes, kind: Kind, start: int) -> None:
    assert classify_udp(datagram) == (kind, start)


def test_the_marker_is_never_a_valid_spi_nor_an_rfc3948_marker() -> None:
    marker = int.from_bytes(MASQUERADE_MARKER, "big")
    assert 1 <= marker <= 255  # IANA reserved SPIs: no SA can have it
    assert MASQUERADE_MARKER != NON_ESP_MARKER and MASQUERADE_MARKER[:1] != KEEPALIVE
    with pytest.raises(ValueError):
        outbound_sa_with_spi(marker)


def outbound_sa_with_spi(spi: int) -> OutboundSA:
    return OutboundSA(spi, bytes(32), bytes(4))


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (bytes.fromhex("45") + bytes(19) + bytes(ESP_MIN_PACKET_SIZE), 20),
        (bytes.fromhex("46") + bytes(23) + bytes(ESP_MIN_PACKET_SIZE), 24),
        (bytes.fromhex("45") + bytes(19) + bytes(ESP_MIN_PACKET_SIZE - 1), None),
        (bytes.fromhex("65") + bytes(19) + bytes(ESP_MIN_PACKET_SIZE), None),
        (bytes.fromhex("44") + bytes(19) + bytes(ESP_MIN_PACKET_SIZE), None),  # IHL 4: not a header
        (bytes.fromhex("40") + bytes(19) + bytes(ESP_MIN_PACKET_SIZE), None),  # IHL 0
        (bytes(10), None),
    ],
    ids=["ihl5", "ihl6", "short", "v6", "ihl4", "ihl0", "tiny"],
)
def test_strip_ipv4_header(packet: bytes, expected: int | None) -> None:
    found = strip_ipv4_header(packet)
    if expected is None:
        assert found is None
    else:
        assert found is not None and bytes(found) == packet[expected:]


# -- through DataPlane.inbound_udp -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    pair = make_pair()
    yield pair
    pair.close()


def state(plane: DataPlane) -> tuple[object, ...]:
    """Everything an inbound packet could change, apart from the counters."""
    return (
        {spi: (id(sa), peer) for spi, (sa, peer) in plane.spis.items()},
        {spi: sa.window.snapshot() for spi, (sa, _) in plane.spis.items()},
        {
            name: (t.learned, t.endpoint, t.port, t.rx, t.last_received, frozenset(t.inbound_spis))
            for name, t in plane.tunnels.items()
        },
        len(plane.flows),
    )


def dispositions(plane: DataPlane) -> dict[str, int]:
    return {k: v for k, v in plane.counters.items() if k not in EVENT_COUNTERS and v}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after) if after.get(k, 0) != before.get(k, 0)
    }


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(DATAGRAMS, st.sampled_from([("127.0.0.1", 40000), ("192.0.2.9", 7871)]))
def test_inbound_udp_refuses_without_changing_state_and_counts_once(
    pair: Pair, datagram: bytes, source: tuple[str, int]
) -> None:
    plane = pair.planes["b"]
    before_state, before_counts = state(plane), dispositions(plane)
    delivered = plane.inbound_udp([(datagram, source)])
    assert delivered == []
    assert state(plane) == before_state
    rose = delta(before_counts, dispositions(plane))
    assert list(rose.values()) == [1], rose
    (reason,) = rose
    kind, _ = oracle(datagram)
    if kind is Kind.ESP:
        assert reason in ESP_REFUSALS - {"in_dummy"}, reason
    else:
        assert reason == f"in_{kind.value}"


def test_a_batch_of_mixed_datagrams_counts_each_once_and_delivers_only_the_genuine(pair: Pair) -> None:
    plane = pair.planes["b"]
    sealer = outbound_sa("a", "b")
    sealer.next_seq = 10_000  # past anything the module's other tests sealed with the same key
    genuine = sealer.seal(inner_ping())
    batch = [
        KEEPALIVE,
        NON_ESP_MARKER + b"hello",
        b"\x00\x00",
        MASQUERADE_MARKER + genuine[:-1],
        MASQUERADE_MARKER + flip_one_bit(genuine, 300),
        MASQUERADE_MARKER + genuine,
        MASQUERADE_MARKER + genuine,  # the same packet again, in the same batch
        genuine,  # and once more as RFC 3948 ESP-in-UDP
    ]
    before = dispositions(plane)
    window_before = plane.spis[SPI_B_FROM_A][0].window.snapshot()
    delivered = plane.inbound_udp([(d, ("127.0.0.1", 40001)) for d in batch])
    assert [bytes(p) for p in delivered] == [inner_ping()]
    rose = delta(before, dispositions(plane))
    assert sum(rose.values()) == len(batch)
    assert rose == {
        "in_keepalive": 1,
        "in_control": 1,
        "in_garbage": 1,
        "in_auth_failed": 2,
        "in_packets": 1,
        "in_replay_duplicate": 2,
    }
    assert plane.spis[SPI_B_FROM_A][0].window.snapshot() != window_before
    assert plane.tunnels["a"].learned == ("127.0.0.1", 40001)  # only the authenticated packet taught it


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=120), st.integers(0, 15))
def test_inbound_esp_never_raises_and_counts_once(pair: Pair, tail: bytes, ihl: int) -> None:
    plane = pair.planes["b"]
    packet = bytes([0x40 | ihl]) + bytes(19) + tail
    before_state, before_counts = state(plane), dispositions(plane)
    assert plane.inbound_esp([(packet, ("192.0.2.9", 0))]) == []
    assert state(plane) == before_state
    assert sum(delta(before_counts, dispositions(plane)).values()) == 1
