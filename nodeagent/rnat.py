"""RNAT: correcting an inner packet's addresses from what the outer one went through (native addressing).

In a VPN with native addressing nodes keep their real addresses: an
application on A reaches peer B at the address the netmap gives A for B (B's
public mapping, or its LAN address when both sit on one site), and B sends
from its own LAN address to A's address as B knows it. The outer header has
crossed the NATs; the inner one, sealed by the sender, has not. So the
receiver, after the packet authenticated, corrects the inner header (the
invention's "RNAT"):

1. the destination, when this node is behind NAT: the peer addressed this
   node's public mapping, the kernel here expects its own address;
2. the source, when the sender is behind NAT: the sender wrote its private
   address, this node knows it by its mapping (and cryptokey routing,
   ACLs and the applications then see that address);
3. checksums, incrementally (RFC 1624 eqn. 3): the IPv4 header checksum;
   TCP, UDP and ICMPv6, whose pseudo-header holds the addresses (a UDP
   checksum 0, "none", stays 0; a result of 0 is sent as 0xFFFF); ICMPv4
   has no pseudo-header;
4. ICMP errors: the quoted packet is one this node's application sent, in
   the translated address space, so it is mapped the other way round (its
   source like the outer destination, its destination like the outer
   source), with its own checksums and the ICMP checksum that covers it;
5. non-first IPv4 fragments: the IP header only; their payload holds no
   L4 header (the first fragment carries the L4 checksum of the whole
   datagram, and gets the pseudo-header update).

Each receiver corrects both addresses of what it receives, so a sender never
has to know how a peer sees it: on the way out RNAT is the identity (the
PAT-ambiguity port restore, nodeagent/patmap.py, is the only outbound rewrite).
IPv6 extension headers are not walked (as in nodeagent/packets.py): a packet
whose next header is not TCP, UDP or ICMPv6 gets its addresses only.

Pure functions on a bytearray; no state, no clock.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from bus.messages.sync import NodeView

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
ICMP4_ERRORS = frozenset({3, 4, 5, 11, 12})  # unreachable, source quench, redirect, time exceeded, parameter problem
ICMP6_ERRORS = frozenset({1, 2, 3, 4})  # unreachable, packet too big, time exceeded, parameter problem
_L4_CHECKSUM = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMP: 2, PROTO_ICMPV6: 2}


@dataclass(frozen=True, slots=True)
class Translation:
    """One peer's RNAT, from the netmap: its own addresses, the address this node knows it by, ours.

    *sources* are the peer's own (reported, local) addresses: an inner source
    among them becomes *seen*. Any inner destination other than *local*
    (this node's address in the VPN) becomes *local*, except those in *keep*:
    (network, mask) pairs: the subnets this node is the gateway for, and its
    overlay addresses (the same peer may share an overlay VPN too).
    """

    version: int
    sources: frozenset[int]
    seen: int
    local: int
    keep: tuple[tuple[int, int], ...] = ()

    def inbound(self, packet: bytearray) -> bool:
        """Correct *packet* (an authenticated inner packet from this peer) in place; True when it changed."""
        if len(packet) < 20 or packet[0] >> 4 != self.version:
            return False
        src, dst = addresses(packet)
        new_src = self.seen if src in self.sources and src != self.seen else None
        new_dst = self.local if dst != self.local else None
        if new_dst is not None and any(dst & mask == network for network, mask in self.keep):
            new_dst = None  # for a subnet this node routes, or an overlay address: not its mapping
        if new_src is None and new_dst is None:
            return False
        return rewrite(packet, new_src, new_dst)


def plan(view: NodeView) -> dict[str, Translation]:
    """Each peer's Translation, for the peers this node shares a native VPN with (addresses known)."""
    overlay = [ipaddress.ip_network(v.vip) for v in view.vpns.values() if v.addressing != "native" and v.vip]
    found = {}
    for name, peer in view.peers.items():
        for vpn, seen in sorted(peer.vips.items()):
            mine = view.vpns.get(vpn)
            if mine is None or mine.addressing != "native" or not mine.vip:
                continue
            local, peer_seen = ipaddress.ip_address(mine.vip), ipaddress.ip_address(seen)
            if local.version != peer_seen.version:
                continue
            sources = set()
            for endpoint in peer.endpoints:
                try:
                    host = ipaddress.ip_address(endpoint.rpartition(":")[0].strip("[]"))
                except ValueError:
                    continue
                if host.version == local.version:
                    sources.add(int(host))
            kept = [n for n in overlay + [ipaddress.ip_network(c, strict=False) for c in mine.routes]]
            keep = tuple((int(n.network_address), int(n.netmask)) for n in kept if n.version == local.version)
            found[name] = Translation(local.version, frozenset(sources), int(peer_seen), int(local), keep)
            break
    return found


def addresses(packet: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(source, destination) of an IPv4 or IPv6 packet, as integers."""
    if packet[0] >> 4 == 4:
        return int.from_bytes(packet[12:16], "big"), int.from_bytes(packet[16:20], "big")
    return int.from_bytes(packet[8:24], "big"), int.from_bytes(packet[24:40], "big")


def rewrite(packet: bytearray, new_src: int | None, new_dst: int | None) -> bool:
    """Set the source and/or destination of *packet* (None: keep), fixing every checksum that covers them.

    False (and the packet untouched) when it is too short to hold what it claims.
    """
    version = packet[0] >> 4
    if version == 4:
        header = (packet[0] & 0x0F) * 4
        if header < 20 or len(packet) < header:
            return False
        width, src_at, dst_at = 4, 12, 16
        proto = packet[9]
        first = int.from_bytes(packet[6:8], "big") & 0x1FFF == 0
    elif version == 6 and len(packet) >= 40:
        header, width, src_at, dst_at = 40, 16, 8, 24
        proto, first = packet[6], True
    else:
        return False
    old_src, old_dst = addresses(packet)
    new_src = old_src if new_src is None else new_src
    new_dst = old_dst if new_dst is None else new_dst
    delta = _delta(old_src, new_src, width) + _delta(old_dst, new_dst, width)
    if first and proto in _L4_CHECKSUM:
        _fix_l4(packet, header, proto, version, delta, (old_src, new_src, old_dst, new_dst))
    packet[src_at : src_at + width] = new_src.to_bytes(width, "big")
    packet[dst_at : dst_at + width] = new_dst.to_bytes(width, "big")
    if version == 4:
        _adjust(packet, 10, delta)
    return True


def _fix_l4(
    packet: bytearray, at: int, proto: int, version: int, delta: int, mapping: tuple[int, int, int, int]
) -> None:
    """The L4 checksum after the addresses change, and an ICMP error's quoted packet."""
    field = at + _L4_CHECKSUM[proto]
    if len(packet) < field + 2:
        return
    if proto == PROTO_UDP:
        if packet[field : field + 2] != b"\0\0":  # 0: the sender computed no checksum, and none is made up
            _adjust(packet, field, delta, udp=True)
        return
    if proto == PROTO_TCP:
        _adjust(packet, field, delta)
        return
    errors = ICMP4_ERRORS if proto == PROTO_ICMP else ICMP6_ERRORS
    quoted_delta = 0
    if packet[at] in errors and len(packet) >= at + 8:
        old_src, new_src, old_dst, new_dst = mapping
        quoted = packet[at + 8 :]
        # The quoted packet went the other way: its source is the outer destination's, and vice versa.
        if len(quoted) >= (20 if version == 4 else 40) and quoted[0] >> 4 == version:
            q_src, q_dst = addresses(quoted)
            q_new_src = new_dst if q_src == old_dst else None
            q_new_dst = new_src if q_dst == old_src else None
            if (q_new_src is not None or q_new_dst is not None) and rewrite(quoted, q_new_src, q_new_dst):
                quoted_delta = _sum_delta(packet[at + 8 :], quoted)
                packet[at + 8 :] = quoted
    _adjust(packet, field, quoted_delta + (delta if proto == PROTO_ICMPV6 else 0))


def _delta(old: int, new: int, width: int) -> int:
    """Sum of ~m + m' over the 16-bit words of a field that changed from *old* to *new* (RFC 1624)."""
    if old == new:
        return 0
    total = 0
    for shift in range(0, width * 8, 16):
        total += (~(old >> shift) & 0xFFFF) + ((new >> shift) & 0xFFFF)
    return total


def _sum_delta(old: bytes | bytearray, new: bytes | bytearray) -> int:
    """The RFC 1624 delta between two equal-length byte strings, word by word (the quoted packet's change)."""
    total = 0
    for i in range(0, len(old) - 1, 2):
        if old[i : i + 2] != new[i : i + 2]:
            total += (~int.from_bytes(old[i : i + 2], "big") & 0xFFFF) + int.from_bytes(new[i : i + 2], "big")
    if len(old) % 2 and old[-1] != new[-1]:
        total += (~(old[-1] << 8) & 0xFFFF) + (new[-1] << 8)
    return total


def _adjust(packet: bytearray, where: int, delta: int, udp: bool = False) -> None:
    """RFC 1624 eqn. 3, HC' = ~(~HC + sum(~m + m')), for a checksum field at *where*."""
    if not delta:
        return
    value = (~int.from_bytes(packet[where : where + 2], "big") & 0xFFFF) + delta
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    result = ~value & 0xFFFF
    if udp and result == 0:
        result = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
    packet[where : where + 2] = result.to_bytes(2, "big")
