"""The data plane: packets between the TUN device and the peers, in batches.

Outbound: TUN read -> summarize -> peer (longest prefix; a native address
several peers share: the PAT-ambiguity map picks the peer and restores the
port) -> VPN isolation -> flow note -> MSS clamp -> seal (ESP) -> frame for
the peer's path -> send.
Inbound: receive -> demultiplex (masquerade marker, keepalive, ESP) -> SPI
lookup -> authenticate -> replay commit -> native addressing (RNAT, then
port overloading for a shared address) -> cryptokey routing -> VPN isolation
-> ACL -> TUN write.

Every stage takes the whole batch a read returned, so that the performance
work can swap reads of one packet for reads of 64 KB (TUN offloads, UDP GRO)
without touching the decisions. One thread runs both directions and the
periodic work (``_loop``: fewer wake-ups per round trip); the control loop
changes peers and keys by replacing whole objects (a PeerTable, a Policy, an
SA), which Python assigns atomically, so no lock is held on the packet path.

Every packet that is not delivered is counted under the reason why.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from bus.messages.sync import CAP_CSUM, CAP_GSO, NodeView
from nodeagent.acl import FlowTable, Policy, quoted_flow_key
from nodeagent.constants import ESP_MIN_PACKET_SIZE, ESP_OVERHEAD, PAYLOAD_ALIGNMENT
from nodeagent.esp import DropReason, EspParseError, InboundSA, OutboundSA, RekeyRequired
from nodeagent.natprobe import NatProbe
from nodeagent.offload import Buffer, OffloadError, Partial, SuperPacket, finish
from nodeagent.packets import (
    ICMP_CODE_HOST_UNREACHABLE,
    PROTO_TCP,
    PROTO_UDP,
    TCP_FLAG_SYN,
    PacketError,
    Summary,
    clamp_mss,
    icmp_error,
    summarize,
)
from nodeagent.patmap import PortMap
from nodeagent.peers import PeerTable, Route
from nodeagent.rnat import Translation, plan
from nodeagent.sourcelimit import SourceLimiter
from nodeagent.transport import (
    KEEPALIVE,
    MASQUERADE_MARKER,
    PATH_OVERHEAD,
    Kind,
    Wire,
    classify_udp,
    strip_ipv4_header,
)
from nodeagent.tun import Tun

if TYPE_CHECKING:
    from collections.abc import Callable

    from nodeagent.tcp443 import TcpPaths

log = logging.getLogger(__name__)

BATCH = 64  # packets per read; the unit every stage works on
QUEUE_LIMIT = 64  # packets held per peer while its keys or endpoint are not ready
QUEUE_WAIT = 3.0  # seconds a held packet waits before it is answered with ICMP unreachable
UNDERLAY_MTU = 1500
DISCARDED = b""  # _seal_one's answer for a packet that cannot be sealed at all (counted, never sent)
TICK_INTERVAL = 0.25
PATHS = ("auto", "udp", "esp")  # what `agent up --path` takes; auto follows the server's choice per pair
UDP_PATHS = ("udp", "punch")
TCP_PATHS = ("tcp443", "relay")  # ESP over TLS streams (nodeagent/tcp443.py): straight to the peer, or the relay
PUNCH_SECONDS = 10.0  # hole punching: keepalives every PUNCH_INTERVAL for this long, or until the peer answers
PUNCH_INTERVAL = 0.5
# The first punches leave with a small TTL: they open this node's own NAT but expire before the peer's,
# so the peer's NAT holds no entry for them that would make it pick another port for its own punches.
PUNCH_LOW_TTL = 2
PUNCH_LOW_TTL_SECONDS = 2.0
EXIT_MARK = 0x7871  # SO_MARK of the agent's own ESP sockets, and the routing table of exit-node routes
# Liveness: when a peer that sent data falls silent, send it an authenticated dummy packet (RFC 4303
# next header 59) every LIVENESS_QUIET seconds, for at most LIVENESS_WINDOW seconds after its last data.
# If our NAT box restarted or we moved, the dummy leaves through the new mapping and, being authenticated,
# teaches the peer where we are now: a flow the peer sends to us resumes within about a second, instead of
# waiting for the next keepalive (RELIABILITY.md D9, D11). Idle tunnels send nothing extra.
LIVENESS_QUIET = 1.0
LIVENESS_WINDOW = 15.0
# Introduction: a new tunnel on a UDP path sends an authenticated dummy every LIVENESS_QUIET seconds until
# the peer's first packet arrives, for at most INTRODUCE_WINDOW seconds. The side behind PAT must speak
# first (its mapping toward the peer exists only once it sends), and only an authenticated packet may
# teach the peer that mapping; waiting for the first data packet or keepalive could take 25 s.
INTRODUCE_WINDOW = 30.0
_IN_DROP = {reason: f"in_{reason.value}" for reason in DropReason}  # counter names, built once, not per drop
_SPI = struct.Struct("!I")
_PORTED = (PROTO_TCP, PROTO_UDP)
_MARKER_SPI = struct.Struct("!LL")  # a masqueraded datagram's marker and the SPI after it
_MARKER_SIZE = len(MASQUERADE_MARKER)
# The marker as one word: what inbound_udp compares a datagram's first word with, and the prefix seal_into packs.
_MASQUERADE_WORD = int.from_bytes(MASQUERADE_MARKER, "big")
_MASQUERADED_MIN = _MARKER_SIZE + ESP_MIN_PACKET_SIZE  # shorter ones the demultiplexer calls garbage
_ESP = Kind.ESP  # a module constant: an enum member read costs a descriptor call per packet
_FLOW_KEYS: dict[tuple[int, int], Callable[[Buffer], tuple[Any, ...]]] = {}  # _admit's unpacks by header shape


class _Origin(NamedTuple):
    """Where a run of packets came from: its source, whether UDP (an authenticated packet then teaches the
    peer's host and port; raw ESP only the host), and for a TLS stream what to call once one authenticates."""

    source: tuple[str, int]
    udp: bool
    on_authenticated: Callable[[str], None] | None = None


def tunnel_mtu(vpn_mtu: int, path: str, underlay_mtu: int = UNDERLAY_MTU) -> int:
    """The largest inner packet that fits the path without fragmenting the outer one (RELIABILITY.md D14)."""
    room = underlay_mtu - PATH_OVERHEAD[path] - ESP_OVERHEAD
    room -= room % PAYLOAD_ALIGNMENT  # the padded payload is a multiple of 4; the trailer fits in what is left
    return min(vpn_mtu, room - (PAYLOAD_ALIGNMENT - 1))


@dataclass
class Tunnel:
    """What this node holds for one peer: where it is, how to reach it, and the outbound SA."""

    peer: str
    path: str = "udp"  # esp | udp | punch | tcp443 | relay (services/datastore/paths.py)
    punch_until: float = 0.0
    endpoint: str | None = None  # host from the netmap (the peer's reported address)
    port: int | None = None
    learned: tuple[str, int] | None = None  # source of the last authenticated UDP packet (PAT, roaming)
    learned_host: str | None = None  # source of the last authenticated raw ESP packet (roaming on the esp path)
    peer_class: str = "unknown"  # the peer's NAT class from the view: why the server chose this path
    takes_partial: bool = False  # inner checksums may reach this peer partial: it reported CAP_CSUM (and we allow it)
    path_since: float = 0.0  # when the tunnel took its current path (a stream path introduces itself after)
    outbound: OutboundSA | None = None
    inbound_spis: set[int] = field(default_factory=set)
    queue: deque[tuple[float, bytes]] = field(default_factory=lambda: deque(maxlen=QUEUE_LIMIT))
    last_sent: float = 0.0
    last_received: float = 0.0  # any authenticated packet, liveness dummies included
    last_data: float = 0.0  # the last authenticated packet that carried data
    last_probe: float = 0.0  # the last liveness or introduction dummy sent
    keyed_at: float = 0.0  # when the first outbound SA arrived (the introduction window starts)
    tx: int = 0
    rx: int = 0

    def known_host(self) -> str | None:
        """The host this peer's authenticated packets come from (or the netmap says): never rate-limited."""
        if self.learned is not None:
            return self.learned[0]
        return self.learned_host or self.endpoint

    def punching(self, now: float) -> bool:
        """Hole punching goes on until the peer's first authenticated packet, or for PUNCH_SECONDS."""
        return self.path == "punch" and now < self.punch_until and not self.last_received

    def address(self, path: str) -> tuple[str, int] | None:
        if path in UDP_PATHS:
            if self.learned is not None:
                return self.learned
            return (self.endpoint, self.port) if self.endpoint and self.port else None
        host = self.learned_host or (self.learned[0] if self.learned is not None else self.endpoint)
        return (host, 0) if host else None


class DataPlane:
    """One agent's data plane; ``apply_view`` and ``install`` are its whole control interface."""

    def __init__(
        self,
        wire: Wire,
        tun: Tun | None = None,
        *,
        path: str = "auto",
        exit_node: str | None = None,
        exempt: list[str] | None = None,
        partial_checksums: bool = True,
    ) -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(PATHS)}")
        if path == "esp" and wire.esp is None:
            raise ValueError("the esp path needs the raw ESP socket")
        self.wire = wire
        self.tun = tun
        # Inner TCP/UDP checksums may leave this node partial (TUN checksum offload), toward peers that
        # finish them on their side: agents that report CAP_CSUM (they write NEEDS_CSUM). Toward any other
        # peer they are completed before sealing. Off: completed at the TUN for every peer.
        self.partial_checksums = partial_checksums
        if tun is not None:
            tun.complete_checksums = not partial_checksums
        self.forced_path = None if path == "auto" else path  # an operator's override on this node
        self.nat_probe: NatProbe | None = None  # fed the reflector's answers (control datagrams)
        self.tcp: TcpPaths | None = None  # the TCP/443 and relay streams; None: those paths are unavailable
        self.exit_node = exit_node
        self.exempt = exempt or []  # hosts never routed through an exit node: the control server
        self.exit_via: str | None = None  # the source address of the exit route while it is installed
        self.counters: Counter[str] = Counter()
        self.peers = PeerTable(NodeView(node=""), exit_node=exit_node)
        self.policy = Policy(NodeView(node=""))
        self.flows = FlowTable()
        self.tunnels: dict[str, Tunnel] = {}
        self.spis: dict[int, tuple[InboundSA, str]] = {}
        self.native: dict[str, Translation] = {}  # peer -> RNAT, for peers met in a native VPN
        self.overloaded: frozenset[str] = frozenset()  # peers whose native address another peer shares
        self.portmap = PortMap()
        self.source_limiter = SourceLimiter()  # forged tags cost a decryption each: limited per source (D16)
        self.keepalive = 25.0
        self.mtu = tunnel_mtu(1400, "udp")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._holding = False  # some tunnel's queue may hold packets (set where they are queued, cleared by flush)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ------------------------------------------------------------------ control interface
    def apply_view(self, view: NodeView) -> None:
        """Take a new netmap: peers, routes, ACLs; peers that left lose their SAs at once."""
        self.peers = PeerTable(view, exit_node=self.exit_node)
        self.policy = Policy(view)
        self.native = plan(view)
        self.overloaded = frozenset(name for sharing in self.peers.shared.values() for name in sharing)
        for name in [n for n in self.tunnels if n not in view.peers]:
            self.remove_peer(name)
        now = time.monotonic()
        for name, peer in view.peers.items():
            tunnel = self.tunnels.setdefault(name, Tunnel(name))
            previous = tunnel.address(tunnel.path)
            tunnel.endpoint, tunnel.port = _pick_endpoint([peer.endpoint] if peer.endpoint else peer.endpoints)
            tunnel.peer_class = peer.nat_class
            tunnel.takes_partial = self.partial_checksums and CAP_CSUM in peer.caps
            path = self.forced_path or peer.path or "udp"
            if path == "esp" and self.wire.esp is None:
                path = "udp"
            if path == "punch" and (tunnel.path != "punch" or tunnel.address("punch") != previous):
                tunnel.punch_until = now + PUNCH_SECONDS  # a new pair, or the peer's mapping moved: punch again
            if path != tunnel.path:
                tunnel.path_since = now
            tunnel.path = path
        if view.vpns:
            self.keepalive = float(min(v.keepalive for v in view.vpns.values()))
            self.mtu = tunnel_mtu(min(v.mtu for v in view.vpns.values()), "udp")  # the larger overhead
        if self.tun is not None:
            self._configure_tun(view)
        self._wake()

    def _configure_tun(self, view: NodeView) -> None:
        assert self.tun is not None
        self.tun.set_mtu(self.mtu)
        addresses = []
        routes = []
        native = []  # (peer's real address, ours): captured by policy routing, not by an address on the TUN
        for vpn in view.vpns.values():
            if vpn.addressing == "native":
                native += [(p.vips[vpn.name], vpn.vip) for p in view.peers.values() if vpn.vip and vpn.name in p.vips]
                continue
            subnet = ipaddress.ip_network(vpn.subnet, strict=False)
            addresses.append((vpn.vip, subnet.prefixlen))
        for peer in view.peers.values():
            for route in peer.routes:
                if ipaddress.ip_network(route.cidr).prefixlen == 0:
                    continue  # a default route goes in the exit table (below), never in main
                mine = view.vpns.get(route.vpn)
                if mine is not None and mine.vip:
                    routes.append((route.cidr, mine.vip))
        self.tun.set_addresses(addresses)
        self.tun.set_routes(routes)
        self.tun.set_native_routes(native, EXIT_MARK, self.exempt, self.wire.port)
        exit_via = None
        exit_peer = view.peers.get(self.exit_node) if self.exit_node else None
        if exit_peer is not None:
            for route in exit_peer.routes:
                if ipaddress.ip_network(route.cidr).prefixlen == 0 and route.vpn in view.vpns:
                    exit_via = view.vpns[route.vpn].vip
        if exit_via != self.exit_via:
            self.tun.route_all_through(exit_via, EXIT_MARK, self.exempt)
            self.exit_via = exit_via
            log.info("exit node %s: %s", self.exit_node, "in use" if exit_via else "not offering 0.0.0.0/0 (yet)")

    def install(self, peer: str, outbound: OutboundSA | None, inbound: list[InboundSA]) -> None:
        """Make these the peer's SAs: *outbound* for sending, exactly *inbound* for receiving."""
        tunnel = self.tunnels.get(peer)
        if tunnel is None:
            log.debug("keys for %s, which is not a peer (any more); ignored", peer)
            return
        wanted = {sa.spi for sa in inbound}
        for sa in inbound:
            owner = self.spis.get(sa.spi)
            if owner is not None and owner[1] != peer:
                self.counters["spi_collision"] += 1
                log.warning("SPI %#010x of %s collides with %s's; not installed", sa.spi, peer, owner[1])
                continue
            if owner is None or owner[0] is not sa:
                self.spis[sa.spi] = (sa, peer)
        for spi in tunnel.inbound_spis - wanted:
            self.spis.pop(spi, None)
        tunnel.inbound_spis = wanted
        if outbound is not None and not tunnel.keyed_at:
            tunnel.keyed_at = time.monotonic()
        tunnel.outbound = outbound
        self._wake()

    def remove_peer(self, peer: str) -> None:
        tunnel = self.tunnels.pop(peer, None)
        if tunnel is None:
            return
        for spi in tunnel.inbound_spis:
            self.spis.pop(spi, None)
        tunnel.outbound = None
        log.info("peer %s removed: its SAs are gone", peer)

    def capabilities(self) -> list[str]:
        """What this data plane can do as it runs now, for the server (SyncHeartbeat.caps, paths.py).

        CAP_GSO: UDP GSO and GRO on the socket (GSO may be turned off by a refused send) and TSO on the
        TUN; CAP_CSUM: the TUN carries the virtio_net_hdr, so every TCP/UDP packet is written NEEDS_CSUM
        and a partial checksum from a peer is completed by this kernel.
        """
        tun, wire = self.tun, self.wire
        caps = []
        if tun is not None and tun.offload:
            caps.append(CAP_CSUM)
            if tun.tso and wire.gso and wire.gro:
                caps.append(CAP_GSO)
        return sorted(caps)

    def endpoints(self) -> list[str]:
        """This node's addresses with its UDP port, for the server (what peers will send to)."""
        found = []
        for address in _local_ipv4_addresses(skip=self.tun.name if self.tun else None):
            found.append(f"{address}:{self.wire.port}")
        return found

    # ------------------------------------------------------------------ outbound
    def outbound_batch(self, packets: list[bytes]) -> list[bytes]:
        """Send what can be sent; returns the ICMP answers to write back to the TUN.

        The routing decision depends only on the summary, so a packet with the summary of the one before
        (the next packet of the same flow) takes the same tunnel without deciding again; only packets to
        an address several peers share (the port map rewrites each) are decided one by one.
        """
        answers: list[bytes] = []
        counters = self.counters
        now = time.monotonic()
        ready: list[tuple[Tunnel, bytes]] = []
        decided: Summary | None = None
        decided_tunnel: Tunnel | None = None
        flow: tuple[Any, ...] | None = None  # the decided packet's _flow_bytes, when it has a plain IPv4 header
        flow_length = -1
        for packet in packets:
            # The next packet of the decided flow, told by its header bytes without a summary (small packets).
            if flow is not None and len(packet) == flow_length and _FLOW_V4.unpack_from(packet) == flow:
                summary = decided  # type: ignore[assignment]
                tunnel = decided_tunnel
            else:
                try:
                    summary = summarize(packet)
                except PacketError:
                    counters["out_malformed"] += 1
                    continue
                if summary == decided:
                    tunnel = decided_tunnel
                else:
                    tunnel, packet, again = self._route_outbound(packet, summary, now, answers)
                    if tunnel is None:
                        flow = None
                        continue
                    decided, decided_tunnel = (summary, tunnel) if again else (None, None)
                    flow, flow_length = _flow_bytes(packet, summary) if again else None, len(packet)
            if summary.proto == PROTO_TCP and _is_syn(packet, summary.header_length):
                mutable = bytearray(packet)
                if clamp_mss(mutable, summary, self.mtu - (40 if summary.version == 4 else 60)):
                    counters["out_mss_clamped"] += 1  # MTU minus the IP and TCP headers
                    packet = Partial(mutable) if type(packet) is Partial else bytes(mutable)
            ready.append((tunnel, packet))  # type: ignore[arg-type]
        for tunnel, packet in self._send_batch(ready, now):
            if len(tunnel.queue) == QUEUE_LIMIT:
                counters["out_queue_full"] += 1
            tunnel.queue.append((now, packet))
            counters["out_queued"] += 1
            self._holding = True
        return answers

    def _route_outbound(
        self, packet: bytes, summary: Summary, now: float, answers: list[bytes]
    ) -> tuple[Tunnel | None, bytes, bool]:
        """The tunnel for one packet (None: dropped, counted, maybe answered), the packet (the port map may
        rewrite it), and whether the next packet with the same summary may take the same tunnel."""
        peers, counters = self.peers, self.counters
        route = peers.outbound(summary.version, summary.dst)
        again = True
        if route is not None and peers.shared and (summary.version, summary.dst) in peers.shared:
            again = False
            route, packet = self._disambiguate(packet, summary, now)
            if route is None:
                counters["out_native_ambiguous"] += 1  # no flow from one of the peers behind that PAT
                return None, packet, False
        if route is None:
            counters["out_no_route"] += 1
            answer = self._unreachable(packet, summary.version)
            if answer is not None:
                answers.append(answer)
            return None, packet, False
        if not peers.may_send_from(route.vpn, summary.version, summary.src):
            counters["out_vpn_isolation"] += 1  # a packet of another VPN, forwarded here by the kernel
            return None, packet, False
        if self.policy.restricted(route.vpn):
            self.flows.note(self.flows.key_outbound(summary), now)  # once per flow and batch is enough
        tunnel = self.tunnels.get(route.peer)
        if tunnel is None:
            counters["out_no_route"] += 1
        return tunnel, packet, again

    def _disambiguate(self, packet: bytes, summary: Summary, now: float) -> tuple[Route | None, bytes]:
        """A packet to a native address several peers share: the port map names the peer (nodeagent/patmap.py)."""
        mutable = bytearray(packet)
        kind = type(packet)
        partial = kind is SuperPacket or kind is Partial  # ports are not in a partial sum: nothing to adjust
        peer = self.portmap.outbound(mutable, summary, now, adjust=not partial)
        if peer is None:
            return None, packet
        superpacket = kind is SuperPacket
        rewritten = kind(mutable) if partial else bytes(mutable)
        if superpacket:
            rewritten.gso = packet.gso  # type: ignore[attr-defined]
        return self.peers.shared[(summary.version, summary.dst)].get(peer), rewritten

    def _send_batch(self, batch: list[tuple[Tunnel, bytes]], now: float) -> list[tuple[Tunnel, bytes]]:
        """Seal and send a batch; returns what could not be sent yet (to hold), in order.

        A TSO super-packet is split here, into one ESP packet per segment, and
        inner checksums are completed for peers that do not take them partial
        (``_inner``). Consecutive packets for one tunnel are sealed as one run;
        a packet is a head and a tail (a segment's header and payload, or the
        whole packet and ``b""``), joined only once, with the ESP trailer, by
        ``OutboundSA.seal_into``. UDP paths gather each peer address's sealed
        datagrams and send them with as few system calls as UDP GSO allows;
        other paths go through ``_send`` one packet at a time. Only the
        data-plane thread calls this.
        """
        unsent: list[tuple[Tunnel, bytes]] = []
        groups: dict[tuple[str, int], list[bytes]] = {}
        heads: list[bytes] = []
        tails: list[Buffer] = []
        current: Tunnel | None = None
        current_held: Callable[[bytes], bytes] = _same
        for tunnel, packet in batch:
            kind = type(packet)
            # Held segments keep the mark of their partial checksums, for a peer whose capabilities change.
            held = Partial if kind is SuperPacket and tunnel.takes_partial else _same
            if tunnel is not current or held is not current_held:
                if heads:
                    self._seal_run(current, heads, tails, current_held, groups, unsent, now)  # type: ignore[arg-type]
                    heads, tails = [], []
                current, current_held = tunnel, held
            if kind is bytes or (kind is Partial and tunnel.takes_partial):
                heads.append(packet)
                tails.append(b"")
                continue
            try:
                found = self._inner(tunnel, packet)
            except OffloadError:
                self.counters["out_malformed"] += 1  # a super-packet whose TCP header does not add up
                continue
            if found.__class__ is tuple:
                heads += found[0]
                tails += found[1]
            else:
                heads += found
                tails += [b""] * len(found)
        if heads:
            self._seal_run(current, heads, tails, current_held, groups, unsent, now)  # type: ignore[arg-type]
        for address, parts in groups.items():
            if parts:
                self.wire.send_udp_batch(parts, address)
        return unsent

    def _seal_run(
        self,
        tunnel: Tunnel,
        heads: list[bytes],
        tails: list[Buffer],
        held_as: Callable[[bytes], bytes],
        groups: dict[tuple[str, int], list[bytes]],
        unsent: list[tuple[Tunnel, bytes]],
        now: float,
    ) -> None:
        """Packets (head + tail) for one tunnel: sealed into their address's group (UDP paths) or sent one by one.

        What cannot be sent yet is held as *held_as* makes it (segments keep their partial-checksum mark)."""
        path = tunnel.path
        sa, address = tunnel.outbound, tunnel.address(path)
        if path not in UDP_PATHS or sa is None or address is None:
            pieces = [head if not tail else b"".join((head, tail)) for head, tail in zip(heads, tails, strict=True)]
            if path not in UDP_PATHS:
                unsent += [(tunnel, held_as(piece)) for piece in pieces if not self._send(tunnel, piece, now)]
            else:
                unsent += [(tunnel, held_as(piece)) for piece in pieces]
            return
        group = groups.get(address)
        if group is None:
            group = groups[address] = []
        before = len(group)
        try:
            done = sa.seal_into(heads, tails, group, _MASQUERADE_WORD)
        except EspParseError as error:  # no IP packet (summarize lets none through): the rest one by one
            done = error.sealed  # type: ignore[attr-defined]
            rest = [b"".join(pair) for pair in zip(heads[done:], tails[done:], strict=True)]
            sealed, held = self._seal_each(sa, rest)
            for packet in sealed:
                group += (MASQUERADE_MARKER, packet)
            heads, tails = rest, [b""] * len(rest)  # joined now; held is rest's suffix from a spent SA on
            done = len(rest) - len(held)
            count = (len(group) - before) // 2
        else:
            count = done
        if done < len(heads):  # the SA used its last number: the rest waits for the next SA
            held_pieces = [b"".join(pair) for pair in zip(heads[done:], tails[done:], strict=True)]
            self.counters["out_rekey_wait"] += len(held_pieces)
            unsent += [(tunnel, held_as(piece)) for piece in held_pieces]
        if not count:
            return
        tunnel.last_sent = now
        tunnel.tx += count
        self.counters["out_packets"] += count

    @staticmethod
    def _inner(tunnel: Tunnel, packet: bytes) -> list[bytes] | tuple[list[bytes], list[Buffer]]:
        """The inner packets to seal for *tunnel*: a super-packet's segments, checksums as the peer takes them.

        Partial toward a peer that completes them (CAP_CSUM: it writes them NEEDS_CSUM), as
        (headers, payloads) that the sealer joins; complete toward any other, whose kernel would
        drop a packet with a partial checksum.
        """
        kind = type(packet)
        if kind is SuperPacket:
            if tunnel.takes_partial:
                return packet.parts()  # type: ignore[attr-defined]
            return packet.segments(complete=True)  # type: ignore[attr-defined]
        if kind is Partial and not tunnel.takes_partial:
            return [finish(packet)]
        return [packet]

    def _send(self, tunnel: Tunnel, packet: bytes, now: float) -> bool:
        sa = tunnel.outbound
        path = tunnel.path
        if type(packet) is Partial and not tunnel.takes_partial:
            packet = finish(packet)  # held in the queue since before the peer's capabilities changed
        if path in TCP_PATHS:
            return self._send_stream(tunnel, packet, now)
        address = tunnel.address(path)
        if sa is None or address is None:
            return False
        sealed = self._seal_one(sa, packet)
        if not sealed:  # None: held until the SA is renewed (False); DISCARDED: consumed as malformed (True)
            return sealed is not None
        if path in UDP_PATHS:
            self.wire.send_udp(MASQUERADE_MARKER + sealed, address)
        else:
            self.wire.send_esp(sealed, address[0])
        tunnel.last_sent = now
        tunnel.tx += 1
        self.counters["out_packets"] += 1
        return True

    def _seal_each(self, sa: OutboundSA, pieces: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        """Seal one by one, dropping (and counting) what is no IP packet: (sealed, held for the next SA)."""
        sealed: list[bytes] = []
        for index, piece in enumerate(pieces):
            try:
                sealed.append(sa.seal(piece))
            except RekeyRequired:
                return sealed, pieces[index:]
            except EspParseError:
                self.counters["out_malformed"] += 1
        return sealed, []

    def _seal_one(self, sa: OutboundSA, packet: bytes) -> bytes | None:
        """One packet sealed; None when the SA is spent (hold it), DISCARDED when it is no IP packet."""
        try:
            return sa.seal(packet)
        except RekeyRequired:
            self.counters["out_rekey_wait"] += 1
            return None
        except EspParseError:
            self.counters["out_malformed"] += 1
            return DISCARDED

    def _send_stream(self, tunnel: Tunnel, packet: bytes, now: float) -> bool:
        """TCP/443 or relay: seal as on every path, hand to the stream; False holds the packet for later."""
        sa, paths, path = tunnel.outbound, self.tcp, tunnel.path
        if sa is None:
            return False
        if paths is None:
            self.counters["out_path_unavailable"] += 1  # no TcpPaths (a data plane built without one): held
            return False
        if not paths.can_send(tunnel.peer):
            self.counters[f"out_{path}_waiting"] += 1  # stream still connecting / relay not authenticated: held
            return False
        sealed = self._seal_one(sa, packet)
        if not sealed:  # None: held until the SA is renewed (False); DISCARDED: consumed as malformed (True)
            return sealed is not None
        if paths.send(tunnel.peer, sealed):
            tunnel.last_sent = now
            tunnel.tx += 1
            self.counters[f"out_{path}"] += 1
            self.counters["out_packets"] += 1
        else:
            self.counters[f"out_{path}_dropped"] += 1  # the stream's send buffer is full: dropped, TCP resends
        return True

    def _unreachable(self, packet: bytes, version: int) -> bytes | None:
        """ICMP host unreachable from this node's own address: the sender's, else its first IPv4 one."""
        if version != 4 or len(packet) < 20:
            return None
        own = [a for a in self.peers.local_address.values() if a < 1 << 32]
        sender = int.from_bytes(packet[12:16], "big")
        source = sender if sender in own else (own[0] if own else None)
        return None if source is None else icmp_error(packet, source, ICMP_CODE_HOST_UNREACHABLE)

    def flush_queues(self, now: float) -> list[bytes]:
        """Send held packets whose peer became ready; answer those held too long with ICMP unreachable."""
        answers = []
        for tunnel in list(self.tunnels.values()):
            while tunnel.queue:
                held_since, packet = tunnel.queue[0]
                if self._send(tunnel, packet, now):
                    tunnel.queue.popleft()
                    self.counters["out_queue_sent"] += 1
                elif now - held_since > QUEUE_WAIT:
                    tunnel.queue.popleft()
                    self.counters["out_queue_expired"] += 1
                    answer = self._unreachable(packet, packet[0] >> 4)
                    if answer is not None:
                        answers.append(answer)
                else:
                    break
        self._holding = any(t.queue for t in list(self.tunnels.values()))
        return answers

    # ------------------------------------------------------------------ inbound
    #
    # A read hands over a batch; GRO makes it runs of one sender and one SA back to back. The
    # inbound stages go run by run: SPI lookup, the source's rate limit, endpoint learning and the
    # clock once per run (_open_run), ESP in one open_many, and the admission decisions (cryptokey
    # routing, VPN isolation, ACL) once per flow in the run (_admit): the next segment of a TCP
    # stream has the same summary and passes without deciding again.

    def inbound_udp(self, datagrams: list[tuple[Buffer, tuple[str, int]]]) -> list[Buffer]:
        """Datagrams from the UDP port: ESP in runs of one source and one SPI, the rest counted or answered.

        Masqueraded ESP, all of bulk traffic, is recognised by one unpack of marker and SPI; anything
        else goes through the demultiplexer (transport.classify_udp), which says the same for it.
        """
        delivered: list[Buffer] = []
        run: list[Buffer] = []
        run_source: tuple[str, int] | None = None
        run_spi = -1
        for datagram, source in datagrams:
            if len(datagram) >= _MASQUERADED_MIN and (head := _MARKER_SPI.unpack_from(datagram))[0] == _MASQUERADE_WORD:
                spi = head[1]
                esp = datagram[_MARKER_SIZE:]  # a view of a view, or a copy of bytes: cheaper than a new memoryview
            else:
                kind, start = classify_udp(datagram)
                if kind is not _ESP:
                    probe = self.nat_probe
                    if kind is Kind.CONTROL and probe is not None and probe.on_answer(bytes(datagram)):
                        self.counters["in_reflector"] += 1
                    else:
                        self.counters[f"in_{kind.value}"] += 1
                    continue
                spi = _SPI.unpack_from(datagram, start)[0]
                esp = datagram[start:]
            if (spi != run_spi or source != run_source) and run:
                self._open_run(run_spi, run, _Origin(run_source, True), delivered)  # type: ignore[arg-type]
                run = []
            run_source, run_spi = source, spi
            run.append(esp)
        if run:
            self._open_run(run_spi, run, _Origin(run_source, True), delivered)  # type: ignore[arg-type]
        return delivered

    def inbound_esp(self, packets: list[tuple[bytes, tuple[str, int]]]) -> list[Buffer]:
        delivered: list[Buffer] = []
        run: list[Buffer] = []
        run_source: tuple[str, int] | None = None
        for packet, source in packets:
            esp = strip_ipv4_header(packet)
            if esp is None:
                self.counters["in_truncated"] += 1
                continue
            if source != run_source and run:
                self._open_runs(run, _Origin(run_source, False), delivered)  # type: ignore[arg-type]
                run = []
            run_source = source
            run.append(esp)
        if run:
            self._open_runs(run, _Origin(run_source, False), delivered)  # type: ignore[arg-type]
        return delivered

    def inbound_stream(self, frames: list[tuple[bytes, int]]) -> list[Buffer]:
        """ESP that came over a TLS stream (tcp443 or relay), each with its stream id: once a packet has
        authenticated, the peer is answered on that stream (``TcpPaths.bind``). The stream stands for the
        source address (``stream:ID``): forged tags on one stream get that stream limited, not the others."""
        delivered: list[Buffer] = []
        paths = self.tcp
        for esp, stream_id in frames:
            bind = None if paths is None else (lambda peer, sid=stream_id: paths.bind(sid, peer))
            self._open_runs([memoryview(esp)], _Origin((f"stream:{stream_id}", 0), False, bind), delivered)
        self.counters["in_stream_packets"] += len(frames)
        return delivered

    def _open_runs(self, packets: list[Buffer], origin: _Origin, delivered: list[Buffer]) -> None:
        """Packets from one source, cut into runs of one SPI."""
        counters = self.counters
        run: list[Buffer] = []
        run_spi = -1
        for esp in packets:
            if len(esp) < ESP_MIN_PACKET_SIZE:
                counters[_IN_DROP[DropReason.TRUNCATED]] += 1
                continue
            spi = _SPI.unpack_from(esp)[0]
            if spi != run_spi and run:
                self._open_run(run_spi, run, origin, delivered)
                run = []
            run_spi = spi
            run.append(esp)
        if run:
            self._open_run(run_spi, run, origin, delivered)

    def _open_run(self, spi: int, packets: list[Buffer], origin: _Origin, delivered: list[Buffer]) -> None:
        counters = self.counters
        entry = self.spis.get(spi)
        if entry is None:
            counters[_IN_DROP[DropReason.UNKNOWN_SPI]] += len(packets)
            return
        sa, peer = entry
        tunnel = self.tunnels.get(peer)
        if tunnel is None:
            counters["in_unknown_peer"] += len(packets)
            return
        host = origin.source[0]
        if host != tunnel.known_host():
            # Not where this peer is known to be: the per-source limit (D16) applies packet by packet, so
            # a forger gets its burst of decryptions, not a whole batch of them.
            limiter = self.source_limiter
            for packet in packets:
                if limiter.allow(host, time.monotonic()):
                    self._authenticate_run(sa, tunnel, [packet], origin, delivered)
                else:
                    counters["in_rate_limited"] += 1  # this source forged too many tags: not worth a decryption
            return
        self._authenticate_run(sa, tunnel, packets, origin, delivered)

    def _authenticate_run(
        self, sa: InboundSA, tunnel: Tunnel, packets: list[Buffer], origin: _Origin, delivered: list[Buffer]
    ) -> None:
        counters = self.counters
        source, udp, on_authenticated = origin
        inners, drops = sa.open_many(packets)
        dummies = 0
        for reason in drops:
            if reason is DropReason.DUMMY:
                dummies += 1  # authenticated and recorded, but carries nothing: a liveness probe
                continue
            counters[_IN_DROP[reason]] += 1
            if reason is DropReason.AUTH_FAILED and source[0] != tunnel.known_host():
                self.source_limiter.failed(source[0], time.monotonic())
        if not inners and not dummies:
            return
        # Authenticated: only now may the packets teach us where the peer is (roaming, PAT).
        peer = tunnel.peer
        if udp and tunnel.learned != source:
            if tunnel.learned is not None:
                counters["endpoint_moved"] += 1
                log.info("peer %s now at %s:%d (was %s:%d)", peer, *source, *tunnel.learned)
            tunnel.learned = source
        elif on_authenticated is not None:
            on_authenticated(peer)  # a TLS stream (tcp443, relay): answer on it; its address teaches nothing
        elif not udp and tunnel.learned_host != source[0]:
            if tunnel.learned_host is not None:
                counters["endpoint_moved"] += 1
                log.info("peer %s now at %s (was %s)", peer, source[0], tunnel.learned_host)
            tunnel.learned_host = source[0]
        now = tunnel.last_received = time.monotonic()
        if dummies:
            counters["in_dummy"] += dummies
        if inners:
            tunnel.last_data = now
            tunnel.rx += len(inners)
            self._admit(peer, inners, delivered)

    def _admit(self, peer: str, inners: list[Buffer], delivered: list[Buffer]) -> None:
        """Authenticated inner packets from *peer* that this node takes, appended to *delivered*.

        The decisions depend only on the summary (and on flows, which do not change within a run), so a
        TCP/UDP packet with the summary of the last one admitted is admitted without deciding again.
        That packet is recognised without summarizing it: one unpack of the header bytes the summary
        is read from (``_flow_key``) equal to the admitted packet's. Its lengths need no second look:
        ESP's trailer check (esp.read_trailer) made each inner packet's IP length field its length.
        ICMP is decided every time: an error's admission depends on the flow it quotes.
        """
        counters = self.counters
        translation = self.native.get(peer)
        admitted: Summary | None = None
        key_of: Callable[[Buffer], tuple[Any, ...]] | None = None
        admitted_key: tuple[Any, ...] = ()
        count = 0
        for inner in inners:
            if translation is not None:
                inner = self._native_inbound(translation, peer, inner)  # type: ignore[assignment]
                if inner is None:
                    continue
            if key_of is not None:
                try:
                    if key_of(inner) == admitted_key:  # the admitted flow's next packet
                        delivered.append(inner)
                        count += 1
                        continue
                except struct.error:
                    pass  # shorter than the admitted packet's headers: summarize says what it is
            try:
                summary = summarize(inner)
            except PacketError:
                counters["in_malformed_inner"] += 1
                continue
            if summary != admitted:
                if not self._admits(peer, inner, summary):
                    continue
                if summary.proto in _PORTED:
                    admitted = summary
                    key_of, admitted_key = self._flow_key(inner, summary)
            delivered.append(inner)
            count += 1
        counters["in_packets"] += count

    @staticmethod
    def _flow_key(
        inner: Buffer, summary: Summary
    ) -> tuple[Callable[[Buffer], tuple[Any, ...]] | None, tuple[Any, ...]]:
        """The unpack of the bytes *summary* was read from, and their values in *inner* (None: too short).

        IPv4: version/IHL, fragment field, protocol, addresses, ports; IPv6: version/class byte, next
        header, addresses, ports. Equal bytes give an equal summary (stricter: the fragment flags and
        the traffic class's high bits count too, which only sends a packet through summarize).
        """
        shape = (summary.version, summary.header_length)
        unpack = _FLOW_KEYS.get(shape)
        if unpack is None:
            ipv4 = f"!B5xHxB2x8s{summary.header_length - 20}x4s"  # after the addresses: options, then ports
            layout = ipv4 if summary.version == 4 else "!B5xBx32s4s"
            unpack = _FLOW_KEYS[shape] = struct.Struct(layout).unpack_from
        try:
            return unpack, unpack(inner)
        except struct.error:
            return None, ()

    def _admits(self, peer: str, inner: memoryview, summary: Summary) -> bool:
        """Cryptokey routing, VPN isolation and the ACL for one inbound packet (each refusal counted)."""
        route = self.peers.sender_owns(peer, summary.version, summary.src)
        if route is None:
            self.counters["in_source_not_allowed"] += 1  # cryptokey routing: not this peer's address
            return False
        if not self.peers.accepts(route.vpn, summary.version, summary.dst):
            self.counters["in_vpn_isolation"] += 1
            return False
        policy = self.policy
        if policy.restricted(route.vpn):
            flows = self.flows
            if (
                not flows.known(flows.key_inbound(summary))
                and policy.allows_inbound(route.vpn, peer, summary) is None
                and not flows.known(quoted_flow_key(inner, summary))  # an ICMP error about our own flow
            ):
                self.counters["in_acl_denied"] += 1
                return False
        return True

    def _native_inbound(self, translation: Translation, peer: str, inner: memoryview) -> memoryview | None:
        """RNAT (nodeagent/rnat.py), then port overloading when the peer's address is shared; None: dropped."""
        packet = bytearray(inner)
        if translation.inbound(packet):
            self.counters["in_rnat"] += 1
        if peer in self.overloaded:
            try:
                summary = summarize(packet)
            except PacketError:
                self.counters["in_malformed_inner"] += 1
                return None
            if not self.portmap.inbound(peer, packet, summary, time.monotonic()):
                self.counters["in_portmap_full"] += 1
                return None
        return memoryview(packet)

    def keepalives(self, now: float) -> None:
        """Authenticated keepalives: dummy ESP packets (next header 59) that the peer opens and drops.

        Being authenticated, each one may teach the peer where this node is now (its PAT mapping, a
        new address), which an unauthenticated keepalive must not. Sent for three reasons, counted
        apart: ``out_keepalive`` every keepalive interval on UDP paths (holds the NAT mapping),
        ``out_introduce`` until a new peer first answers (see INTRODUCE_WINDOW), ``out_liveness``
        when a peer that sent data falls silent (see LIVENESS_QUIET). The data-plane thread runs this:
        only it seals (an SA's sequence counter is not shared).
        """
        for tunnel in list(self.tunnels.values()):
            path = tunnel.path
            sa = tunnel.outbound
            if sa is None or (path not in UDP_PATHS and path != "esp") or tunnel.punching(now):
                continue  # while punching, tick() sends the (low-TTL first) punches instead
            reason = None
            if path != "esp" and now - tunnel.last_sent >= self.keepalive:
                reason = "out_keepalive"
            elif now - tunnel.last_probe < LIVENESS_QUIET:
                continue
            elif path != "esp" and not tunnel.last_received and now - tunnel.keyed_at <= INTRODUCE_WINDOW:
                reason = "out_introduce"
            elif LIVENESS_QUIET <= now - tunnel.last_data <= LIVENESS_WINDOW and (
                now - tunnel.last_received >= LIVENESS_QUIET
            ):
                reason = "out_liveness"
            address = tunnel.address(path)
            if reason is None or address is None:
                continue
            try:
                sealed = sa.seal_dummy()
            except RekeyRequired:
                continue
            if path == "esp":
                self.wire.send_esp(sealed, address[0])
            else:
                self.wire.send_udp(MASQUERADE_MARKER + sealed, address)
            tunnel.last_probe = tunnel.last_sent = now
            self.counters[reason] += 1

    def introduce_streams(self, now: float) -> None:
        """Dummies over a new tcp443/relay path until the peer's stream is bound (``out_introduce_stream``).

        The end that is dialled learns which stream is the peer's only from an authenticated packet;
        a dummy once a second (for at most INTRODUCE_WINDOW seconds after the path was taken) gives it
        one before any data flows. The data-plane thread runs this: only it seals.
        """
        paths = self.tcp
        if paths is None:
            return
        for tunnel in list(self.tunnels.values()):
            sa = tunnel.outbound
            if sa is None or tunnel.path not in TCP_PATHS or now - tunnel.path_since > INTRODUCE_WINDOW:
                continue
            if now - tunnel.last_probe < 1.0 or paths.is_bound(tunnel.peer) or not paths.can_send(tunnel.peer):
                continue
            try:
                sealed = sa.seal_dummy()
            except RekeyRequired:
                continue
            if paths.send(tunnel.peer, sealed):
                tunnel.last_probe = tunnel.last_sent = now
                self.counters["out_introduce_stream"] += 1

    # ------------------------------------------------------------------ housekeeping
    def tick(self, now: float) -> None:
        """Hole punching and flow expiry (run every TICK_INTERVAL by the data-plane thread; seals nothing).

        Punches are unauthenticated one-byte keepalives: they may go out before the SAs exist, and
        they open NAT mappings without teaching the peer anything. Keepalives proper are
        authenticated and sealed by ``keepalives``.
        """
        for tunnel in list(self.tunnels.values()):
            if tunnel.path != "punch" or not tunnel.punching(now):
                continue
            address = tunnel.address(tunnel.path)
            if address is None or now - tunnel.last_sent < PUNCH_INTERVAL:
                continue
            low = now < tunnel.punch_until - PUNCH_SECONDS + PUNCH_LOW_TTL_SECONDS
            self.wire.send_udp(KEEPALIVE, address, ttl=PUNCH_LOW_TTL if low else None)
            tunnel.last_sent = now
            self.counters["out_punch"] += 1
        self.flows.sweep(now)
        if len(self.portmap):
            self.portmap.sweep(now)

    # ------------------------------------------------------------------ threads
    def start(self) -> None:
        if self.tun is None:
            raise RuntimeError("no TUN device")
        thread = threading.Thread(target=self._loop, name="dataplane", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        for thread in self._threads:
            thread.join(timeout=2.0)
        self._threads.clear()

    def close(self) -> None:
        self.stop()
        self.wire.close()
        if self.tun is not None:
            self.tun.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _loop(self) -> None:
        """Both directions and the periodic work in one thread: one wake-up per packet, not one per direction.

        A ping through two agents used to wake four cold threads (out at A, in at B, out at B, in at A).
        Here the responder's kernel queues its answer on the TUN while we write the request, so the same
        pass reads it back (``wrote``) and sends it without sleeping: three wake-ups per round trip. The
        packets go first in a pass and the housekeeping after, off the packet's path.
        Only this thread seals (an OutboundSA's counter is not shared: no IV reuse) and only it reads
        the sockets; the control loop changes state by replacing whole objects and wakes it (``_wake``).
        Busy-polling before blocking was measured and not kept: on two shared cores the spinning thread
        took the CPU the peer's agent needed, and round trips got longer (docs/performance.md).
        """
        tun = self.tun
        assert tun is not None
        tun_fd, wake = tun.fd, self._wake_r
        paths = self.tcp
        stream_fd = paths.fileno() if paths is not None else -1
        receivers: list[Any] = list(self.wire.sockets())
        if paths is not None:
            receivers.append(stream_fd)
        # One epoll set for the thread's life: select() built and tore down its wait on every descriptor at
        # each pass, a pass per packet when packets come one by one (pings, small datagrams).
        poller = select.epoll()
        sources: dict[int, Any] = {}  # descriptor -> what _receive reads (a socket, or the streams' queue)
        for source in (tun_fd, wake, *receivers):
            fd = source if isinstance(source, int) else source.fileno()
            poller.register(fd, select.EPOLLIN)
            sources[fd] = source
        next_tick = time.monotonic()
        try:
            while not self._stop.is_set():
                events = poller.poll(TICK_INTERVAL)
                wrote = tun_ready = False
                for fd, _ in events:
                    if fd == tun_fd:
                        tun_ready = True
                    elif fd == wake:
                        _drain(wake)
                    else:
                        wrote = self._receive(sources[fd], stream_fd) or wrote
                if self._holding:  # before the TUN's new packets, which must not overtake the held ones
                    tun.write_batch(self.flush_queues(time.monotonic()))
                if wrote or tun_ready:
                    packets = tun.read_batch(BATCH)
                    if packets and not tun_ready:
                        self.counters["tun_read_after_write"] += len(packets)  # answered without a wake-up
                    answers = self.outbound_batch(packets)
                    if answers:
                        tun.write_batch(answers)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK_INTERVAL
                    self.tick(now)
                    self.keepalives(now)
                    self.introduce_streams(now)
        finally:
            poller.close()

    def _receive(self, fd: Any, stream_fd: int) -> bool:
        """One read from a ready socket (UDP, raw ESP or the TLS streams' queue) through to the TUN;
        whether anything was written to the TUN."""
        tun = self.tun
        assert tun is not None
        if fd == stream_fd:
            delivered = self.inbound_stream(self.tcp.recv_batch(BATCH))  # type: ignore[union-attr]
        else:
            batch = self.wire.recv_batch(fd, BATCH)
            delivered = self.inbound_udp(batch) if fd is self.wire.udp else self.inbound_esp(batch)
        if not delivered:
            return False
        self.counters["tun_write_refused"] += tun.write_batch(delivered)
        return True

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        peers = {}
        for name, tunnel in sorted(self.tunnels.items()):
            address = tunnel.address(tunnel.path)
            peers[name] = {
                "path": tunnel.path,
                "endpoint": f"{address[0]}:{address[1]}" if address else None,
                "spi_out": f"{tunnel.outbound.spi:#010x}" if tunnel.outbound else None,
                "spis_in": sorted(f"{s:#010x}" for s in tunnel.inbound_spis),
                "tx_packets": tunnel.tx,
                "rx_packets": tunnel.rx,
                "queued": len(tunnel.queue),
                "peer_class": tunnel.peer_class,
                "inner_checksums": "partial" if tunnel.takes_partial else "complete",
            }
            if tunnel.path in TCP_PATHS:
                peers[name]["stream"] = self.tcp.peer_state(name) if self.tcp is not None else "no TCP paths"
        return {
            "tun": self.tun.name if self.tun else None,
            "mtu": self.mtu,
            "udp_port": self.wire.port,
            "path": self.forced_path or "auto",
            "caps": self.capabilities(),
            "peers": peers,
            "portmap": [
                {"peer": m.peer, "proto": m.proto, "original": m.original, "public": m.public}
                for m in self.portmap.mappings()
            ],
            "counters": dict(sorted(self.counters.items())),
            "rate_limited_sources": len(self.source_limiter),
            "batching": self._batching(),
            **({"tcp": self.tcp.status()} if self.tcp is not None else {}),
        }

    def _batching(self) -> dict[str, int]:
        """System calls against packets, both ways: how much the offloads save (docs/performance.md)."""
        wire, tun = self.wire, self.tun
        found = {
            "udp_sends": wire.udp_sends,
            "udp_datagrams_sent": wire.udp_datagrams_sent,
            "udp_reads": wire.udp_reads,
            "udp_datagrams_read": wire.udp_datagrams_read,
        }
        if tun is not None:
            found.update(
                tun_reads=tun.reads,
                tun_writes=tun.writes,
                tun_packets_written=tun.packets_written,
                tun_read_errors=tun.read_errors,
            )
        return found


def _same(packet: bytes) -> bytes:
    return packet


# What decides a TCP/UDP over IPv4 packet's summary when its header is 20 bytes: version and IHL, total length,
# fragment bits, protocol, addresses and ports.
_FLOW_V4 = struct.Struct("!BxHHxB2x12s")


def _flow_bytes(packet: bytes, summary: Summary) -> tuple[Any, ...] | None:
    """The fields of *packet* that fix its summary, for ``outbound_batch`` to recognise the next packet of a flow.

    Equal fields (and an equal length) give an equal summary: one unpack instead of ``summarize``.
    Only for TCP/UDP over IPv4 with a 20-byte header and at least 24 bytes (where the ports are); None
    otherwise (an ICMP summary also holds the echo identifier, which lies beyond these bytes).
    """
    if summary.version != 4 or summary.header_length != 20 or summary.proto not in _PORTED or len(packet) < 24:
        return None
    return _FLOW_V4.unpack_from(packet)


def _is_syn(packet: bytes, header_length: int) -> bool:
    """Only a SYN carries the MSS option: other TCP packets skip the clamp and its copy."""
    return len(packet) <= header_length + 13 or bool(packet[header_length + 13] & TCP_FLAG_SYN)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _pick_endpoint(endpoints: list[str]) -> tuple[str | None, int | None]:
    """The first IPv4 host:port a peer reported (issue 6 replaces this with the server's path choice)."""
    for text in endpoints:
        host, _, port = text.rpartition(":")
        try:
            if ipaddress.ip_address(host).version == 4:
                return host, int(port)
        except ValueError:
            continue
    return None, None


def _local_ipv4_addresses(skip: str | None) -> list[str]:
    from pyroute2 import IPRoute

    addresses = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for message in ipr.get_addr(family=2):
            name = names.get(message["index"])
            address = message.get_attr("IFA_ADDRESS")
            if name in ("lo", skip) or address is None or address.startswith("127."):
                continue
            addresses.append(address)
    return addresses
