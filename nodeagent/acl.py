"""ACL rules from the netmap, enforced on the way in, with a flow table for replies.

A VPN without rules lets its members talk freely. With rules, a packet from a
peer passes when a rule allows (sender, this node, protocol, destination
port), or when it answers a flow this node opened (or accepted) recently: the
rules describe who may *start* a conversation, as operators of Tailscale and
NetBird expect, and the answers of an allowed conversation are not rules of
their own. The flow table is bounded; a full table makes new flows wait for
the next expiry sweep rather than grow memory without limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bus.messages.sync import AclView, NodeView
from nodeagent.packets import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Summary

FLOW_IDLE_SECONDS = 120.0
FLOW_TABLE_LIMIT = 65536

_PROTOCOLS = {"any": None, "tcp": PROTO_TCP, "udp": PROTO_UDP, "icmp": PROTO_ICMP}


def parse_ports(text: str) -> tuple[tuple[int, int], ...]:
    """'' means every port; otherwise '22,80,8000-8100' as inclusive ranges."""
    ranges = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        ranges.append((int(low), int(high or low)))
    return tuple(ranges)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: int
    src: str
    dst: str
    proto: int | None
    ports: tuple[tuple[int, int], ...]

    def port_ok(self, port: int) -> bool:
        return not self.ports or any(low <= port <= high for low, high in self.ports)


_NO_PROTOCOL = -1  # a protocol name this agent does not know matches no packet: fail closed, never "any"


def compile_rule(rule: AclView) -> CompiledRule:
    proto = _PROTOCOLS.get(rule.proto, _NO_PROTOCOL)
    return CompiledRule(rule.id, rule.src, rule.dst, proto, parse_ports(rule.ports))


class Policy:
    """The rules of every VPN of this node, compiled from one NodeView; immutable afterwards."""

    def __init__(self, view: NodeView) -> None:
        self.node = view.node
        self.tags = frozenset(view.tags)
        self.peer_tags = {name: frozenset(peer.tags) for name, peer in view.peers.items()}
        self.rules: dict[str, list[CompiledRule]] = {}
        for rule in view.acl:
            self.rules.setdefault(rule.vpn, []).append(compile_rule(rule))

    def restricted(self, vpn: str) -> bool:
        return bool(self.rules.get(vpn))

    def _is(self, selector: str, name: str, tags: frozenset[str]) -> bool:
        if selector == "any":
            return True
        if selector.startswith("tag:"):
            return selector[4:] in tags
        return selector == name

    def allows_inbound(self, vpn: str, peer: str, packet: Summary) -> CompiledRule | None:
        """The rule that lets *peer* start this conversation with this node, or None."""
        peer_tags = self.peer_tags.get(peer, frozenset())
        for rule in self.rules.get(vpn, ()):
            if rule.proto is not None and rule.proto != _base_protocol(packet.proto):
                continue
            if packet.proto in (PROTO_TCP, PROTO_UDP) and not rule.port_ok(packet.dport):
                continue
            if self._is(rule.src, peer, peer_tags) and self._is(rule.dst, self.node, self.tags):
                return rule
        return None


def _base_protocol(proto: int) -> int:
    return PROTO_ICMP if proto == PROTO_ICMPV6 else proto


FlowKey = tuple[int, int, int, int, int]  # proto, local address, local port, remote address, remote port


def _icmp_ident(packet: Summary) -> int:
    return packet.sport if packet.proto in (PROTO_ICMP, PROTO_ICMPV6) else 0


class FlowTable:
    """Conversations seen recently, so that answers to them pass restricted VPNs' ACLs."""

    def __init__(self, idle: float = FLOW_IDLE_SECONDS, limit: int = FLOW_TABLE_LIMIT) -> None:
        self.idle = idle
        self.limit = limit
        self._flows: dict[FlowKey, float] = {}
        self.refused = 0  # new flows not recorded because the table was full

    @staticmethod
    def key_outbound(packet: Summary) -> FlowKey:
        if packet.proto in (PROTO_ICMP, PROTO_ICMPV6):
            return (PROTO_ICMP, packet.src, _icmp_ident(packet), packet.dst, 0)
        return (packet.proto, packet.src, packet.sport, packet.dst, packet.dport)

    @staticmethod
    def key_inbound(packet: Summary) -> FlowKey:
        if packet.proto in (PROTO_ICMP, PROTO_ICMPV6):
            return (PROTO_ICMP, packet.dst, _icmp_ident(packet), packet.src, 0)
        return (packet.proto, packet.dst, packet.dport, packet.src, packet.sport)

    def note(self, key: FlowKey, now: float | None = None) -> None:
        if key not in self._flows and len(self._flows) >= self.limit:
            self.refused += 1
            return
        self._flows[key] = (time.monotonic() if now is None else now) + self.idle

    def known(self, key: FlowKey | None, now: float | None = None) -> bool:
        if key is None:
            return False
        deadline = self._flows.get(key)
        return deadline is not None and deadline >= (time.monotonic() if now is None else now)

    def sweep(self, now: float | None = None) -> int:
        """Forget idle flows; returns how many."""
        now = time.monotonic() if now is None else now
        # list() copies under the GIL in one step: the pipeline threads may add flows meanwhile.
        idle = [key for key, deadline in list(self._flows.items()) if deadline < now]
        for key in idle:
            self._flows.pop(key, None)
        return len(idle)

    def __len__(self) -> int:
        return len(self._flows)


_ICMP_ERRORS = {4: {3, 4, 5, 11, 12}, 6: {1, 2, 3, 4}}  # destination unreachable, too big, time exceeded, ...


def quoted_flow_key(packet: bytes | memoryview, summary: Summary) -> FlowKey | None:
    """For an ICMP error, the outbound flow key of the packet it quotes (the one this node sent), else None.

    Errors such as "fragmentation needed" answer the node's own flows; keying
    them by the quoted header lets them through restricted VPNs, where PMTUD
    depends on them. The quote may be cut short (RFC 792 keeps 8 bytes of the
    payload), so it is read leniently: the header and the first four bytes.
    """
    if summary.proto not in (PROTO_ICMP, PROTO_ICMPV6) or summary.dport not in _ICMP_ERRORS[summary.version]:
        return None
    quote = memoryview(packet)[summary.header_length + 8 :]
    if summary.version == 4:
        if len(quote) < 20 or quote[0] >> 4 != 4:
            return None
        header, proto = (quote[0] & 0x0F) * 4, quote[9]
        src, dst = int.from_bytes(quote[12:16], "big"), int.from_bytes(quote[16:20], "big")
    else:
        if len(quote) < 40 or quote[0] >> 4 != 6:
            return None
        header, proto = 40, quote[6]
        src, dst = int.from_bytes(quote[8:24], "big"), int.from_bytes(quote[24:40], "big")
    if len(quote) < header + 4:
        return None
    first, second = (
        int.from_bytes(quote[header : header + 2], "big"),
        int.from_bytes(quote[header + 2 : header + 4], "big"),
    )
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        return (
            PROTO_ICMP,
            src,
            int.from_bytes(quote[header + 4 : header + 6], "big") if len(quote) >= header + 6 else 0,
            dst,
            0,
        )
    return (proto, src, first, dst, second)
