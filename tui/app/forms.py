"""The TUI's forms as data: the fields each action asks for, and how their values become a request.

Validation is the server's own (services/datastore/validate.py, pure
functions), run as the operator types, so the inline message is the one the
server would give; the server still validates everything it receives, and
its answer to the submitted request is shown inline too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from bus.errors import RemoteError
from bus.messages import Message
from bus.messages.datastore import (
    AclAdd,
    MemberAdd,
    MemberRemove,
    NodeAdd,
    RouteAdd,
    RouteRemove,
    VpnCreate,
)
from services.datastore import validate


class FormError(ValueError):
    """A field's value is not acceptable; ``field`` names it (None: the form as a whole)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    placeholder: str = ""
    choices: tuple[str, ...] = ()  # a fixed list: shown as a selection, the first is the default


@dataclass(frozen=True)
class FormSpec:
    title: str
    fields: tuple[Field, ...]
    build: Callable[[dict[str, str]], Message]  # values -> request; raises FormError
    submit: str = "Save"


def _check(field: str, check: Callable[[str], object], value: str) -> None:
    try:
        check(value)
    except RemoteError as exc:
        raise FormError(field, exc.message) from None


def _required(values: dict[str, str], *names: str) -> None:
    for name in names:
        if not values.get(name, "").strip():
            raise FormError(name, f"{name} is required")


def _name(values: dict[str, str], field: str, what: str) -> str:
    _required(values, field)
    value = values[field].strip()
    _check(field, lambda v: validate.name(v, what), value)
    return value


def _words(text: str) -> list[str]:
    return [w for w in text.replace(",", " ").split() if w]


def _message(factory: Callable[..., Message], **fields: object) -> Message:
    try:
        return factory(idempotency_key=uuid.uuid4().hex, **fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise FormError(str(first["loc"][0]) if first["loc"] else None, first["msg"]) from None


def build_vpn_create(v: dict[str, str]) -> Message:
    name = _name(v, "name", "VPN")
    _required(v, "subnet")
    _check("subnet", validate.subnet, v["subnet"].strip())
    return _message(
        VpnCreate, name=name, subnet=v["subnet"].strip(), addressing=v["addressing"], topology=v["topology"]
    )


def build_node_add(v: dict[str, str]) -> Message:
    name = _name(v, "name", "node")
    vpns, tags = _words(v.get("vpns", "")), _words(v.get("tags", ""))
    for vpn in vpns:
        _check("vpns", lambda x: validate.name(x, "VPN"), vpn)
    for tag in tags:
        _check("tags", lambda x: validate.name(x, "tag"), tag)
    return _message(NodeAdd, name=name, vpns=vpns, tags=tags)


def build_member(v: dict[str, str], remove: bool = False) -> Message:
    node, vpn = _name(v, "node", "node"), _name(v, "vpn", "VPN")
    if remove:
        return _message(MemberRemove, node=node, vpn=vpn)
    return _message(MemberAdd, node=node, vpn=vpn, role=v["role"])


def build_route(v: dict[str, str], remove: bool = False) -> Message:
    node, vpn = _name(v, "node", "node"), _name(v, "vpn", "VPN")
    _required(v, "cidr")
    cidr = v["cidr"].strip()
    _check("cidr", validate.cidr, cidr)
    return _message(RouteRemove if remove else RouteAdd, node=node, vpn=vpn, cidr=cidr)


def build_rule(v: dict[str, str]) -> Message:
    vpn = _name(v, "vpn", "VPN")
    _required(v, "src", "dst")
    src, dst, proto, ports = v["src"].strip(), v["dst"].strip(), v["proto"], v.get("ports", "").strip()
    _check("src", validate.selector, src)
    _check("dst", validate.selector, dst)
    _check("ports", validate.ports, ports)
    if ports and proto not in ("tcp", "udp"):
        raise FormError("ports", "ports apply to tcp or udp only: choose one, or leave ports empty")
    return _message(AclAdd, vpn=vpn, src=src, dst=dst, proto=proto, ports=ports)


NODE, VPN = Field("node", "Node", "a node name"), Field("vpn", "VPN", "a VPN name")
ROLE = Field("role", "Role", choices=("member", "gateway", "hub"))

VPN_CREATE = FormSpec(
    "Create VPN",
    (
        Field("name", "Name", "e.g. office"),
        Field("subnet", "Subnet", "e.g. 10.10.0.0/24"),
        Field("addressing", "Addressing", choices=("overlay", "native")),
        Field("topology", "Topology", choices=("mesh", "hub-spoke")),
    ),
    build_vpn_create,
    "Create",
)
NODE_ADD = FormSpec(
    "Add node",
    (
        Field("name", "Name", "e.g. laptop-ann"),
        Field("vpns", "VPNs", "VPN names, comma-separated (optional)"),
        Field("tags", "Tags", "tags for ACL rules, comma-separated (optional)"),
    ),
    build_node_add,
    "Add",
)
MEMBER_ADD = FormSpec("Add membership", (NODE, VPN, ROLE), build_member, "Add")
MEMBER_REMOVE = FormSpec("Remove membership", (NODE, VPN), lambda v: build_member(v, remove=True), "Remove")
ROUTE_FIELDS = (NODE, VPN, Field("cidr", "Subnet", "behind the gateway, e.g. 192.168.1.0/24"))
ROUTE_ADD = FormSpec("Add gateway route", ROUTE_FIELDS, build_route, "Add")
ROUTE_REMOVE = FormSpec("Remove gateway route", ROUTE_FIELDS, lambda v: build_route(v, remove=True), "Remove")
RULE_ADD = FormSpec(
    "Add ACL rule",
    (
        VPN,
        Field("src", "From", "any, a node name, or tag:TAG"),
        Field("dst", "To", "any, a node name, or tag:TAG"),
        Field("proto", "Protocol", choices=("any", "tcp", "udp", "icmp")),
        Field("ports", "Ports", "tcp/udp only, e.g. 22,80,8000-8100"),
    ),
    build_rule,
    "Add",
)
