"""Encoding of message bodies: MessagePack of ``[kind, version, fields]``.

MessagePack because it is compact (binary, no field-name repetition beyond
the map keys), fast (a C extension: a few microseconds per control message)
and carries bytes natively, which keys and ESP material need; JSON would
base64 them. Kind and version travel in the body itself so that a body is
self-describing wherever it is stored or relayed. Decoding never trusts the
bytes: sizes are bounded before unpacking, and the fields are validated by
the registered pydantic model.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, TypeVar

import msgpack
import pydantic

from bus import errors
from bus.constants import MAX_BODY
from bus.errors import DecodeError
from bus.messages import REGISTRY, Message

T = TypeVar("T", bound=Message)


def encode(message: Message) -> bytes:
    body = [message.KIND, message.VERSION, message.model_dump(mode="python")]
    return msgpack.packb(body, use_bin_type=True, default=_extended)


def _extended(value: object) -> object:
    """Types MessagePack lacks travel as text that pydantic parses back on receipt."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def decode(data: bytes, expect: type[T] | None = None) -> Message:
    """Decode and validate one body; raise DecodeError with a wire error code."""
    if len(data) > MAX_BODY:
        raise DecodeError(errors.TOO_LARGE, f"body of {len(data)} bytes exceeds {MAX_BODY}")
    kind, version, fields = _unpack(data)
    versions = REGISTRY.get(kind)
    if versions is None:
        raise DecodeError(errors.UNKNOWN_KIND, f"unknown message kind {kind!r}")
    cls = versions.get(version)
    if cls is None:
        known = ", ".join(str(v) for v in sorted(versions))
        raise DecodeError(errors.UNSUPPORTED_VERSION, f"{kind} v{version} is not supported (known: {known})")
    try:
        message = cls.model_validate(fields, strict=False)
    except pydantic.ValidationError as exc:
        raise DecodeError(errors.INVALID, _describe(kind, exc)) from None
    if expect is not None and not isinstance(message, expect):
        raise DecodeError(errors.INVALID, f"expected {expect.KIND}, got {kind}")
    return message


def peek_kind(data: bytes) -> str | None:
    """The kind of an encoded body, read from its first bytes without decoding it (None if it has none).

    The broker routes some kinds of a service's requests to their own workers (bus.broker lanes);
    unpacking the whole body for that would cost it more than routing does.
    """
    if len(data) < 2 or data[0] != 0x93:  # a fixarray of three: [kind, version, fields]
        return None
    tag = data[1]
    if 0xA0 <= tag <= 0xBF:  # fixstr
        start, length = 2, tag & 0x1F
    elif tag == 0xD9 and len(data) > 2:  # str8
        start, length = 3, data[2]
    else:
        return None
    raw = data[start : start + length]
    if len(raw) != length:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _unpack(data: bytes) -> tuple[str, int, dict[str, Any]]:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(errors.MALFORMED, f"not a MessagePack body: {type(exc).__name__} {exc}") from None
    if (
        not isinstance(body, list)
        or len(body) != 3
        or not isinstance(body[0], str)
        or not isinstance(body[1], int)
        or not isinstance(body[2], dict)
    ):
        raise DecodeError(errors.MALFORMED, "a body is [kind, version, fields]")
    return body[0], body[1], body[2]


def _describe(kind: str, exc: pydantic.ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(message)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid {kind}: {where}: {first['msg']}{more}"
