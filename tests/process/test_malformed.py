"""Malformed frames and messages (RELIABILITY C6): answered or dropped, counted, never fatal."""

from __future__ import annotations

import random
from collections.abc import Iterator

import msgpack
import pytest
import zmq

from bus import codec, errors
from bus import constants as c
from bus.messages.common import Error, Ping, Pong
from bus.sockets import curve_client_socket, new_context
from tests.conftest import BusHarness


@pytest.fixture
def raw(bus: BusHarness) -> Iterator[zmq.Socket]:
    """A CURVE connection as the operator, speaking raw frames."""
    context = new_context()
    sock = curve_client_socket(context, bus.operator, bus.server.public, bus.endpoint)
    yield sock
    sock.close(linger=0)
    context.term()


def _reply(sock: zmq.Socket, timeout_ms: int = 3000) -> list[bytes] | None:
    while sock.poll(timeout_ms, zmq.POLLIN):
        frames = sock.recv_multipart()
        if frames != [b""]:  # skip the broker's connection probe
            return frames
    return None


def _error_code(frames: list[bytes] | None) -> str:
    assert frames is not None, "no reply"
    assert frames[:2] == [c.CLIENT, c.REPLY]
    message = codec.decode(frames[-1])
    assert isinstance(message, Error)
    return message.code


def _still_serving(bus: BusHarness) -> None:
    assert bus.client(retries=0).request("vault", Ping(payload=b"ok")) == Pong(payload=b"ok", service="vault")


@pytest.fixture
def vault(bus: BusHarness):  # type: ignore[no-untyped-def]
    worker = bus.thread_worker("vault")
    assert bus.wait_workers("vault", 1)
    return worker


@pytest.mark.parametrize(
    "frames, code",
    [
        ([b"JUNK"], errors.MALFORMED),
        ([c.CLIENT, c.REQUEST], errors.MALFORMED),
        ([c.CLIENT, b"\x09", b"vault", b"id", b"x"], errors.MALFORMED),
        ([c.CLIENT, c.REQUEST, b"vault", b"id"], errors.MALFORMED),
        ([c.CLIENT, c.REQUEST, b"vault", b"id1", b"\xc1 garbage"], errors.MALFORMED),
        ([c.CLIENT, c.REQUEST, b"vault", b"id2", msgpack.packb(["ping", 7, {}])], errors.UNSUPPORTED_VERSION),
        ([c.CLIENT, c.REQUEST, b"vault", b"id3", msgpack.packb(["launch.missiles", 1, {}])], errors.UNKNOWN_KIND),
        ([c.CLIENT, c.REQUEST, b"vault", b"id4", msgpack.packb(["ping", 1, {"payload": 5}])], errors.INVALID),
        ([c.CLIENT, c.REQUEST, b"vault", b"id5", codec.encode(Pong(service="x"))], errors.UNSUPPORTED_REQUEST),
        ([c.CLIENT, c.REQUEST, b"broker", b"id6", b"\x00"], errors.MALFORMED),
        ([c.WORKER, c.READY, b"not a ready body"], None),  # an operator may not be a worker: refused
    ],
)
def test_bad_message_gets_an_error_reply_and_the_next_one_is_served(
    bus: BusHarness, vault: object, raw: zmq.Socket, frames: list[bytes], code: str | None
) -> None:
    raw.send_multipart(frames)
    reply = _reply(raw)
    if code is None:
        assert reply is not None and _error_code(reply) == errors.FORBIDDEN
    else:
        assert _error_code(reply) == code
        if len(frames) == 5:
            assert reply is not None and reply[3] == frames[3], "the error names the request it answers"
    _still_serving(bus)


def test_oversized_body_is_refused_before_it_reaches_the_service(
    bus: BusHarness, vault: object, raw: zmq.Socket
) -> None:
    raw.send_multipart([c.CLIENT, c.REQUEST, b"vault", b"big", b"\x00" * (c.MAX_BODY + 1)])
    assert _error_code(_reply(raw, 10_000)) == errors.TOO_LARGE
    assert vault.counters["requests"] == 0  # type: ignore[attr-defined]
    assert bus.broker is not None and bus.broker.counters["too_large"] == 1
    _still_serving(bus)


def test_frame_beyond_maxmsgsize_drops_only_that_connection(bus: BusHarness, vault: object, raw: zmq.Socket) -> None:
    raw.send_multipart([c.CLIENT, c.REQUEST, b"vault", b"huge", b"\x00" * (c.MAX_FRAME + 1)])
    assert _reply(raw, 1500) is None
    assert vault.counters["requests"] == 0  # type: ignore[attr-defined]
    _still_serving(bus)


def test_random_frame_storm_leaves_broker_and_worker_serving(bus: BusHarness, vault: object, raw: zmq.Socket) -> None:
    rng = random.Random(4303)
    headers = [c.CLIENT, c.WORKER, b"", b"CTC0", b"\x00" * 4]
    commands = [c.REQUEST, c.REPLY, c.PUSH, c.HEARTBEAT, c.READY, c.DISCONNECT, b"", b"\xff"]
    sent = 0
    for _ in range(300):
        frames = [rng.choice(headers), rng.choice(commands)]
        frames += [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(0, 5))]
        if rng.random() < 0.3 and len(frames) >= 3:
            frames[2] = b"vault"
        raw.send_multipart(frames)
        sent += 1
    # Drain whatever came back: every answer is a well-formed error or heartbeat.
    while raw.poll(500, zmq.POLLIN):
        frames = raw.recv_multipart()
        if frames in ([b""], [c.CLIENT, c.HEARTBEAT]):
            continue
        assert frames[:2] == [c.CLIENT, c.REPLY]
        assert isinstance(codec.decode(frames[-1]), Error)
    assert sent == 300
    assert bus.broker is not None and bus.broker.counters["malformed"] > 0
    _still_serving(bus)
