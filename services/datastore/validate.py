"""Validation of operator input: each failure names what was wrong, as an ``invalid`` error."""

from __future__ import annotations

import ipaddress
import re

from bus import errors
from bus.errors import RemoteError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
PORTS = re.compile(r"^\d{1,5}(-\d{1,5})?(,\d{1,5}(-\d{1,5})?)*$")
MIN_HOSTS = 2


def invalid(message: str) -> RemoteError:
    return RemoteError(errors.INVALID, message)


def name(value: str, what: str) -> str:
    if not NAME.match(value):
        raise invalid(
            f"{what} name {value!r} is invalid: use 1-63 letters, digits, '-', '_' or '.',"
            " starting with a letter or digit"
        )
    if value in ("any",) or value.startswith("tag:"):
        raise invalid(f"{what} name {value!r} is reserved")
    return value


def subnet(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise invalid(f"subnet {value!r} is invalid: {exc}") from None
    if network.num_addresses - (2 if network.version == 4 else 1) < MIN_HOSTS:
        raise invalid(f"subnet {value} is too small: it must hold at least {MIN_HOSTS} nodes")
    return network


def cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise invalid(f"route {value!r} is not a network in CIDR form: {exc}") from None


def ports(value: str) -> str:
    value = value.replace(" ", "")
    if value in ("", "any"):
        return ""
    if not PORTS.match(value):
        raise invalid(f"ports {value!r} are invalid: use a list like 22,80,8000-8100")
    for part in value.split(","):
        low, _, high = part.partition("-")
        lo, hi = int(low), int(high or low)
        if not (1 <= lo <= hi <= 65535):
            raise invalid(f"port range {part!r} is invalid: ports are 1-65535, low before high")
    return value


def selector(value: str) -> str:
    """An ACL endpoint: ``any``, ``tag:TAG`` or a node name."""
    if value == "any":
        return value
    if value.startswith("tag:"):
        name(value[4:], "tag")
        return value
    return name(value, "node")
