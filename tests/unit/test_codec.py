"""The message codec: round trips, and every kind of bad body refused with its code (C6)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import codec, errors
from bus.constants import MAX_BODY
from bus.errors import DecodeError
from bus.identity import Role
from bus.messages import REGISTRY
from bus.messages.common import Error, Health, Ping, Pong, WorkerReady


@pytest.mark.parametrize(
    "message",
    [
        Ping(payload=b"\x00\xffbinary"),
        Pong(payload=b"", service="auth"),
        Error(code=errors.FORBIDDEN, message="no"),
        Health(service="auth", version="1", pid=4, uptime=1.5, counters={"requests": 3}),
        WorkerReady(service="auth", allow=[Role.ANONYMOUS, Role.OPERATOR], version="1", pid=9),
    ],
)
def test_round_trip(message: object) -> None:
    assert codec.decode(codec.encode(message)) == message  # type: ignore[arg-type]


def _code(body: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        codec.decode(body)
    return info.value.code


def test_bad_bodies_get_their_codes() -> None:
    assert _code(b"") == errors.MALFORMED
    assert _code(b"\xc1garbage") == errors.MALFORMED
    assert _code(msgpack.packb({"kind": "ping"})) == errors.MALFORMED
    assert _code(msgpack.packb(["ping", 1])) == errors.MALFORMED
    assert _code(msgpack.packb(["nope", 1, {}])) == errors.UNKNOWN_KIND
    assert _code(msgpack.packb(["ping", 99, {}])) == errors.UNSUPPORTED_VERSION
    assert _code(msgpack.packb(["pong", 1, {"payload": b""}])) == errors.INVALID  # service missing
    assert _code(msgpack.packb(["ping", 1, {"payload": b"", "extra": 1}])) == errors.INVALID
    assert _code(b"\x00" * (MAX_BODY + 1)) == errors.TOO_LARGE


def test_invalid_message_names_the_field() -> None:
    with pytest.raises(DecodeError, match="service"):
        codec.decode(
            msgpack.packb(["worker.ready", 1, {"service": "Bad Name!", "allow": [], "version": "1", "pid": 1}])
        )


def test_expected_kind_is_enforced() -> None:
    with pytest.raises(DecodeError, match="expected pong"):
        codec.decode(codec.encode(Ping()), Pong)


def test_registry_holds_each_kind_once_per_version() -> None:
    for kind, versions in REGISTRY.items():
        for version, cls in versions.items():
            assert kind == cls.KIND and version == cls.VERSION


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_fuzzed_bytes_only_ever_raise_decode_error(data: bytes) -> None:
    try:
        codec.decode(data)
    except DecodeError as exc:
        assert exc.code in {errors.MALFORMED, errors.UNKNOWN_KIND, errors.UNSUPPORTED_VERSION, errors.INVALID}


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(REGISTRY)), st.integers(-2, 3), st.dictionaries(st.text(max_size=10), _values))
def test_well_formed_bodies_with_random_fields_are_validated(kind: str, version: int, fields: dict) -> None:
    body = msgpack.packb([kind, version, fields], use_bin_type=True)
    try:
        message = codec.decode(body)
    except DecodeError:
        return
    assert kind == message.KIND and version == message.VERSION
