"""bus.codec.peek_kind: the broker's routing by kind reads the same kind the decoder would."""

from __future__ import annotations

import msgpack
import pytest

from bus import codec
from bus.messages import REGISTRY
from bus.messages.common import Ping
from bus.messages.sync import Applied, SyncHeartbeat


@pytest.mark.parametrize("message", [SyncHeartbeat(revision=3, digest="ab"), Applied(revision=1, digest=""), Ping()])
def test_peek_gives_the_encoded_kind(message) -> None:  # type: ignore[no-untyped-def]
    assert codec.peek_kind(codec.encode(message)) == message.KIND


def test_every_registered_kind_survives_a_peek_including_long_ones() -> None:
    for kind in [*REGISTRY, "k" * 40]:  # longer than 31 bytes: MessagePack's str8
        assert codec.peek_kind(msgpack.packb([kind, 1, {}])) == kind


@pytest.mark.parametrize(
    "body", [b"", b"\x93", b"\x92\xa1a", msgpack.packb({"kind": "x"}), b"\x93\xa5ab", b"\x93\xa2\xff\xfe", b"\x93\x01"]
)
def test_garbage_has_no_kind(body: bytes) -> None:
    assert codec.peek_kind(body) is None
