"""Messages of the auth service: enrollment with a one-time join secret."""

from __future__ import annotations

import base64

import msgpack
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from bus.messages import Message, register


@register
class Enroll(Message):
    """Anonymous -> auth: trade a join secret for membership of the key registry.

    The caller's CURVE key (its connection's key) becomes the node's key; the
    secret is then spent. Reply: Enrolled. Errors: ``refused`` (unknown,
    used or expired secret; the message says which).
    """

    KIND = "auth.enroll"
    secret: str = Field(min_length=16, max_length=128)
    sign_key: str = Field(default="", max_length=64)  # the node's Ed25519 identity key (hex)
    agent_version: str = ""


@register
class Enrolled(Message):
    """Reply to Enroll: who the node is now, and the key the server signs views with."""

    KIND = "auth.enrolled"
    node: str
    server_sign_key: str


JOIN_PREFIX = "coterie1:"


class JoinString(BaseModel):
    """What a node needs to enroll, as one line: server endpoints, server keys, a one-time secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: list[str] = Field(min_length=1)
    server_key: str = Field(min_length=40, max_length=40)  # CURVE, Z85
    sign_key: str = Field(min_length=64, max_length=64)  # Ed25519, hex
    secret: str = Field(min_length=16, max_length=128)

    def encode(self) -> str:
        packed = msgpack.packb([self.endpoints, self.server_key, self.sign_key, self.secret])
        return JOIN_PREFIX + base64.urlsafe_b64encode(packed).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JoinString:
        """Parse a join string; ValueError says what is wrong with it."""
        text = text.strip()
        if not text.startswith(JOIN_PREFIX):
            raise ValueError(f"a join string starts with {JOIN_PREFIX!r}")
        body = text[len(JOIN_PREFIX) :]
        try:
            fields = msgpack.unpackb(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            endpoints, server_key, sign_key, secret = fields
            return cls(endpoints=endpoints, server_key=server_key, sign_key=sign_key, secret=secret)
        except (ValueError, TypeError, msgpack.UnpackException, pydantic.ValidationError) as exc:
            raise ValueError(f"the join string is damaged (copy it again whole): {type(exc).__name__}") from None
