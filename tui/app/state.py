"""What the dashboard shows: one consistent read of the server's state, as plain data.

The state is re-read whole after changes rather than patched from notices:
a read costs a few requests, bursts are coalesced by the link, and a re-read
can never drift from the server the way a locally patched copy can.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bus import errors
from bus.client import Client
from bus.errors import BusError, RemoteError
from bus.messages.datastore import (
    AclList,
    AclListRequest,
    EventInfo,
    Events,
    EventsRequest,
    MemberInfo,
    NodeInfo,
    NodeList,
    NodeListRequest,
    VpnDetail,
    VpnInfo,
    VpnList,
    VpnListRequest,
    VpnShowRequest,
)
from bus.messages.sync import AclView

EVENT_HISTORY = 200  # change-log rows the event pane holds


@dataclass(frozen=True)
class ServerState:
    vpns: list[VpnInfo] = field(default_factory=list)
    nodes: list[NodeInfo] = field(default_factory=list)
    members: dict[str, list[MemberInfo]] = field(default_factory=dict)  # vpn name -> members
    acl: list[AclView] = field(default_factory=list)
    events: list[EventInfo] = field(default_factory=list)  # oldest first
    head: int = 0

    def node(self, name: str) -> NodeInfo | None:
        return next((n for n in self.nodes if n.name == name), None)

    def peers_of(self, name: str) -> list[tuple[str, MemberInfo]]:
        """(vpn, member) for every other member of every VPN *name* belongs to."""
        node = self.node(name)
        if node is None:
            return []
        return [(vpn, m) for vpn in node.vips for m in self.members.get(vpn, []) if m.node != name]

    def events_about(self, name: str) -> list[EventInfo]:
        """The change-log rows that name this node (summaries say `node NAME ...`)."""
        return [e for e in self.events if f"node {name}" in e.summary or f" {name} " in f" {e.summary} "]


def load_state(client: Client, timeout: float = 3.0) -> ServerState:
    """Read everything the dashboard shows; raises BusError when the server does not answer."""
    # The head first: everything read after it is at least that new, so a change committed meanwhile
    # has a later revision and its notice makes the link read again. Read last, the head could claim
    # a change the lists below predate, and that change's notice would then be ignored as old.
    head = client.request("datastore", EventsRequest(since=0, limit=1), expect=Events, timeout=timeout)
    vpns = client.request("datastore", VpnListRequest(), expect=VpnList, timeout=timeout)
    nodes = client.request("datastore", NodeListRequest(), expect=NodeList, timeout=timeout)
    acl = client.request("datastore", AclListRequest(), expect=AclList, timeout=timeout)
    assert isinstance(vpns, VpnList) and isinstance(nodes, NodeList)
    assert isinstance(acl, AclList) and isinstance(head, Events)
    since = max(0, head.head - EVENT_HISTORY)
    events = client.request("datastore", EventsRequest(since=since, limit=EVENT_HISTORY), expect=Events)
    assert isinstance(events, Events)
    details = client.request_many([("datastore", VpnShowRequest(name=v.name)) for v in vpns.vpns], timeout=timeout)
    members: dict[str, list[MemberInfo]] = {}
    for vpn, detail in zip(vpns.vpns, details, strict=True):
        if isinstance(detail, VpnDetail):
            members[vpn.name] = detail.members
        elif isinstance(detail, BusError) and not (isinstance(detail, RemoteError) and detail.code == errors.NOT_FOUND):
            raise detail  # a VPN deleted meanwhile is fine; a silent server is not
    return ServerState(vpns.vpns, nodes.nodes, members, acl.rules, events.events, head.head)
