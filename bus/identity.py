"""Who is on the other end of a bus connection.

The broker resolves every message's ZAP User-Id (the client's CURVE public
key) against the key registry on each message, not only at the handshake:
ZAP runs once per connection, so a per-message lookup is what makes a
revoked key lose its rights on a live connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Role(enum.StrEnum):
    OPERATOR = "operator"
    NODE = "node"
    SERVICE = "service"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: its role, its name and its CURVE public key (Z85)."""

    role: Role
    name: str
    key: str = ""
    #: The peer's IP address as the broker saw it (ZeroMQ's Peer-Address), for rate limits and
    #: the audit; not part of who the caller is, and empty where unknown.
    address: str = field(default="", compare=False)

    @property
    def caller(self) -> str:
        """``role:name``, for logs."""
        return f"{self.role}:{self.name}"

    @property
    def wire(self) -> str:
        """``role;key;name``, the form that travels to workers with each request.

        ';' is in neither the Z85 alphabet of keys nor the names we accept.
        """
        return f"{self.role};{self.key};{self.name}"

    @classmethod
    def from_wire(cls, text: str, address: str = "") -> Identity:
        role, key, name = text.split(";", 2)
        return cls(role=Role(role), name=name, key=key, address=address)

    @classmethod
    def anonymous(cls, key: str) -> Identity:
        return cls(role=Role.ANONYMOUS, name=key, key=key)
