"""Operator requests to the datastore service, and its replies.

Every mutating request carries ``dry_run`` (commit nothing; reply with the
nodes the change would reach and the diff of each view) and an optional
``idempotency_key`` (a retried request is applied once; the retry gets the
first result). Every mutation answers Mutated. Errors: ``invalid`` (a bad
name, subnet, CIDR, port list...), ``not_found``, ``conflict``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from bus.messages import Message, register
from bus.messages.sync import AclView, ViewDelta

Addressing = Literal["overlay", "native"]
Topology = Literal["mesh", "hub-spoke"]
MemberRole = Literal["member", "gateway", "hub"]
Protocol = Literal["any", "tcp", "udp", "icmp"]


class _Mutation(Message):
    dry_run: bool = False
    idempotency_key: str | None = Field(default=None, max_length=64)


@register
class VpnCreate(_Mutation):
    KIND = "vpn.create"
    name: str
    subnet: str
    addressing: Addressing = "overlay"
    topology: Topology = "mesh"


@register
class VpnSet(_Mutation):
    """Change a VPN's tunnel settings; every member's view carries them (None: leave as is)."""

    KIND = "vpn.set"
    name: str
    keepalive: int | None = Field(default=None, ge=1, le=3600)  # seconds between keepalives on UDP paths
    mtu: int | None = Field(default=None, ge=1280, le=9000)  # the inner MTU (IPv6's minimum up)


@register
class VpnDelete(_Mutation):
    KIND = "vpn.delete"
    name: str


@register
class NodeAdd(_Mutation):
    """Create a node in the given VPNs; the reply's ``join`` is its one-time join string."""

    KIND = "node.add"
    name: str
    vpns: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    expires_hours: float = Field(default=24.0, gt=0, le=24 * 365)


@register
class NodeRemove(_Mutation):
    KIND = "node.remove"
    name: str


@register
class NodeRename(_Mutation):
    KIND = "node.rename"
    name: str
    new_name: str


@register
class NodeSet(_Mutation):
    """Pin a node's path for every pair it is in (services/datastore/paths.py); path "auto" removes the pin."""

    KIND = "node.set"
    name: str
    path: Literal["auto", "esp", "udp", "tcp443", "relay"]


@register
class MemberAdd(_Mutation):
    KIND = "member.add"
    node: str
    vpn: str
    role: MemberRole = "member"


@register
class MemberRemove(_Mutation):
    KIND = "member.remove"
    node: str
    vpn: str


@register
class RouteAdd(_Mutation):
    KIND = "route.add"
    node: str
    vpn: str
    cidr: str


@register
class RouteRemove(_Mutation):
    KIND = "route.remove"
    node: str
    vpn: str
    cidr: str


@register
class AclAdd(_Mutation):
    """Allow traffic in ``vpn`` from ``src`` to ``dst`` (``any``, a node name or ``tag:TAG``)."""

    KIND = "acl.add"
    vpn: str
    src: str
    dst: str
    proto: Protocol = "any"
    ports: str = ""


@register
class AclRemove(_Mutation):
    KIND = "acl.remove"
    id: int


class NodeDiff(Message):
    """One node's view before and after a change, as a delta (in Mutated.preview)."""

    KIND = "datastore.node_diff"
    node: str
    delta: ViewDelta


@register
class Mutated(Message):
    """Reply to every mutation: the revision it committed (0 for a dry run) and what it reached."""

    KIND = "datastore.mutated"
    revision: int
    summary: str
    dry_run: bool = False
    replayed: bool = False  # the idempotency key had been seen: nothing new was applied
    reached: list[str] = Field(default_factory=list)  # dry runs: the nodes whose view would change
    preview: list[NodeDiff] = Field(default_factory=list)  # dry runs: each one's view diff
    join: str | None = None  # node.add only


@register
class VpnListRequest(Message):
    KIND = "vpn.list"


class VpnInfo(Message):
    KIND = "datastore.vpn_info"
    name: str
    subnet: str
    addressing: str
    topology: str
    members: int
    online: int
    keepalive: int = 25
    mtu: int = 1400


class MemberInfo(Message):
    KIND = "datastore.member_info"
    node: str
    vip: str
    role: str
    online: bool
    routes: list[str] = Field(default_factory=list)


@register
class VpnList(Message):
    KIND = "vpn.list_reply"
    vpns: list[VpnInfo]


@register
class VpnShowRequest(Message):
    KIND = "vpn.show"
    name: str


@register
class VpnDetail(Message):
    KIND = "vpn.detail"
    vpn: VpnInfo
    members: list[MemberInfo]
    acl: list[AclView]


class NodeInfo(Message):
    KIND = "datastore.node_info"
    name: str
    enrolled: bool
    online: bool
    vips: dict[str, str]  # vpn -> virtual IP
    roles: dict[str, str]
    tags: list[str]
    nat_class: str
    path_pin: str | None = None
    endpoints: list[str]
    public_endpoint: str | None
    agent_version: str | None
    last_seen: datetime | None
    caps: list[str] = Field(default_factory=list)  # data-plane capabilities its agent reported (gso, csum)


@register
class NodeListRequest(Message):
    KIND = "node.list"


@register
class NodeList(Message):
    KIND = "node.list_reply"
    nodes: list[NodeInfo]


@register
class NodeShowRequest(Message):
    KIND = "node.show"
    name: str


@register
class NodeDetail(Message):
    KIND = "node.detail"
    node: NodeInfo


@register
class AclListRequest(Message):
    KIND = "acl.list"
    vpn: str | None = None


@register
class AclList(Message):
    KIND = "acl.list_reply"
    rules: list[AclView]


@register
class EventsRequest(Message):
    """The change log after ``since``, oldest first, with receipts."""

    KIND = "events.list"
    since: int = 0
    limit: int = Field(default=100, ge=1, le=1000)


class EventInfo(Message):
    KIND = "datastore.event"
    revision: int
    at: datetime
    kind: str
    summary: str
    actor: str
    reached: int  # nodes this change was pushed to
    applied: int  # of those, how many acknowledged it
    pending: list[str] = Field(default_factory=list)
    pending_since: datetime | None = None


@register
class Events(Message):
    KIND = "events.list_reply"
    events: list[EventInfo]
    head: int  # the newest revision in the log
