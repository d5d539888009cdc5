"""PAT ambiguity: port overloading for peers that share one native address (RELIABILITY.md D12).

Two peers behind one PAT have the same native address for this node (the
PAT's public one). After RNAT their packets differ only by SPI, which the
kernel never sees: if both use the same source port towards the same port
here, the two flows would merge into one socket. So, after RNAT, this stage
does what a PAT does:

1. inbound, for a peer whose address is shared: the flow (peer, protocol,
   address, source port, local address, destination port) gets a public
   port, its own source port when no other flow holds that 5-tuple, else
   the next free one from a range; the packet's source port becomes it (and
   the checksum follows, RFC 1624);
2. outbound, to a shared address: the 5-tuple of the reply names the
   mapping, which gives back the original port and, since the address alone
   is ambiguous, the peer whose tunnel carries it; no mapping: the
   destination is ambiguous and the packet is dropped (a node cannot open a
   flow to one of two hosts behind a PAT, exactly as through a real one).

TCP and UDP map ports; ICMP echo maps the identifier (request in, reply
out); an ICMP error about an overloaded flow gets the public port in its
quote, so this node's socket recognises it. Mappings expire after an idle time per protocol; the table is bounded
(full: new flows are dropped, counted). Non-first fragments carry no ports
and are not mapped.

The table is written and read by the data plane's one packet thread (new
mappings, sweeps, lookups); status reads it from the agent's main thread:
single dict operations, atomic in CPython, so no lock is taken on the packet path.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.packets import Summary

PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
ICMP_ERRORS = frozenset({3, 11, 12})  # unreachable, time exceeded, parameter problem: they quote a packet
PORT_RANGE = (61000, 65535)  # where overloaded ports come from (above Linux's default ephemeral range)
IDLE = {PROTO_TCP: 600.0, PROTO_UDP: 120.0, PROTO_ICMP: 30.0}  # seconds without a packet before a mapping goes
LIMIT = 16384  # mappings held at most
_CHECKSUM_AT = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMP: 2}

# (proto, remote address, remote port, local address, local port): a flow as this node's kernel sees it
FlowKey = tuple[int, int, int, int, int]


@dataclass
class Mapping:
    peer: str
    proto: int
    original: int  # the port (or echo identifier) the peer used
    public: int  # the port this node's kernel sees
    key: FlowKey  # the overloaded flow, for the reverse direction
    origin: tuple[str, int, int, int, int, int]  # (peer, proto, address, original port, local address, port)
    last_used: float


class PortMap:
    """The port-overloading table of one agent; ``inbound`` and ``outbound`` are its pipeline stages."""

    def __init__(self, ports: tuple[int, int] = PORT_RANGE, limit: int = LIMIT) -> None:
        self.low, self.high = ports
        self.limit = limit
        self._by_origin: dict[tuple[str, int, int, int, int, int], Mapping] = {}
        self._by_flow: dict[FlowKey, Mapping] = {}
        self._cursor = self.low

    def __len__(self) -> int:
        return len(self._by_origin)

    def mappings(self) -> list[Mapping]:
        return list(self._by_origin.values())

    def inbound(self, peer: str, packet: bytearray, summary: Summary, now: float) -> bool:
        """Overload the source port of *packet* (after RNAT) from *peer*; False: no port free, drop it."""
        where = _port_field(packet, summary, inbound=True)
        if where is None:
            if summary.proto == PROTO_ICMP and summary.dport in ICMP_ERRORS:
                self._quoted(peer, packet, summary.header_length, now)
            return True  # nothing (else) to map: a fragment, an ICMP error, another protocol
        origin = (peer, summary.proto, summary.src, summary.sport, summary.dst, _other_port(summary, True))
        mapping = self._by_origin.get(origin)
        if mapping is None:
            mapping = self._new(origin, now)
            if mapping is None:
                return False
        mapping.last_used = now
        if mapping.public != mapping.original:
            _set_port(packet, summary, where, mapping.public, adjust=True)
        return True

    def outbound(self, packet: bytearray, summary: Summary, now: float, *, adjust: bool) -> str | None:
        """The peer a packet to a shared address belongs to, its original port restored; None: ambiguous.

        *adjust* False leaves a TCP/UDP checksum alone: it is partial (TUN offload), and ports are not in it.
        """
        where = _port_field(packet, summary, inbound=False)
        if where is None:
            return None
        key = (summary.proto, summary.dst, _port_at(packet, where), summary.src, _other_port(summary, False))
        mapping = self._by_flow.get(key)
        if mapping is None:
            return None
        mapping.last_used = now
        if mapping.public != mapping.original:
            _set_port(packet, summary, where, mapping.original, adjust=adjust or summary.proto == PROTO_ICMP)
        return mapping.peer

    def _quoted(self, peer: str, packet: bytearray, at: int, now: float) -> None:
        """An ICMP error about a packet this node sent on an overloaded flow: quote the port its kernel used.

        The quoted packet left with the original port restored; the socket here knows the public one.
        """
        quote = at + 8
        if len(packet) < quote + 20 or packet[quote] >> 4 != 4:
            return
        q_l4 = quote + (packet[quote] & 0x0F) * 4
        proto = packet[quote + 9]
        if proto not in (PROTO_TCP, PROTO_UDP) or len(packet) < q_l4 + 4:
            return
        src, dst = (
            int.from_bytes(packet[quote + 12 : quote + 16], "big"),
            int.from_bytes(packet[quote + 16 : quote + 20], "big"),
        )
        local_port, original = _port_at(packet, q_l4), _port_at(packet, q_l4 + 2)
        mapping = self._by_origin.get((peer, proto, dst, original, src, local_port))
        if mapping is None or mapping.public == original:
            return
        before = bytes(packet[quote:])
        packet[q_l4 + 2 : q_l4 + 4] = mapping.public.to_bytes(2, "big")
        field = q_l4 + _CHECKSUM_AT[proto]
        if len(packet) >= field + 2 and not (proto == PROTO_UDP and packet[field : field + 2] == b"\0\0"):
            _fold_into(packet, field, (~original & 0xFFFF) + mapping.public, udp=proto == PROTO_UDP)
        delta = 0
        for i in range(0, len(before) - 1, 2):  # the ICMP checksum covers the quote: every changed word
            old, new = int.from_bytes(before[i : i + 2], "big"), _port_at(packet, quote + i)
            if old != new:
                delta += (~old & 0xFFFF) + new
        _fold_into(packet, at + 2, delta)
        mapping.last_used = now

    def sweep(self, now: float) -> int:
        """Forget mappings idle longer than their protocol's timeout; returns how many went."""
        gone = 0
        for origin, mapping in list(self._by_origin.items()):
            if now - mapping.last_used > IDLE.get(mapping.proto, 60.0):
                self._by_origin.pop(origin, None)
                self._by_flow.pop(mapping.key, None)
                gone += 1
        return gone

    def _new(self, origin: tuple[str, int, int, int, int, int], now: float) -> Mapping | None:
        if len(self._by_origin) >= self.limit and not self.sweep(now):
            return None
        peer, proto, address, port, local, local_port = origin
        public = port
        if (proto, address, public, local, local_port) in self._by_flow:
            public = self._free_port(proto, address, local, local_port)
            if public is None:
                return None
        key = (proto, address, public, local, local_port)
        mapping = Mapping(peer, proto, port, public, key, origin, now)
        self._by_origin[origin] = mapping
        self._by_flow[key] = mapping
        return mapping

    def _free_port(self, proto: int, address: int, local: int, local_port: int) -> int | None:
        span = self.high - self.low + 1
        for _ in range(span):
            candidate = self._cursor
            self._cursor = self.low if candidate >= self.high else candidate + 1
            if (proto, address, candidate, local, local_port) not in self._by_flow:
                return candidate
        return None


def _other_port(summary: Summary, inbound: bool) -> int:
    """The port on this node's side of the flow (0 for ICMP echo, whose only 'port' is the identifier)."""
    if summary.proto == PROTO_ICMP:
        return 0
    return summary.dport if inbound else summary.sport


def _port_field(packet: bytearray, summary: Summary, inbound: bool) -> int | None:
    """The offset of the peer-side port (or echo identifier) field, or None when there is none to map."""
    at = summary.header_length
    if summary.version != 4 or not summary.first_fragment:
        return None  # IPv6 native addressing does not meet a PAT (NAT66 is rare); left as it is
    if summary.proto in (PROTO_TCP, PROTO_UDP) and len(packet) >= at + _CHECKSUM_AT[summary.proto] + 2:
        return at if inbound else at + 2
    if summary.proto == PROTO_ICMP and len(packet) >= at + 8:
        wanted = ICMP_ECHO_REQUEST if inbound else ICMP_ECHO_REPLY
        return at + 4 if packet[at] == wanted else None
    return None


def _port_at(packet: bytearray, where: int) -> int:
    return int.from_bytes(packet[where : where + 2], "big")


def _set_port(packet: bytearray, summary: Summary, at: int, port: int, *, adjust: bool) -> None:
    old = _port_at(packet, at)
    packet[at : at + 2] = port.to_bytes(2, "big")
    if not adjust:
        return
    field = summary.header_length + _CHECKSUM_AT[summary.proto]
    if summary.proto == PROTO_UDP and packet[field : field + 2] == b"\0\0":
        return  # no checksum, none made up
    _fold_into(packet, field, (~old & 0xFFFF) + port, udp=summary.proto == PROTO_UDP)


def _fold_into(packet: bytearray, field: int, delta: int, udp: bool = False) -> None:
    """RFC 1624 eqn. 3 on the checksum at *field*, for a sum of ~m + m' over the changed words."""
    if not delta:
        return
    value = (~int.from_bytes(packet[field : field + 2], "big") & 0xFFFF) + delta
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    result = ~value & 0xFFFF
    if udp and result == 0:
        result = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
    packet[field : field + 2] = result.to_bytes(2, "big")
