"""Small builders of NodeView parts for data plane unit tests: one line per VPN, peer or rule."""

from __future__ import annotations

import ipaddress

from bus.messages.sync import AclView, NodeView, PeerView, RouteView, VpnView


def vpn(name: str, vip: str, *, subnet: str | None = None, routes: tuple[str, ...] = (), mtu: int = 1400) -> VpnView:
    """This node's membership of VPN *name* at *vip*; gateway role when it routes subnets."""
    if subnet is None:
        subnet = str(ipaddress.ip_network(f"{vip}/{24 if ':' not in vip else 64}", strict=False))
    return VpnView(
        name=name,
        subnet=subnet,
        addressing="static",
        topology="mesh",
        cipher="aes-256-gcm",
        mtu=mtu,
        keepalive=25,
        vip=vip,
        role="gateway" if routes else "member",
        routes=list(routes),
    )


def peer(
    name: str,
    vips: dict[str, str],
    *,
    routes: tuple[tuple[str, str], ...] = (),
    endpoints: tuple[str, ...] = (),
    tags: tuple[str, ...] = (),
) -> PeerView:
    """Peer *name* with a VIP per VPN and (vpn, cidr) routes behind it."""
    return PeerView(
        name=name,
        vips=vips,
        roles={v: ("gateway" if any(r[0] == v for r in routes) else "member") for v in vips},
        routes=[RouteView(vpn=v, cidr=c) for v, c in routes],
        endpoints=list(endpoints),
        tags=list(tags),
    )


def rule(vpn: str, src: str, dst: str, proto: str = "any", ports: str = "", id: int = 1) -> AclView:
    return AclView(id=id, vpn=vpn, src=src, dst=dst, proto=proto, ports=ports)


def view(
    node: str,
    vpns: list[VpnView],
    peers: list[PeerView],
    acl: list[AclView] | None = None,
    tags: tuple[str, ...] = (),
) -> NodeView:
    return NodeView(
        node=node,
        vpns={v.name: v for v in vpns},
        peers={p.name: p for p in peers},
        acl=acl or [],
        tags=list(tags),
    )


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))
