"""nodeagent/rnat.py against scapy's full recomputation (RELIABILITY.md D13, the property part).

For random TCP, UDP and ICMP packets (IPv4 and IPv6) the incremental rewrite
must give byte for byte what scapy builds from scratch with the new
addresses; a UDP checksum of 0 stays 0; an ICMP error's quoted packet is
mapped the other way round with its checksums; a non-first fragment keeps
its payload untouched.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.config import conf
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest, IPv6
from scapy.packet import Packet, Raw, raw

from nodeagent.rnat import Translation, plan, rewrite

conf.verb = 0

v4 = st.integers(min_value=1, max_value=(1 << 32) - 1)
v6 = st.integers(min_value=1, max_value=(1 << 128) - 1)
ports = st.integers(min_value=0, max_value=65535)
payloads = st.binary(max_size=300)


def ip4(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def ip6(value: int) -> str:
    return str(ipaddress.IPv6Address(value))


def l4(kind: str, sport: int, dport: int, payload: bytes) -> Packet:
    if kind == "tcp":
        return TCP(sport=sport, dport=dport, flags="PA", seq=sport * 7919) / Raw(payload)
    if kind == "udp":
        return UDP(sport=sport, dport=dport) / Raw(payload)
    return ICMP(type=8, id=sport, seq=dport) / Raw(payload)


def check_rewrite(built: bytes, expected: bytes, new_src: int | None, new_dst: int | None) -> None:
    packet = bytearray(built)
    assert rewrite(packet, new_src, new_dst)
    assert bytes(packet) == expected


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["tcp", "udp", "icmp"]), v4, v4, v4, v4, ports, ports, payloads, st.booleans(), st.booleans())
def test_ipv4_incremental_equals_full_recompute(
    kind: str,
    src: int,
    dst: int,
    new_src: int,
    new_dst: int,
    sport: int,
    dport: int,
    payload: bytes,
    change_src: bool,
    change_dst: bool,
) -> None:
    upper = l4(kind, sport, dport, payload)
    before = raw(IP(src=ip4(src), dst=ip4(dst), id=sport, ttl=dport % 255 + 1) / upper)
    after_src = new_src if change_src else src
    after_dst = new_dst if change_dst else dst
    expected = raw(IP(src=ip4(after_src), dst=ip4(after_dst), id=sport, ttl=dport % 255 + 1) / upper)
    check_rewrite(before, expected, new_src if change_src else None, new_dst if change_dst else None)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["tcp", "udp", "icmp"]), v6, v6, v6, v6, ports, ports, payloads)
def test_ipv6_incremental_equals_full_recompute(
    kind: str, src: int, dst: int, new_src: int, new_dst: int, sport: int, dport: int, payload: bytes
) -> None:
    upper = ICMPv6EchoRequest(id=sport, seq=dport, data=payload) if kind == "icmp" else l4(kind, sport, dport, payload)
    before = raw(IPv6(src=ip6(src), dst=ip6(dst)) / upper)
    expected = raw(IPv6(src=ip6(new_src), dst=ip6(new_dst)) / upper)
    check_rewrite(before, expected, new_src, new_dst)


@settings(max_examples=200, deadline=None)
@given(v4, v4, v4, v4, ports, ports, payloads)
def test_udp_checksum_zero_stays_zero(
    src: int, dst: int, new_src: int, new_dst: int, sport: int, dport: int, payload: bytes
) -> None:
    packet = bytearray(raw(IP(src=ip4(src), dst=ip4(dst)) / UDP(sport=sport, dport=dport, chksum=0) / Raw(payload)))
    assert rewrite(packet, new_src, new_dst)
    assert packet[26:28] == b"\0\0"
    assert IP(bytes(packet)).src == ip4(new_src)
    assert bytes(packet[28:]) == payload


def test_udp_checksum_that_comes_out_zero_is_sent_as_all_ones() -> None:
    """Find a rewrite whose full recompute gives 0xFFFF (RFC 768) and check the incremental one agrees."""
    found = 0
    for new_src in range(1, 200000):
        expected = raw(IP(src=ip4(new_src), dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(b"ab"))
        if expected[26:28] == b"\xff\xff":
            check_rewrite(
                raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(b"ab")), expected, new_src, None
            )
            found += 1
            break
    assert found == 1


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["tcp", "udp", "icmp"]),
    v4,
    v4,
    v4,
    v4,
    ports,
    ports,
    st.binary(max_size=40),
    st.sampled_from([3, 11, 12]),
)
def test_icmp_error_quoted_packet_is_mapped_the_other_way(
    kind: str, src: int, dst: int, new_src: int, new_dst: int, sport: int, dport: int, payload: bytes, icmp_type: int
) -> None:
    """An error from *src* about a packet that went dst -> src: the quote's source becomes new_dst, etc."""
    quoted_before = raw(IP(src=ip4(dst), dst=ip4(src)) / l4(kind, sport, dport, payload))
    quoted_after = raw(IP(src=ip4(new_dst), dst=ip4(new_src)) / l4(kind, sport, dport, payload))
    before = raw(IP(src=ip4(src), dst=ip4(dst)) / ICMP(type=icmp_type, code=1) / Raw(quoted_before))
    expected = raw(IP(src=ip4(new_src), dst=ip4(new_dst)) / ICMP(type=icmp_type, code=1) / Raw(quoted_after))
    check_rewrite(before, expected, new_src, new_dst)


@settings(max_examples=100, deadline=None)
@given(v6, v6, v6, v6, ports, ports, st.binary(max_size=40))
def test_icmpv6_error_quoted_packet_is_mapped_the_other_way(
    src: int, dst: int, new_src: int, new_dst: int, sport: int, dport: int, payload: bytes
) -> None:
    quoted_before = raw(IPv6(src=ip6(dst), dst=ip6(src)) / UDP(sport=sport, dport=dport) / Raw(payload))
    quoted_after = raw(IPv6(src=ip6(new_dst), dst=ip6(new_src)) / UDP(sport=sport, dport=dport) / Raw(payload))
    before = raw(IPv6(src=ip6(src), dst=ip6(dst)) / ICMPv6DestUnreach(code=4) / Raw(quoted_before))
    expected = raw(IPv6(src=ip6(new_src), dst=ip6(new_dst)) / ICMPv6DestUnreach(code=4) / Raw(quoted_after))
    check_rewrite(before, expected, new_src, new_dst)


def test_truncated_icmp_error_quote_keeps_checksums_right() -> None:
    """Routers quote the IP header and 8 bytes: the quoted TCP checksum is cut off, the rest still adds up."""
    quoted = raw(IP(src="192.168.1.10", dst="198.18.0.2") / TCP(sport=40000, dport=5201))[:28]
    expected_quote = raw(IP(src="192.168.1.10", dst="198.18.1.2") / TCP(sport=40000, dport=5201))[:28]
    before = raw(IP(src="198.18.0.2", dst="192.168.1.10") / ICMP(type=3, code=3) / Raw(quoted))
    expected = raw(IP(src="198.18.1.2", dst="192.168.1.10") / ICMP(type=3, code=3) / Raw(expected_quote))
    check_rewrite(before, expected, int(ipaddress.IPv4Address("198.18.1.2")), None)


@settings(max_examples=200, deadline=None)
@given(
    v4,
    v4,
    v4,
    v4,
    st.integers(min_value=1, max_value=8000),
    st.binary(min_size=8, max_size=300),
    st.sampled_from([6, 17, 1]),
)
def test_non_first_fragment_payload_untouched(
    src: int, dst: int, new_src: int, new_dst: int, offset: int, payload: bytes, proto: int
) -> None:
    before = raw(IP(src=ip4(src), dst=ip4(dst), proto=proto, frag=offset, flags="MF") / Raw(payload))
    expected = raw(IP(src=ip4(new_src), dst=ip4(new_dst), proto=proto, frag=offset, flags="MF") / Raw(payload))
    check_rewrite(before, expected, new_src, new_dst)
    packet = bytearray(before)
    rewrite(packet, new_src, new_dst)
    assert bytes(packet[20:]) == payload


def test_first_fragment_gets_the_datagram_checksum_update() -> None:
    whole = IP(src="192.168.1.10", dst="198.18.0.2", id=7) / UDP(sport=5, dport=6) / Raw(b"x" * 100)
    fixed = IP(src="198.18.1.2", dst="198.18.0.2", id=7) / UDP(sport=5, dport=6) / Raw(b"x" * 100)
    first = raw(IP(src="192.168.1.10", dst="198.18.0.2", id=7, proto=17, flags="MF") / Raw(raw(whole)[20:68]))
    expected = raw(IP(src="198.18.1.2", dst="198.18.0.2", id=7, proto=17, flags="MF") / Raw(raw(fixed)[20:68]))
    check_rewrite(first, expected, int(ipaddress.IPv4Address("198.18.1.2")), None)


def test_translation_rewrites_source_and_destination_only_where_needed() -> None:
    peer_private, peer_seen = ipaddress.IPv4Address("192.168.1.10"), ipaddress.IPv4Address("198.18.1.2")
    me_public, me_local = ipaddress.IPv4Address("198.18.0.2"), ipaddress.IPv4Address("192.168.0.10")
    t = Translation(4, frozenset({int(peer_private)}), int(peer_seen), int(me_local))
    packet = bytearray(raw(IP(src=str(peer_private), dst=str(me_public)) / TCP(sport=1, dport=2)))
    assert t.inbound(packet)
    assert IP(bytes(packet)).src == str(peer_seen) and IP(bytes(packet)).dst == str(me_local)
    assert not t.inbound(packet), "a corrected packet is left alone"
    foreign = bytearray(raw(IP(src="10.9.9.9", dst=str(me_local)) / UDP()))
    assert not t.inbound(foreign), "a source the peer does not own is left for cryptokey routing to refuse"
    assert not t.inbound(bytearray(raw(IPv6(src="::1", dst="::2") / UDP()))), "another family: untouched"


def test_rewrite_refuses_what_it_cannot_parse() -> None:
    assert not rewrite(bytearray(b"\x45" + bytes(10)), 1, 2)
    assert not rewrite(bytearray(b"\x60" + bytes(30)), 1, 2)
    short = bytearray(b"\x4f" + bytes(30))  # IHL 60 in a 31-byte packet
    assert not rewrite(short, 1, 2) and short == bytearray(b"\x4f" + bytes(30))


def test_plan_keeps_gateway_subnets_and_overlay_addresses_and_skips_unknown_peers() -> None:
    from bus.messages.sync import NodeView, PeerView, VpnView

    def vpn_view(name: str, vip: str, addressing: str, routes: list[str]) -> VpnView:
        return VpnView(
            name=name,
            subnet="10.0.0.0/8",
            addressing=addressing,
            topology="mesh",
            cipher="aes-256-gcm",
            mtu=1400,
            keepalive=25,
            vip=vip,
            role="gateway" if routes else "member",
            routes=routes,
        )

    view = NodeView(
        node="me",
        vpns={
            "n": vpn_view("n", "192.168.0.10", "native", ["172.16.5.0/24"]),
            "o": vpn_view("o", "100.64.0.1", "overlay", []),
        },
        peers={
            "p": PeerView(
                name="p", vips={"n": "198.18.1.2", "o": "100.64.0.2"}, roles={}, endpoints=["10.1.0.10:4500"]
            ),
            "q": PeerView(name="q", vips={"o": "100.64.0.3"}, roles={}),  # overlay only: no RNAT
            "r": PeerView(name="r", vips={}, roles={}),  # native address not known yet
        },
    )
    found = plan(view)
    assert set(found) == {"p"}
    t = found["p"]
    assert t.seen == int(ipaddress.ip_address("198.18.1.2")) and t.sources == {int(ipaddress.ip_address("10.1.0.10"))}
    to_subnet = bytearray(raw(IP(src="10.1.0.10", dst="172.16.5.9") / UDP()))
    assert t.inbound(to_subnet) and IP(bytes(to_subnet)).dst == "172.16.5.9", "routed subnet: destination kept"
    overlay = bytearray(raw(IP(src="100.64.0.2", dst="100.64.0.1") / UDP()))
    assert not t.inbound(overlay), "an overlay packet of the same peer is not RNAT's"
    public = bytearray(raw(IP(src="10.1.0.10", dst="203.0.113.50") / UDP()))
    assert t.inbound(public) and IP(bytes(public)).dst == "192.168.0.10"
