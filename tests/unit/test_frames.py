"""bus.frames: the bus's multipart send and receive behave as pyzmq's send_multipart/recv_multipart."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from bus.frames import NOBLOCK, recv_frames, recv_message, send_frames


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    context = zmq.Context()
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    a.bind("inproc://frames")
    b.connect("inproc://frames")
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    context.term()


def test_frames_arrive_whole_and_in_order_either_way(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    message = [b"W", b"", b"x" * 5000, memoryview(b"view"), b"last"]
    send_frames(a, message)
    assert b.poll(2000)
    assert b.recv_multipart() == [bytes(f) for f in message]
    a.send_multipart([b"one"])
    a.send_multipart([b"1", b"2"])
    assert b.poll(2000)
    assert recv_frames(b, NOBLOCK) == [b"one"]
    assert b.poll(2000)
    assert recv_frames(b, NOBLOCK) == [b"1", b"2"]


def test_nothing_waiting_raises_again_without_blocking(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    _, b = pair
    with pytest.raises(zmq.Again):
        recv_frames(b, NOBLOCK)


def test_a_frame_that_is_not_bytes_is_refused(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, _ = pair
    with pytest.raises(TypeError):
        send_frames(a, ["text is not a frame"])  # type: ignore[list-item]


def test_a_message_comes_as_its_first_frame_and_the_rest_as_bytes(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    send_frames(a, [b"routing", b"C", b"body"])
    send_frames(a, [b"alone"])
    assert b.poll(2000)
    first, rest = recv_message(b, NOBLOCK)
    assert isinstance(first, zmq.Frame) and first.bytes == b"routing" and rest == [b"C", b"body"]
    assert b.poll(2000)
    first, rest = recv_message(b, NOBLOCK)
    assert first.bytes == b"alone" and rest == []
