"""nodeagent/packets.py against scapy, an independent implementation of IP, TCP, UDP and ICMP.

Covers what the pipeline reads (``summarize``), the Internet checksum
(RFC 1071), the ICMP unreachable answers (RFC 792, RFC 1122 3.2.2), the MSS
clamp (D14) and the incremental checksum update (RFC 1624; the property part
of RELIABILITY.md D13): a checksum fixed incrementally equals scapy's full
recomputation.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.config import conf
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror, in4_chksum
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, in6_chksum
from scapy.packet import Packet, Raw, raw
from scapy.utils import checksum as scapy_checksum

from nodeagent.packets import (
    ICMP_CODE_ADMIN_PROHIBITED,
    ICMP_CODE_FRAG_NEEDED,
    ICMP_CODE_HOST_UNREACHABLE,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    PacketError,
    _adjust_checksum,
    checksum,
    clamp_mss,
    icmp_error,
    summarize,
)

conf.verb = 0

A4, B4 = "10.77.0.1", "10.77.0.2"
A6, B6 = "fd00:77::1", "fd00:77::2"
SOURCE = int(ipaddress.ip_address("10.77.0.254"))


def as_int(address: str) -> int:
    return int(ipaddress.ip_address(address))


def tcp_valid(packet: bytes) -> bool:
    """Whether the stored TCP checksum is what scapy computes over the raw segment and pseudo-header.

    scapy's ``in4_chksum``/``in6_chksum`` over the bytes as they are: re-serialising the parsed packet
    would rewrite malformed options, and those are the cases where a clamp could go wrong.
    """
    if packet[0] >> 4 == 4:
        ip, at = IP(packet), (packet[0] & 0x0F) * 4
        end = int.from_bytes(packet[2:4], "big")
    else:
        ip, at = IPv6(packet), 40
        end = 40 + int.from_bytes(packet[4:6], "big")
    segment = bytearray(packet[at:end])
    stored = int.from_bytes(segment[16:18], "big")
    segment[16:18] = b"\0\0"
    computed = (
        in4_chksum(PROTO_TCP, ip, bytes(segment)) if packet[0] >> 4 == 4 else in6_chksum(PROTO_TCP, ip, bytes(segment))
    )
    return computed == stored


# -- summarize ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "proto", "sport", "dport"),
    [
        (IP(src=A4, dst=B4) / TCP(sport=40000, dport=443), PROTO_TCP, 40000, 443),
        (IP(src=A4, dst=B4) / UDP(sport=5353, dport=53) / b"q", PROTO_UDP, 5353, 53),
        (IP(src=A4, dst=B4) / ICMP(type=8, id=0x1234, seq=7), PROTO_ICMP, 0x1234, 8),
        (IPv6(src=A6, dst=B6) / TCP(sport=1, dport=65535), PROTO_TCP, 1, 65535),
        (IPv6(src=A6, dst=B6) / UDP(sport=7871, dport=7872), PROTO_UDP, 7871, 7872),
        (IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=0xBEEF), PROTO_ICMPV6, 0xBEEF, 128),
    ],
    ids=["tcp4", "udp4", "icmp4", "tcp6", "udp6", "icmp6"],
)
def test_summarize_reads_what_scapy_wrote(packet: Packet, proto: int, sport: int, dport: int) -> None:
    summary = summarize(raw(packet))
    v6 = IPv6 in packet
    assert summary.version == (6 if v6 else 4)
    assert summary.src == as_int(A6 if v6 else A4)
    assert summary.dst == as_int(B6 if v6 else B4)
    assert (summary.proto, summary.sport, summary.dport) == (proto, sport, dport)
    assert summary.header_length == (40 if v6 else 20)
    assert summary.first_fragment


def test_summarize_options_and_fragments() -> None:
    with_options = raw(IP(src=A4, dst=B4, options=b"\x01\x01\x01\x00") / UDP(sport=9, dport=10))
    summary = summarize(with_options)
    assert (summary.header_length, summary.sport, summary.dport) == (24, 9, 10)
    later = raw(IP(src=A4, dst=B4, frag=185, proto=PROTO_UDP) / Raw(b"\x00\x09\x00\x0a" * 4))
    summary = summarize(later)
    assert not summary.first_fragment
    assert (summary.sport, summary.dport) == (0, 0)  # bytes of a later fragment are not ports
    first = raw(IP(src=A4, dst=B4, flags="MF") / UDP(sport=9, dport=10) / (b"x" * 100))
    assert summarize(first).first_fragment


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"\x45" * 19,
        raw(IP(src=A4, dst=B4) / b"abc")[:-1],  # total length beyond the bytes
        b"\x44" + raw(IP(src=A4, dst=B4))[1:],  # IHL 4: shorter than a header
        raw(IPv6(src=A6, dst=B6) / b"abcd")[:-2],
        b"\x75" + bytes(39),
    ],
    ids=["empty", "short4", "total-beyond", "ihl4", "short6-payload", "version7"],
)
def test_summarize_refuses_what_is_not_ip(bad: bytes) -> None:
    with pytest.raises(PacketError):
        summarize(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_summarize_raises_only_packet_error(data: bytes) -> None:
    with contextlib.suppress(PacketError):
        summarize(data)


# -- checksum ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_checksum_equals_scapy(data: bytes) -> None:
    assert checksum(data) == scapy_checksum(data)


def test_checksum_of_a_header_with_its_checksum_is_zero() -> None:
    header = raw(IP(src=A4, dst=B4) / UDP())[:20]
    assert checksum(header) == 0
    assert checksum(memoryview(header)) == 0


# -- ICMP unreachable --------------------------------------------------------------------------


@pytest.mark.parametrize("code", [ICMP_CODE_HOST_UNREACHABLE, ICMP_CODE_ADMIN_PROHIBITED, ICMP_CODE_FRAG_NEEDED])
def test_icmp_error_is_a_valid_unreachable_quoting_the_header(code: int) -> None:
    original = raw(IP(src=A4, dst=B4, id=4321, ttl=17) / UDP(sport=5000, dport=6000) / (b"p" * 100))
    answer = icmp_error(original, SOURCE, code, mtu=1372)
    assert answer is not None
    parsed = IP(answer)
    assert parsed.src == "10.77.0.254" and parsed.dst == A4
    assert parsed[ICMP].type == 3 and parsed[ICMP].code == code
    if code == ICMP_CODE_FRAG_NEEDED:
        assert parsed[ICMP].nexthopmtu == 1372
    assert bytes(answer[28:]) == original[:28]  # IP header + 8 bytes (RFC 792)
    quoted = parsed[IPerror]
    assert (quoted.src, quoted.dst, quoted.id) == (A4, B4, 4321)
    assert (parsed[UDPerror].sport, parsed[UDPerror].dport) == (5000, 6000)
    assert checksum(answer[:20]) == 0  # IP header checksum valid
    assert checksum(answer[20:]) == 0  # ICMP checksum valid
    assert parsed.len == len(answer)


def test_icmp_error_quotes_ip_options_too() -> None:
    original = raw(IP(src=A4, dst=B4, options=b"\x01\x01\x01\x00") / TCP(sport=1234, dport=80))
    answer = icmp_error(original, SOURCE, ICMP_CODE_HOST_UNREACHABLE)
    assert answer is not None
    assert answer[28:] == original[:32]
    assert IP(answer)[TCPerror].dport == 80


def test_icmp_error_answers_an_echo_request() -> None:
    answer = icmp_error(raw(IP(src=A4, dst=B4) / ICMP(type=8)), SOURCE, ICMP_CODE_HOST_UNREACHABLE)
    assert answer is not None and IP(answer)[ICMP].type == 3


@pytest.mark.parametrize(
    "original",
    [
        raw(IP(src=A4, dst=B4) / ICMP(type=3, code=1) / raw(IP(src=B4, dst=A4) / UDP())),
        raw(IP(src=A4, dst=B4) / ICMP(type=11)),
        raw(IP(src=A4, dst=B4, proto=PROTO_ICMP) / b"\x03\x01\x00\x00"),  # an ICMP error cut to 4 bytes
        raw(IP(src=A4, dst=B4, proto=PROTO_ICMP)),  # ICMP with no header at all
        raw(IP(src=A4, dst=B4, frag=10, proto=PROTO_UDP) / Raw(b"x" * 16)),
        raw(IP(src="0.0.0.0", dst=B4) / UDP()),
        raw(IPv6(src=A6, dst=B6) / UDP()),
        b"\x45\x00",
    ],
    ids=[
        "icmp-unreachable",
        "icmp-time-exceeded",
        "icmp-cut",
        "icmp-empty",
        "non-first-fragment",
        "source-0",
        "ipv6",
        "garbage",
    ],
)
def test_icmp_error_stays_silent_where_rfc1122_forbids(original: bytes) -> None:
    assert icmp_error(original, SOURCE, ICMP_CODE_HOST_UNREACHABLE) is None


# -- MSS clamp ---------------------------------------------------------------------------------


def syn(options: list[tuple[str, object]] | bytes, *, flags: str = "S", v6: bool = False) -> bytearray:
    """A TCP SYN from scapy; raw option bytes go in as they are (scapy would reinterpret them)."""
    ip = IPv6(src=A6, dst=B6) if v6 else IP(src=A4, dst=B4)
    if isinstance(options, bytes):
        return bytearray(raw(ip / TCP(sport=40000, dport=22, flags=flags, dataofs=5 + len(options) // 4) / options))
    return bytearray(raw(ip / TCP(sport=40000, dport=22, flags=flags, options=options)))


def mss_of(packet: bytes) -> int | None:
    parsed = IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)
    return next((value for kind, value in parsed[TCP].options if kind == "MSS"), None)  # the first, as a stack reads


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize(
    "options",
    [
        [("MSS", 1460)],
        [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None), ("WScale", 7)],
        [("NOP", None), ("MSS", 1460)],  # MSS at an odd offset: the checksum words straddle it
        [("NOP", None), ("NOP", None), ("MSS", 1460), ("NOP", None), ("WScale", 7)],
        [("WScale", 7), ("MSS", 9000)],  # after a 3-byte option: odd offset again
    ],
    ids=["mss-only", "linux-like", "nop-mss", "nop-nop-mss", "wscale-mss"],
)
def test_clamp_lowers_mss_on_syn_and_keeps_the_checksum_valid(options: list, v6: bool) -> None:
    packet = syn(options, v6=v6)
    before = bytes(packet)
    assert tcp_valid(before)
    assert clamp_mss(packet, summarize(packet), 1320)
    assert mss_of(packet) == 1320
    assert tcp_valid(bytes(packet))
    changed = [i for i in range(len(packet)) if packet[i] != before[i]]
    assert len(changed) <= 4  # the two MSS bytes and the two checksum bytes, nothing else


def test_clamp_also_lowers_a_syn_ack() -> None:
    packet = syn([("MSS", 1460)], flags="SA")
    assert clamp_mss(packet, summarize(packet), 1200) and mss_of(packet) == 1200 and tcp_valid(bytes(packet))


@pytest.mark.parametrize(
    ("options", "flags"),
    [([("MSS", 1200)], "S"), ([("MSS", 1320)], "S"), ([("MSS", 1460)], "A"), ([("NOP", None)], "S"), ([], "S")],
    ids=["smaller", "equal", "not-syn", "no-mss", "no-options"],
)
def test_clamp_leaves_the_rest_alone(options: list, flags: str) -> None:
    packet = syn(options, flags=flags)
    before = bytes(packet)
    assert not clamp_mss(packet, summarize(packet), 1320)
    assert bytes(packet) == before


def test_clamp_ignores_udp_and_an_mss_after_end_of_options() -> None:
    udp = bytearray(raw(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / (b"\x02" * 24)))
    assert not clamp_mss(udp, summarize(udp), 100)
    packet = syn(b"\x00\x00\x00\x00\x02\x04\x05\xb4")  # EOL, then bytes that look like an MSS
    before = bytes(packet)
    assert not clamp_mss(packet, summarize(packet), 1000)
    assert bytes(packet) == before


@pytest.mark.parametrize(
    "options",
    [
        b"\x08\x00\x02\x04\x05\xb4\x01\x01",  # length 0: would loop forever if trusted
        b"\x08\x01\x02\x04\x05\xb4\x01\x01",  # length 1
        b"\x01\x01\x01\x08",  # a kind in the last byte, no room for its length
        b"\x03\x30\x02\x04",  # length past the end of the header
        b"\x02\x03\x05\xb4",  # MSS with a wrong length
        b"\x01\x01\x02\x04",  # MSS whose value lies past the data offset
    ],
    ids=["len0", "len1", "no-length-byte", "len-past-end", "mss-len3", "mss-cut"],
)
def test_clamp_survives_malformed_options(options: bytes) -> None:
    packet = syn(options)
    before = bytes(packet)
    assert not clamp_mss(packet, summarize(packet), 1000)
    assert bytes(packet) == before


def test_clamp_survives_a_data_offset_beyond_the_packet() -> None:
    packet = syn([("MSS", 1460)])
    packet[20 + 12] = 0xF0  # data offset 60 bytes; the packet holds 24
    packet[2:4] = len(packet).to_bytes(2, "big")
    clamp_mss(packet, summarize(packet), 1000)  # must not raise; a clamp here is allowed
    assert len(packet) == 44


OPTION_CHUNKS = st.one_of(
    st.just(b"\x01"),  # NOP
    st.binary(min_size=2, max_size=2).map(lambda v: b"\x02\x04" + v),  # MSS
    st.binary(min_size=1, max_size=1).map(lambda v: b"\x03\x03" + v),  # window scale: 3 bytes, shifts parity
    st.just(b"\x04\x02"),  # SACK permitted
    st.binary(min_size=8, max_size=8).map(lambda v: b"\x08\x0a" + v),  # timestamps
    st.binary(min_size=1, max_size=4),  # anything, including bad lengths and EOL
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(st.binary(max_size=40), st.lists(OPTION_CHUNKS, max_size=8).map(b"".join)),
    st.integers(536, 9000),
    st.booleans(),
)
def test_clamp_property_random_options(options: bytes, largest: int, v6: bool) -> None:
    """Arbitrary option bytes: never raises; a change is exactly a lower MSS with a valid checksum."""
    options = options[:40]
    options += b"\x00" * (-len(options) % 4)
    packet = syn(options, v6=v6)
    before = bytes(packet)
    summary = summarize(packet)
    if clamp_mss(packet, summary, largest):
        assert tcp_valid(bytes(packet))
        assert mss_of(packet) == largest
        assert sum(a != b for a, b in zip(packet, before, strict=True)) <= 4
    else:
        assert bytes(packet) == before


# -- incremental checksum update (RFC 1624; RELIABILITY.md D13 property part) --------------------


def l4_packet(kind: str, payload: bytes) -> tuple[Packet, type[Packet]]:
    ip: Packet = IPv6(src=A6, dst=B6) if kind.endswith("6") else IP(src=A4, dst=B4)
    layer = {"tcp": TCP, "udp": UDP, "icmp": ICMP}[kind.rstrip("46")]
    if kind == "icmp6":
        return ip / ICMPv6EchoRequest(id=3, seq=4, data=payload), ICMPv6EchoRequest
    return ip / layer() / Raw(payload), layer


CHECKSUM_AT = {TCP: 16, UDP: 6, ICMP: 2, ICMPv6EchoRequest: 2}


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["tcp4", "udp4", "icmp4", "tcp6", "udp6", "icmp6"]),
    st.binary(min_size=2, max_size=200),
    st.data(),
)
def test_incremental_checksum_equals_full_recompute(kind: str, payload: bytes, data: st.DataObject) -> None:
    packet, layer = l4_packet(kind, payload)
    wire = bytearray(raw(packet))
    start = len(wire) - len(payload) - (20 if layer is TCP else 8)  # where the L4 header begins
    # Any whole 16-bit word of the L4 payload (even offset from the L4 header), as RNAT would change it.
    offset = len(wire) - len(payload) + 2 * data.draw(st.integers(0, len(payload) // 2 - 1))
    new = data.draw(st.integers(0, 0xFFFF))
    old = int.from_bytes(wire[offset : offset + 2], "big")
    wire[offset : offset + 2] = new.to_bytes(2, "big")
    _adjust_checksum(wire, start + CHECKSUM_AT[layer], old, new)
    ip_class = IPv6 if kind.endswith("6") else IP
    field = "cksum" if layer is ICMPv6EchoRequest else "chksum"
    reparsed = ip_class(bytes(wire))
    incremental = getattr(reparsed[layer], field)
    delattr(reparsed[layer], field)
    full = getattr(ip_class(raw(reparsed))[layer], field)
    assert incremental == full


def test_checksum_helpers_agree_on_a_random_header() -> None:
    rng = random.Random(5)
    for _ in range(50):
        header = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 40, rng.getrandbits(16), 0, 64, 6, 0))
        header += rng.randbytes(8)
        header[10:12] = checksum(header).to_bytes(2, "big")
        assert checksum(header) == 0
        old = int.from_bytes(header[4:6], "big")
        new = rng.getrandbits(16)
        header[4:6] = new.to_bytes(2, "big")
        _adjust_checksum(header, 10, old, new)
        assert checksum(header) == 0
