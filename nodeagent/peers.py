"""Which peer a packet belongs to: longest-prefix match over virtual IPs and gateway routes.

One table serves both directions (cryptokey routing, as WireGuard calls it):
outbound, the destination selects the peer and the VPN; inbound, the inner
source must select the very peer whose SA opened the packet, so a peer can
only speak for its own addresses, and a more specific prefix owned by
another peer wins over a wider one (RELIABILITY.md D7).

A node in several VPNs has one address per VPN; the table also keeps, per
VPN, which destinations this node accepts (its own address there and the
subnets it is the gateway for), which is what keeps one VPN's traffic from
being forwarded into another.

Native addressing: a peer's address is its real one as this node reaches
it, so two peers behind one PAT share an address. Such an address is kept
with every peer that has it (``shared``): any of them may send from it,
and outbound the PAT-ambiguity map (nodeagent/patmap.py) picks the peer.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field

from bus.messages.sync import NodeView

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Route:
    peer: str
    vpn: str
    prefix_length: int


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


@dataclass
class _Prefixes:
    """Prefixes of one address family, by length, longest first, for the dict-per-length lookup."""

    bits: int
    by_length: dict[int, dict[int, Route]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)

    def add(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network, route: Route) -> bool:
        table = self.by_length.setdefault(network.prefixlen, {})
        key = int(network.network_address) >> (self.bits - network.prefixlen)
        if key in table and table[key] != route:
            return False
        table[key] = route
        self.order = sorted(self.by_length, reverse=True)
        return True

    def lookup(self, address: int) -> Route | None:
        for length in self.order:
            route = self.by_length[length].get(address >> (self.bits - length))
            if route is not None:
                return route
        return None


class PeerTable:
    """Built from one NodeView; immutable afterwards, so the pipeline threads can share it without locks."""

    def __init__(self, view: NodeView, *, exit_node: str | None = None) -> None:
        self.node = view.node
        self._v4 = _Prefixes(32)
        self._v6 = _Prefixes(128)
        self.conflicts: list[str] = []
        # VPN -> this node's address there, and the subnets this node routes there (gateway role).
        self.local_address: dict[str, int] = {}
        self._accepts: dict[str, list[tuple[int, int, int, int]]] = {}  # VPN -> (version, network, mask, length)
        self.exit_node = exit_node
        # (version, address) -> peer -> route: native addresses several peers share (behind one PAT)
        self.shared: dict[tuple[int, int], dict[str, Route]] = {}
        native = {name for name, vpn in view.vpns.items() if vpn.addressing == "native"}
        for name, vpn in view.vpns.items():
            if not vpn.vip:
                continue  # native, and this node has not reported its address yet
            self.local_address[name] = int(ipaddress.ip_address(vpn.vip))
            networks = [_network(vpn.vip)] + [_network(cidr) for cidr in vpn.routes]
            self._accepts[name] = [(n.version, int(n.network_address), int(n.netmask), n.prefixlen) for n in networks]
        for peer in view.peers.values():
            for vpn, vip in peer.vips.items():
                route = Route(peer.name, vpn, 32 if ":" not in vip else 128)
                self._add(_network(vip), route, shareable=vpn in native)
            for route in peer.routes:
                network = _network(route.cidr)
                if network.prefixlen == 0 and peer.name != exit_node:
                    # A default route not chosen is not a route at all: kept, the first of several exit
                    # nodes would shadow the chosen one, and an unchosen one could speak for any source.
                    continue
                self._add(network, Route(peer.name, route.vpn, network.prefixlen))

    def _add(
        self, network: ipaddress.IPv4Network | ipaddress.IPv6Network, route: Route, shareable: bool = False
    ) -> None:
        table = self._v4 if network.version == 4 else self._v6
        if not table.add(network, route):
            key = (network.version, int(network.network_address))
            first = table.lookup(key[1])
            if shareable and first is not None and first.prefix_length == route.prefix_length:
                self.shared.setdefault(key, {first.peer: first})[route.peer] = route
                return
            self.conflicts.append(f"{network} claimed by {route.peer} in {route.vpn} and by another peer")
            log.warning("route conflict: %s", self.conflicts[-1])

    def lookup(self, version: int, address: int) -> Route | None:
        return (self._v4 if version == 4 else self._v6).lookup(address)

    def outbound(self, version: int, destination: int) -> Route | None:
        """The peer for a destination; a default route counts only through the chosen exit node."""
        route = self.lookup(version, destination)
        if route is not None and route.prefix_length == 0 and route.peer != self.exit_node:
            return None
        return route

    def sender_owns(self, peer: str, version: int, source: int) -> Route | None:
        """The route by which *peer* may send from *source*, or None (cryptokey routing, inbound)."""
        route = self.lookup(version, source)
        if route is not None and route.peer != peer and self.shared:
            route = self.shared.get((version, source), {}).get(peer)
        return route if route is not None and route.peer == peer else None

    def accepts(self, vpn: str, version: int, destination: int) -> bool:
        """Whether this node takes a packet for *destination* from VPN *vpn*: no VPN-to-VPN forwarding."""
        best = -1
        for v, net, mask, length in self._accepts.get(vpn, ()):
            if v == version and destination & mask == net:
                if length == (32 if version == 4 else 128):
                    return True  # this node's own address there (or a host route): the common case, no lookup
                best = max(best, length)
        return best >= 0 and not self._elsewhere(vpn, version, destination, best)

    def _elsewhere(self, vpn: str, version: int, address: int, than: int) -> bool:
        """Whether an address of a subnet this node routes into *vpn* is more specifically another VPN's.

        A gateway whose routes cover another VPN (an exit node's 0.0.0.0/0 in two VPNs) would otherwise
        take a packet from one VPN for a member of the other, and the kernel would forward it there.
        """
        for other, entries in self._accepts.items():
            own_version, own, _, _ = entries[0]
            if other != vpn and own_version == version and own == address:
                return True
        route = self.lookup(version, address)
        return route is not None and route.vpn != vpn and route.prefix_length > than

    def may_send_from(self, vpn: str, version: int, source: int) -> bool:
        """Whether *source* may enter VPN *vpn* through this node: its own address or a subnet it routes."""
        return self.accepts(vpn, version, source)
