"""A fixed ServerState for snapshot tests: no clocks, keys or ports, so screens render the same every run."""

from __future__ import annotations

from datetime import datetime

from bus.messages.datastore import EventInfo, MemberInfo, NodeInfo, VpnInfo
from bus.messages.sync import AclView
from tui.app.state import ServerState

T0 = datetime(2026, 1, 2, 3, 4, 5)


def _node(name: str, vips: dict[str, str], online: bool, nat: str = "nat", enrolled: bool = True) -> NodeInfo:
    return NodeInfo(
        name=name,
        enrolled=enrolled,
        online=online,
        vips=vips,
        roles={vpn: ("gateway" if name == "gw-berlin" else "member") for vpn in vips},
        tags=["staff"] if name.startswith("laptop") else [],
        nat_class=nat,
        endpoints=["192.0.2.10:4500"] if enrolled else [],
        public_endpoint="198.51.100.7:4500" if enrolled else None,
        agent_version="0.1.0" if enrolled else None,
        last_seen=T0 if enrolled else None,
    )


NODES = [
    _node("gw-berlin", {"office": "10.10.0.1", "lab": "10.20.0.1"}, True, "public"),
    _node("laptop-ann", {"office": "10.10.0.2"}, True, "pat"),
    _node("laptop-bob", {"office": "10.10.0.3"}, False, "nat"),
    _node("build-01", {"lab": "10.20.0.2"}, True, "firewalled"),
    _node("printer", {}, False, "unknown", enrolled=False),
]


def _members(vpn: str) -> list[MemberInfo]:
    return [
        MemberInfo(
            node=n.name,
            vip=n.vips[vpn],
            role=n.roles[vpn],
            online=n.online,
            routes=["192.168.1.0/24"] if n.name == "gw-berlin" and vpn == "office" else [],
        )
        for n in NODES
        if vpn in n.vips
    ]


EVENTS = [
    EventInfo(
        revision=1,
        at=T0,
        kind="vpn.create",
        summary="created VPN office (10.10.0.0/24)",
        actor="operator:admin",
        reached=0,
        applied=0,
    ),
    EventInfo(
        revision=2,
        at=T0,
        kind="vpn.create",
        summary="created VPN lab (10.20.0.0/24)",
        actor="operator:admin",
        reached=0,
        applied=0,
    ),
    EventInfo(
        revision=3,
        at=T0,
        kind="node.add",
        summary="added node gw-berlin to office, lab",
        actor="operator:admin",
        reached=0,
        applied=0,
    ),
    EventInfo(
        revision=4,
        at=T0,
        kind="node.online",
        summary="node gw-berlin is online",
        actor="service:fanout",
        reached=2,
        applied=2,
    ),
    EventInfo(
        revision=5,
        at=T0,
        kind="acl.add",
        summary="rule #1 in office: tag:staff -> gw-berlin tcp 22,443",
        actor="operator:admin",
        reached=3,
        applied=2,
        pending=["laptop-bob"],
        pending_since=T0,
    ),
    EventInfo(
        revision=6,
        at=T0,
        kind="node.offline",
        summary="node laptop-bob is offline (no heartbeat for 15s)",
        actor="service:fanout",
        reached=2,
        applied=2,
    ),
]

FIXED = ServerState(
    vpns=[
        VpnInfo(name="office", subnet="10.10.0.0/24", addressing="overlay", topology="mesh", members=3, online=2),
        VpnInfo(name="lab", subnet="10.20.0.0/24", addressing="native", topology="hub-spoke", members=2, online=2),
    ],
    nodes=NODES,
    members={"office": _members("office"), "lab": _members("lab")},
    acl=[
        AclView(id=1, vpn="office", src="tag:staff", dst="gw-berlin", proto="tcp", ports="22,443"),
        AclView(id=2, vpn="office", src="any", dst="any", proto="icmp", ports=""),
        AclView(id=3, vpn="lab", src="build-01", dst="gw-berlin", proto="udp", ports="53"),
    ],
    events=EVENTS,
    head=6,
)

JOIN = "coterie-join:1:" + "x" * 180  # the shape of a join string, nothing secret
