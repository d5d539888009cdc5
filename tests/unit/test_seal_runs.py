"""The outbound send path sealed in runs: OutboundSA.seal_into, split_parts, and the data plane's per-flow shortcut.

seal_into must give exactly the bytes seal gives (after the prefix word), numbered consecutively;
split_parts exactly the segments split gives; and a super-packet sealed as headers + payloads must
arrive as the same segments. A spent SA in the middle of a super-packet holds the rest, in order.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import raw

from nodeagent.esp import EspParseError, InboundSA, OutboundSA
from nodeagent.offload import GSO_TCPV4, GSO_TCPV6, SuperPacket, split, split_parts
from nodeagent.transport import MASQUERADE_MARKER
from tests.helpers.planes import VIPS, Pair, inbound_sa, make_pair, sa_material

A, B = VIPS["a"], VIPS["b"]
MARKER_WORD = int.from_bytes(MASQUERADE_MARKER, "big")


@pytest.fixture
def pair() -> Iterator[Pair]:
    pair = make_pair()
    yield pair
    pair.close()


def two_sas(esn: bool = True, first_seq: int = 1, limit: int | None = None) -> tuple[OutboundSA, OutboundSA]:
    material = (0x4242, bytes(range(32)), b"salt")
    return (
        OutboundSA(*material, esn=esn, first_seq=first_seq, limit=limit),
        OutboundSA(*material, esn=esn, first_seq=first_seq, limit=limit),
    )


def tcp_super(payload: int, flags: str = "A", v6: bool = False, ip_id: int = 1) -> bytes:
    ip = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src=A, dst=B, id=ip_id, flags="DF")
    body = bytes(i % 251 for i in range(payload))
    return raw(ip / TCP(sport=40000, dport=5201, seq=0xFFFFF000, flags=flags) / body)


@settings(max_examples=60, deadline=None)
@given(
    st.booleans(), st.sampled_from([1, 2**32 - 3, 2**32 + 5]), st.lists(st.integers(20, 1400), min_size=1, max_size=8)
)
def test_seal_into_gives_the_bytes_of_seal_with_consecutive_numbers(esn: bool, first: int, sizes: list[int]) -> None:
    if not esn and first > 2**32 - 8:
        first = 1
    one, many = two_sas(esn, first)
    inners = [
        raw(IP(src=A, dst=B, id=n) / UDP(sport=1, dport=2) / (b"p" * max(0, size - 28))) for n, size in enumerate(sizes)
    ]
    out: list[bytes] = []
    heads = [inner[:15] for inner in inners]  # any cut: head + tail is the packet
    assert many.seal_into(heads, [inner[15:] for inner in inners], out, MARKER_WORD) == len(inners)
    assert len(out) == 2 * len(inners)
    for index, inner in enumerate(inners):
        head, body = out[2 * index], out[2 * index + 1]
        assert head[:4] == MASQUERADE_MARKER and len(head) == 20
        assert head[4:] + body == one.seal(inner)
        assert struct.unpack_from("!Q", head, 12)[0] == first + index
    assert many.next_seq == one.next_seq == first + len(inners)


def test_seal_into_stops_at_the_limit_and_the_next_call_seals_nothing() -> None:
    _, sa = two_sas(limit=3)
    inners = [raw(IP(src=A, dst=B, id=n) / UDP()) for n in range(5)]
    out: list[bytes] = []
    assert sa.seal_into(inners, [b""] * 5, out, 0) == 3
    assert len(out) == 6 and sa.next_seq == 4
    assert sa.seal_into(inners[3:], [b""] * 2, out, 0) == 0 and len(out) == 6


def test_seal_into_refuses_a_packet_that_is_not_ip_after_sealing_those_before() -> None:
    _, sa = two_sas()
    good = raw(IP(src=A, dst=B) / UDP())
    out: list[bytes] = []
    with pytest.raises(EspParseError) as caught:
        sa.seal_into([good, good, b"\x10junk", good], [b""] * 4, out, 0)
    assert caught.value.sealed == 2 and len(out) == 4 and sa.next_seq == 3  # type: ignore[attr-defined]
    opener = InboundSA(0x4242, bytes(range(32)), b"salt")
    assert [bytes(opener.open(out[i][4:] + out[i + 1]).inner) for i in (0, 2)] == [good, good]  # type: ignore[union-attr]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("payload", [1348 * 45, 1348 * 45 - 11, 1348 * 2, 1348, 7])
@pytest.mark.parametrize("flags", ["A", "PA", "FPA", "CA", "CPA"])
def test_split_parts_joined_are_the_segments_of_split(v6: bool, payload: int, flags: str) -> None:
    packet = tcp_super(payload, flags, v6, ip_id=0xFFF0)
    gso_type, l4 = (GSO_TCPV6, 40) if v6 else (GSO_TCPV4, 20)
    heads, tails = split_parts(packet, gso_type, 1348, l4)
    segments = split(packet, gso_type, 1348, l4, complete=False)
    assert [h + bytes(t) for h, t in zip(heads, tails, strict=True)] == segments
    assert len(segments) == -(-payload // 1348)
    assert all(len(t) == 1348 for t in tails[:-1])


def test_a_super_packet_arrives_as_its_segments_in_order(pair: Pair) -> None:
    a = pair.planes["a"]
    a.tunnels["b"].takes_partial = True
    packet = SuperPacket(tcp_super(1348 * 45 - 100, "PA"))
    packet.gso = (GSO_TCPV4, 1348, 20, False)
    expected = split(packet, GSO_TCPV4, 1348, 20, complete=False)
    a.outbound_batch([packet])
    delivered = pair.carry("a", 45)
    assert [bytes(p) for p in delivered] == expected
    assert a.counters["out_packets"] == 45 and a.wire.udp_sends == 1


def test_a_spent_sa_in_the_middle_of_a_super_packet_holds_the_rest_in_order(pair: Pair) -> None:
    a, b = pair.planes["a"], pair.planes["b"]
    a.tunnels["b"].takes_partial = True
    a.install("b", OutboundSA(*sa_material("a", "b"), limit=10), [inbound_sa("b", "a")])
    packet = SuperPacket(tcp_super(1348 * 30))
    packet.gso = (GSO_TCPV4, 1348, 20, False)
    expected = split(packet, GSO_TCPV4, 1348, 20, complete=False)
    a.outbound_batch([packet])
    assert a.counters["out_packets"] == 10 and a.counters["out_rekey_wait"] == 20
    assert len(a.tunnels["b"].queue) == 20
    first = [bytes(p) for p in pair.carry("a", 10)]
    fresh = (sa_material("a", "b")[0] + 7, bytes(range(32, 64)), b"new!")
    a.install("b", OutboundSA(*fresh), [inbound_sa("b", "a")])
    b.install("a", b.tunnels["a"].outbound, [InboundSA(*sa_material("a", "b")), InboundSA(*fresh)])
    assert a.flush_queues(time.monotonic()) == []
    rest = [bytes(p) for p in pair.carry("a", 20)]
    assert first + rest == expected


def test_packets_of_one_flow_share_a_decision_but_each_syn_is_clamped(pair: Pair) -> None:
    a = pair.planes["a"]
    data = [raw(IP(src=A, dst=B, id=n) / TCP(sport=40000, dport=22, flags="A") / b"d") for n in range(3)]
    syn = raw(IP(src=A, dst=B, id=9) / TCP(sport=40000, dport=22, flags="S", options=[("MSS", 1460)]))
    syn = syn[:2] + struct.pack("!H", len(syn)) + syn[4:]
    a.outbound_batch([data[0], data[1], syn, data[2]])
    delivered = [IP(bytes(p)) for p in pair.carry("a", 4)]
    assert [p.id for p in delivered] == [0, 1, 9, 2]
    assert dict(delivered[2][TCP].options)["MSS"] == a.mtu - 40 and a.counters["out_mss_clamped"] == 1


def test_a_packet_like_the_flow_but_to_another_address_is_decided_again(pair: Pair) -> None:
    a = pair.planes["a"]
    to_b = raw(IP(src=A, dst=B) / UDP(sport=5001, dport=5201) / b"same length")
    elsewhere = raw(IP(src=A, dst="10.99.0.9") / UDP(sport=5001, dport=5201) / b"same length")
    answers = a.outbound_batch([to_b, elsewhere, to_b])
    assert a.counters["out_packets"] == 2 and a.counters["out_no_route"] == 1 and len(answers) == 1
    assert [bytes(p) for p in pair.carry("a", 2)] == [to_b, to_b]


def test_a_run_with_a_packet_that_is_not_ip_drops_only_that_one(pair: Pair) -> None:
    a = pair.planes["a"]
    tunnel = a.tunnels["b"]
    good = [raw(IP(src=A, dst=B, id=n) / UDP(sport=1, dport=2) / b"ok") for n in range(3)]
    unsent = a._send_batch([(tunnel, good[0]), (tunnel, b"\x10not ip"), (tunnel, good[1]), (tunnel, good[2])], 0.0)
    assert unsent == [] and a.counters["out_malformed"] == 1 and a.counters["out_packets"] == 3
    assert [bytes(p) for p in pair.carry("a", 3)] == good
