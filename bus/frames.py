"""Multipart send and receive for every socket of the bus, without pyzmq's per-frame Python.

pyzmq's ``send_multipart``/``recv_multipart`` type-check each frame and OR enum flags per frame (an enum
operation in Python): 4-5 µs a frame here against ~1 µs for the compiled call below, and the broker relays
every message of every agent. Flags are plain ints for the same reason.
"""

from __future__ import annotations

import zmq

_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get
NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)


def send_frames(sock: zmq.Socket, frames: list[bytes], flags: int = 0) -> None:
    """``sock.send_multipart(frames, flags)`` (frames: bytes), at a fraction of its per-frame cost."""
    more = flags | _SNDMORE
    last = len(frames) - 1
    for index in range(last):
        _send(sock, frames[index], more)
    _send(sock, frames[last], flags)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
    """``sock.recv_multipart(flags)``, at a fraction of its per-frame cost."""
    frames = [_recv(sock, flags, True)]
    while _get(sock, _RCVMORE):
        frames.append(_recv(sock, flags, True))
    return frames


def recv_message(sock: zmq.Socket, flags: int = 0) -> tuple[zmq.Frame, list[bytes]]:
    """One message as its first frame (a zmq.Frame, whose properties such as User-Id and Peer-Address
    describe the whole message) and every frame after it as bytes: a zmq.Frame costs an enum call and an
    object each, and the broker needs the properties only once per message."""
    first = _recv(sock, flags, False)
    rest = []
    while _get(sock, _RCVMORE):
        rest.append(_recv(sock, flags, True))
    return first, rest
