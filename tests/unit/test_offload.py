"""nodeagent/offload.py against packets built and checked by scapy: split, coalesce, checksums."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

scapy_all = pytest.importorskip("scapy.all")
IP, IPv6, TCP, UDP = scapy_all.IP, scapy_all.IPv6, scapy_all.TCP, scapy_all.UDP
ICMP, Raw, IPOption_NOP = scapy_all.ICMP, scapy_all.Raw, scapy_all.IPOption_NOP

from nodeagent import offload  # noqa: E402
from nodeagent.offload import (  # noqa: E402
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    PLAIN,
    VNET,
    coalesce,
    ones_sum,
    pseudo_sum,
    split,
    unpack_read,
)

MSS = 1348
PAYLOAD = bytes(range(256)) * 40  # 10240 bytes: 7 full segments and a short one
TS = [("NOP", None), ("NOP", None), ("Timestamp", (1000, 2000))]


def tcp4(payload: bytes = PAYLOAD, seq: int = 1000, flags: str = "PA", ident: int = 7) -> IP:
    return (
        IP(src="100.64.0.1", dst="100.64.0.2", id=ident, flags="DF")
        / TCP(sport=40000, dport=5201, seq=seq, ack=555, flags=flags, options=TS)
        / Raw(payload)
    )


def tcp6(payload: bytes = PAYLOAD, seq: int = 1000, flags: str = "PA") -> IPv6:
    return (
        IPv6(src="fd00::1", dst="fd00::2")
        / TCP(sport=40000, dport=5201, seq=seq, ack=555, flags=flags, options=TS)
        / Raw(payload)
    )


def as_partial(packet: IP | IPv6) -> bytes:
    """What the TUN hands over with TUN_F_CSUM: the checksum field holds the pseudo-header sum."""
    raw = bytearray(bytes(packet))
    l4 = (raw[0] & 0x0F) * 4 if raw[0] >> 4 == 4 else 40
    raw[l4 + 16 : l4 + 18] = pseudo_sum(raw, len(raw) - l4, 6).to_bytes(2, "big")
    return bytes(raw)


def checksum_ok(raw: bytes) -> bool:
    """scapy recomputes the checksums of a reparsed copy; they must equal what is in the packet."""
    layer = IP if raw[0] >> 4 == 4 else IPv6
    parsed = layer(raw)
    rebuilt = parsed.copy()
    if layer is IP:
        del rebuilt[IP].chksum
    del rebuilt[TCP if TCP in parsed else UDP].chksum
    return bytes(layer(bytes(rebuilt))) == raw


@pytest.mark.parametrize("build, gso_type", [(tcp4, GSO_TCPV4), (tcp6, GSO_TCPV6)])
@pytest.mark.parametrize("complete", [True, False])
def test_split_gives_mss_segments_with_right_headers(build, gso_type: int, complete: bool) -> None:
    packet = build()
    raw = as_partial(packet)
    l4 = 20 if gso_type == GSO_TCPV4 else 40
    segments = split(raw, gso_type, MSS, l4, complete=complete)
    assert len(segments) == 8
    assert b"".join(bytes(TCP(s[l4:]).payload) for s in segments) == PAYLOAD
    for index, segment in enumerate(segments):
        parsed = (IP if gso_type == GSO_TCPV4 else IPv6)(segment)
        body = len(PAYLOAD) - 7 * MSS if index == 7 else MSS
        assert len(parsed[TCP].payload) == body
        assert parsed[TCP].seq == 1000 + index * MSS
        assert parsed[TCP].ack == 555
        assert ("P" in str(parsed[TCP].flags)) == (index == 7)  # PSH only on the last
        if gso_type == GSO_TCPV4:
            assert parsed[IP].len == len(segment)
            assert parsed[IP].id == 7 + index
            check = IP(segment)
            del check.chksum
            assert IP(bytes(check)).chksum == parsed[IP].chksum  # a valid IP header checksum per segment
        else:
            assert parsed[IPv6].plen == len(segment) - 40
        if complete:
            assert checksum_ok(segment)
        else:
            l4_length = len(segment) - l4
            assert int.from_bytes(segment[l4 + 16 : l4 + 18], "big") == pseudo_sum(segment, l4_length, 6)


def test_unpack_read_completes_a_single_partial_packet_when_asked() -> None:
    raw = as_partial(tcp4(b"hello"))
    read = VNET.pack(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16) + raw
    assert unpack_read(read, complete=False) == raw
    completed = unpack_read(read, complete=True)
    assert completed != raw and checksum_ok(completed)
    assert unpack_read(PLAIN + bytes(IP(dst="1.2.3.4") / ICMP()), complete=True) == bytes(IP(dst="1.2.3.4") / ICMP())


def test_a_tso_read_is_one_super_packet_that_splits_when_asked() -> None:
    raw = as_partial(tcp4())
    read = unpack_read(VNET.pack(NEEDS_CSUM, GSO_TCPV4, 52, MSS, 20, 16) + raw, complete=True)
    assert isinstance(read, offload.SuperPacket) and read == raw  # routed as one IP packet
    assert read.segments() == split(raw, GSO_TCPV4, MSS, 20, complete=True)
    plain = bytes(tcp4(b"x"))
    assert offload.expand([plain, read, plain]) == [plain, *read.segments(), plain]
    with pytest.raises(offload.OffloadError):
        unpack_read(VNET.pack(NEEDS_CSUM, GSO_TCPV6, 52, MSS, 20, 16) + raw, complete=True)


def test_split_refuses_a_super_packet_of_the_wrong_family() -> None:
    with pytest.raises(offload.OffloadError):
        split(bytes(tcp6()), GSO_TCPV4, MSS, 40, complete=False)


@pytest.mark.parametrize("data_offset", [0x00, 0x40])  # a TCP header claimed shorter than 20 bytes
def test_split_refuses_headers_that_do_not_add_up(data_offset: int) -> None:
    raw = bytearray(bytes(tcp4()))
    raw[20 + 12] = data_offset
    with pytest.raises(offload.OffloadError):
        split(raw, GSO_TCPV4, MSS, 20, complete=False)
    with pytest.raises(offload.OffloadError):
        split(bytes(tcp4(b"")), GSO_TCPV4, MSS, 20, complete=False)  # headers and no payload


def _resolve(write: list) -> tuple[tuple[int, ...], bytes]:
    joined = b"".join(bytes(part) for part in write)
    return VNET.unpack_from(joined), joined[offload.VNET_SIZE :]


def _finish(vnet: tuple[int, ...], packet: bytes) -> bytes:
    """What the kernel does with NEEDS_CSUM: complete the checksum from csum_start."""
    flags, _, _, _, start, offset = vnet
    if not flags & NEEDS_CSUM:
        return packet
    mutable = bytearray(packet)
    offload.complete_checksum(mutable, start, offset, 6 if offset == 16 else 17)
    return bytes(mutable)


@pytest.mark.parametrize("build, gso_type", [(tcp4, GSO_TCPV4), (tcp6, GSO_TCPV6)])
def test_coalesce_rebuilds_the_super_packet_from_its_segments(build, gso_type: int) -> None:
    original = build()
    l4 = 20 if gso_type == GSO_TCPV4 else 40
    segments = split(as_partial(original), gso_type, MSS, l4, complete=True)
    writes = coalesce(segments)
    assert len(writes) == 1
    vnet, packet = _resolve(writes[0])
    assert vnet == (NEEDS_CSUM, gso_type, l4 + 32, MSS, l4, 16)
    finished = _finish(vnet, packet)
    assert checksum_ok(finished)
    parsed = (IP if gso_type == GSO_TCPV4 else IPv6)(finished)
    assert bytes(parsed[TCP].payload) == PAYLOAD
    assert parsed[TCP].seq == 1000 and "P" in str(parsed[TCP].flags)


def test_coalesce_keeps_apart_what_must_not_join() -> None:
    first = bytes(tcp4(b"a" * MSS, seq=1000))
    gap = bytes(tcp4(b"b" * MSS, seq=1000 + 2 * MSS))  # a lost segment in between
    other_flow = bytes(
        IP(src="100.64.0.1", dst="100.64.0.2", id=9, flags="DF")
        / TCP(sport=40001, dport=5201, seq=1000 + 3 * MSS, ack=555, flags="A", options=TS)
        / Raw(b"c" * MSS)
    )
    fin = bytes(tcp4(b"", seq=5000, flags="FA"))
    udp = bytes(IP(src="100.64.0.1", dst="100.64.0.2") / UDP(sport=1, dport=2) / Raw(b"x" * 100))
    icmp = bytes(IP(src="100.64.0.1", dst="100.64.0.2") / ICMP())
    writes = coalesce([first, gap, other_flow, fin, udp, icmp])
    assert len(writes) == 6
    for write, original in zip(writes, [first, gap, other_flow, fin, udp, icmp], strict=True):
        vnet, packet = _resolve(write)
        assert vnet[1] == GSO_NONE
        finished = _finish(vnet, packet)
        assert finished == original  # scapy built them with complete checksums: finishing gives the same
    assert writes[-1][0] == PLAIN


def test_a_segment_joins_only_a_run_of_its_own_shape_ack_and_fragmenting() -> None:
    """The run test compares one key that fixes the header shape: anything else starts a new write."""
    seq = 1000
    first = bytes(tcp4(b"a" * MSS, seq=seq, flags="A"))
    joins = bytes(tcp4(b"b" * MSS, seq=seq + MSS, flags="A", ident=8))
    no_options = bytes(  # the same flow and next seq, but a 20-byte TCP header: another shape
        IP(src="100.64.0.1", dst="100.64.0.2", id=9, flags="DF")
        / TCP(sport=40000, dport=5201, seq=seq + 2 * MSS, ack=555, flags="A")
        / Raw(b"c" * (MSS + 12))
    )
    other_ack = bytes(
        IP(src="100.64.0.1", dst="100.64.0.2", id=10, flags="DF")
        / TCP(sport=40000, dport=5201, seq=seq + 3 * MSS + 12, ack=556, flags="A", options=TS)
        / Raw(b"d" * MSS)
    )
    fragment = bytearray(bytes(tcp4(b"e" * MSS, seq=seq + 4 * MSS + 12, flags="A", ident=11)))
    fragment[6] |= 0x20  # MF: a first fragment that looks like the next segment
    writes = coalesce([first, joins, no_options, other_ack, bytes(fragment)])
    assert len(writes) == 4
    vnet, packet = _resolve(writes[0])
    assert vnet[1] == GSO_TCPV4 and len(packet) == 52 + 2 * MSS
    assert [_finish(*_resolve(w)) for w in writes[1:3]] == [no_options, other_ack]
    assert writes[3][0] == PLAIN and bytes(writes[3][1]) == fragment  # written as it is


def test_short_segment_ends_a_run() -> None:
    short = bytes(tcp4(b"s" * 100, seq=1000))
    after = bytes(tcp4(b"t" * 100, seq=1100))
    assert len(coalesce([short, after])) == 2


def test_ones_sum_matches_rfc1071() -> None:
    data = bytes(range(1, 200))
    words = data + b"\0"
    total = sum(int.from_bytes(words[i : i + 2], "big") for i in range(0, len(words), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert ones_sum(data) == total


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(min_size=0, max_size=120), max_size=6),
    st.sampled_from([0x45, 0x46, 0x44, 0x60]),
    st.sampled_from([6, 17, 1]),
)
def test_coalesce_never_raises_on_what_a_peer_may_send(tails: list[bytes], first: int, proto: int) -> None:
    """Inner packets come from authenticated peers, who may still send nonsense: it is written, not fatal."""
    v4 = bytearray(bytes(tcp4(b"x" * 10))[:20])
    v4[0], v4[9] = first, proto
    v6 = bytes([first]) + bytes(5) + bytes([proto]) + bytes(33)
    packets = [(bytes(v4) if first >> 4 == 4 else v6) + tail for tail in tails]
    for write in coalesce(packets):
        assert sum(len(bytes(part)) for part in write) >= offload.VNET_SIZE


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("gso_size", [MSS, 1000, 7])
def test_split_wraps_ids_and_sequence_numbers_and_places_the_flags(version: int, gso_size: int) -> None:
    """IP id and TCP seq wrap; CWR only on the first segment, PSH and FIN only on the last; sums hold."""
    payload = bytes(range(256)) * 12  # 3072 bytes: several segments for every size here
    tcp = TCP(sport=1, dport=2, seq=0xFFFF_F000, ack=9, flags="FPAC", options=TS) / Raw(payload)
    if version == 4:
        packet = IP(src="10.0.0.1", dst="10.0.0.2", id=0xFFFE, flags="DF", options=[IPOption_NOP()] * 4) / tcp
        l4, gso_type = 24, GSO_TCPV4
    else:
        packet, l4, gso_type = IPv6(src="fd00::1", dst="fd00::2") / tcp, 40, GSO_TCPV6
    raw = as_partial(packet)
    segments = split(raw, gso_type, gso_size, l4, complete=False)
    count = -(-len(payload) // gso_size)
    assert len(segments) == count
    header_length = l4 + 32
    assert b"".join(segment[header_length:] for segment in segments) == payload
    for index, segment in enumerate(segments):
        assert segment[l4 : l4 + 4] == raw[l4 : l4 + 4] and segment[l4 + 8 : l4 + 12] == raw[l4 + 8 : l4 + 12]
        assert int.from_bytes(segment[l4 + 4 : l4 + 8], "big") == (0xFFFF_F000 + index * gso_size) & 0xFFFFFFFF
        flags = segment[l4 + 13]
        assert bool(flags & offload.TCP_CWR) == (index == 0)
        assert bool(flags & offload.TCP_PSH) == bool(flags & offload.TCP_FIN) == (index == count - 1)
        assert flags & offload.TCP_ACK
        assert segment[header_length - 12 : header_length] == raw[header_length - 12 : header_length]  # options
        l4_length = len(segment) - l4
        assert int.from_bytes(segment[l4 + 16 : l4 + 18], "big") == pseudo_sum(segment, l4_length, 6)
        if version == 4:
            assert int.from_bytes(segment[2:4], "big") == len(segment)
            assert int.from_bytes(segment[4:6], "big") == (0xFFFE + index) & 0xFFFF
            assert ones_sum(segment[:l4]) == 0xFFFF  # a valid IPv4 header checksum, options included
            assert segment[20:24] == raw[20:24]
        else:
            assert int.from_bytes(segment[4:6], "big") == len(segment) - 40
            assert segment[6:40] == raw[6:40]
