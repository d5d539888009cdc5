"""Just enough IP, TCP, UDP and ICMP to make the data plane's decisions.

The pipeline needs five things from an inner packet: its version, its
addresses (to pick a peer and check the sender), its protocol and ports (for
ACLs and flows), a way to answer with ICMP when a peer cannot be reached, and
the TCP MSS option (to clamp it). Addresses are handled as integers: a dict
lookup on an int is the cheapest longest-prefix match Python offers.

References: RFC 791 (IPv4), RFC 8200 (IPv6), RFC 792 (ICMP), RFC 1071 and
RFC 1624 (Internet checksum, incremental update), RFC 879 / RFC 6691 (MSS).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

ICMP_ECHO_REPLY = 0
ICMP_UNREACHABLE = 3
ICMP_ECHO_REQUEST = 8
ICMP_CODE_HOST_UNREACHABLE = 1
ICMP_CODE_FRAG_NEEDED = 4
ICMP_CODE_ADMIN_PROHIBITED = 13

TCP_FLAG_SYN = 0x02
TCP_OPTION_END = 0
TCP_OPTION_NOP = 1
TCP_OPTION_MSS = 2

IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")


class PacketError(ValueError):
    """Bytes that are not an IP packet this plane can route (too short, bad version, bad lengths)."""


class Summary(NamedTuple):
    """What the pipeline decides on: addresses as ints, protocol, and ports (or ICMP type and id).

    A NamedTuple rather than a frozen dataclass: it is built for every packet, and building a frozen
    dataclass costs CPython 3.11 several times as much (each field goes through object.__setattr__).
    """

    version: int
    src: int
    dst: int
    proto: int
    sport: int  # TCP/UDP source port; ICMP echo: the identifier; else 0
    dport: int  # TCP/UDP destination port; ICMP: the type; else 0
    header_length: int
    first_fragment: bool


def summarize(packet: bytes | bytearray | memoryview) -> Summary:
    """Read the fields the pipeline needs; PacketError when the packet is not a sane IP packet."""
    if len(packet) < 1:
        raise PacketError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        return _summarize_v4(packet)
    if version == 6:
        return _summarize_v6(packet)
    raise PacketError(f"IP version {version}")


# One unpack per header: each int.from_bytes over a slice costs a slice object and a call, per packet.
_V4_FIELDS = struct.Struct("!BxHxxHxB2xII")  # version/IHL, total length, flags/fragment, protocol, src, dst
_V6_FIELDS = struct.Struct("!4xHBx16s16s")  # payload length, next header, src, dst
_PORTS = struct.Struct("!HH")
_ICMP_TYPE_ID = struct.Struct("!B3xH")
_PORTED = (PROTO_TCP, PROTO_UDP)  # a tuple constant: `in` over it is one comparison per member, no set hash
_new_summary = tuple.__new__  # builds the NamedTuple without its Python-level __new__ (half the cost)


def _summarize_v4(packet: bytes | bytearray | memoryview) -> Summary:
    if len(packet) < 20:
        raise PacketError("IPv4 header truncated")
    first_byte, total, fragment, proto, src, dst = _V4_FIELDS.unpack_from(packet)
    ihl = (first_byte & 0x0F) * 4
    if ihl < 20 or total < ihl or total > len(packet):
        raise PacketError("IPv4 lengths inconsistent")
    first = (fragment & 0x1FFF) == 0
    if first and proto in _PORTED and total >= ihl + 4:
        sport, dport = _PORTS.unpack_from(packet, ihl)  # bulk traffic: the common case, without a call
    else:
        sport, dport = _ports(packet, ihl, proto, first, total, PROTO_ICMP)
    return _new_summary(Summary, (4, src, dst, proto, sport, dport, ihl, first))


def _summarize_v6(packet: bytes | bytearray | memoryview) -> Summary:
    if len(packet) < 40:
        raise PacketError("IPv6 header truncated")
    payload, proto, src, dst = _V6_FIELDS.unpack_from(packet)
    if 40 + payload > len(packet):
        raise PacketError("IPv6 payload length beyond the packet")
    # Extension headers are not walked: ports are read only when the next header is TCP/UDP/ICMPv6.
    sport, dport = _ports(packet, 40, proto, True, 40 + payload, PROTO_ICMPV6)
    fields = (6, int.from_bytes(src, "big"), int.from_bytes(dst, "big"), proto, sport, dport, 40, True)
    return _new_summary(Summary, fields)


def _ports(
    packet: bytes | bytearray | memoryview, at: int, proto: int, first: bool, total: int, icmp: int
) -> tuple[int, int]:
    if not first:
        return 0, 0
    if proto in _PORTED and total >= at + 4:
        return _PORTS.unpack_from(packet, at)  # type: ignore[return-value]
    if proto == icmp and total >= at + 8:
        icmp_type, ident = _ICMP_TYPE_ID.unpack_from(packet, at)
        return ident, icmp_type
    return 0, 0


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of *data*, as it goes into a header."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_error(original: bytes | bytearray | memoryview, source: int, code: int, mtu: int = 0) -> bytes | None:
    """An ICMPv4 destination-unreachable answer to *original*, sent from *source* (RFC 792, RFC 1191).

    None when RFC 1122 3.2.2 forbids an answer: to an ICMP error, to a
    non-first fragment, or to a packet from an unspecified sender.
    """
    try:
        summary = summarize(original)
    except PacketError:
        return None
    if summary.version != 4 or not summary.first_fragment or summary.src == 0:
        return None
    if summary.proto == PROTO_ICMP:
        # Read the type here, not from summary.dport, which is 0 (echo reply) when the ICMP header is cut short.
        at = summary.header_length
        if len(original) <= at or original[at] not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
            return None
    quoted = bytes(original[: summary.header_length + 8])
    rest = mtu.to_bytes(4, "big") if code == ICMP_CODE_FRAG_NEEDED else b"\0\0\0\0"
    body = bytearray(bytes([ICMP_UNREACHABLE, code, 0, 0]) + rest + quoted)
    body[2:4] = checksum(body).to_bytes(2, "big")
    header = bytearray(
        IPV4_HEADER.pack(
            0x45,
            0xC0,
            20 + len(body),
            0,
            0,
            64,
            PROTO_ICMP,
            0,
            source.to_bytes(4, "big"),
            summary.src.to_bytes(4, "big"),
        )
    )
    header[10:12] = checksum(header).to_bytes(2, "big")
    return bytes(header + body)


def clamp_mss(packet: bytearray, summary: Summary, largest: int) -> bool:
    """Lower the MSS option of a TCP SYN to *largest*, fixing the checksum; True when it changed.

    Clamping at the tunnel is what keeps a TCP connection from black-holing
    when a path's MTU is smaller than the ends believe (the classic PMTUD
    failure behind filters that drop ICMP).
    """
    if summary.proto != PROTO_TCP or not summary.first_fragment:
        return False
    at = summary.header_length
    if len(packet) < at + 20 or not packet[at + 13] & TCP_FLAG_SYN:
        return False
    data_offset = (packet[at + 12] >> 4) * 4
    option, end = at + 20, min(at + data_offset, len(packet))
    while option < end:
        kind = packet[option]
        if kind == TCP_OPTION_END:
            return False
        if kind == TCP_OPTION_NOP:
            option += 1
            continue
        if option + 1 >= end or packet[option + 1] < 2:
            return False
        length = packet[option + 1]
        if kind == TCP_OPTION_MSS and length == 4 and option + 4 <= end:
            old = int.from_bytes(packet[option + 2 : option + 4], "big")
            if old <= largest:
                return False
            packet[option + 2 : option + 4] = largest.to_bytes(2, "big")
            if (option + 2 - at) % 2:
                # After a NOP or a 3-byte option the field straddles two checksum words (RFC 1071 byte order
                # independence): its bytes count swapped in the sum, so the update must use them swapped.
                _adjust_checksum(packet, at + 16, _swap16(old), _swap16(largest))
            else:
                _adjust_checksum(packet, at + 16, old, largest)
            return True
        option += length
    return False


def _swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


def _adjust_checksum(packet: bytearray, where: int, old: int, new: int) -> None:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for one changed 16-bit word."""
    value = ~int.from_bytes(packet[where : where + 2], "big") & 0xFFFF
    value += (~old & 0xFFFF) + new
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    packet[where : where + 2] = (~value & 0xFFFF).to_bytes(2, "big")
