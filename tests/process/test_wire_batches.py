"""UDP GSO sends and GRO receives of nodeagent/transport.py over real loopback sockets.

A batch of (marker, packet) pairs must arrive as exactly those datagrams, in
order, whether the receiver reads them one by one (a plain socket) or many
per read (a Wire with UDP_GRO, which splits by the segment size).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from nodeagent.transport import GSO_MAX_SEGMENTS, MASQUERADE_MARKER, Wire
from tests.conftest import wait_until


@pytest.fixture
def wires() -> Iterator[tuple[Wire, Wire]]:
    sender, receiver = Wire(0, raw_esp=False), Wire(0, raw_esp=False)
    yield sender, receiver
    sender.close()
    receiver.close()


def batch(sizes: list[int]) -> list[bytes]:
    parts = []
    for index, size in enumerate(sizes):
        parts += [MASQUERADE_MARKER, bytes([index % 251]) * size]
    return parts


def expected(parts: list[bytes]) -> list[bytes]:
    return [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]


def collect(wire: Wire, count: int) -> list[bytes]:
    got: list[bytes] = []

    def more() -> bool:
        got.extend(bytes(data) for data, _ in wire.recv_batch(wire.udp, 64))
        return len(got) >= count

    assert wait_until(more, 10), f"{len(got)} of {count} datagrams arrived"
    return got


# equal sizes (one GSO send), a short last one, sizes that change mid-batch, more than one send's worth
SHAPES = [[1400] * 10, [1400] * 7 + [300], [1400] * 3 + [900] * 4 + [1400, 64], [1000] * (GSO_MAX_SEGMENTS + 20)]


@pytest.mark.parametrize("sizes", SHAPES)
def test_gro_receiver_gets_every_datagram_in_order(wires: tuple[Wire, Wire], sizes: list[int]) -> None:
    sender, receiver = wires
    assert receiver.gro, "UDP_GRO is missing on this kernel"
    parts = batch(sizes)
    sender.send_udp_batch(parts, ("127.0.0.1", receiver.port))
    assert collect(receiver, len(sizes)) == expected(parts)
    assert sender.send_errors == 0
    assert sender.udp_sends < len(sizes) or len(sizes) == 1  # fewer system calls than datagrams
    assert receiver.udp_datagrams_read == len(sizes)


def test_plain_receiver_sees_separate_datagrams(wires: tuple[Wire, Wire]) -> None:
    sender, _ = wires
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.bind(("127.0.0.1", 0))
    plain.settimeout(5)
    try:
        parts = batch([1400] * 5 + [200])
        sender.send_udp_batch(parts, plain.getsockname())
        assert [plain.recv(65536) for _ in range(6)] == expected(parts)
    finally:
        plain.close()


def test_without_gso_datagrams_go_one_by_one(wires: tuple[Wire, Wire]) -> None:
    sender, receiver = wires
    sender.gso = False
    parts = batch([1400] * 4)
    sender.send_udp_batch(parts, ("127.0.0.1", receiver.port))
    assert collect(receiver, 4) == expected(parts)
    assert sender.udp_sends == 4
