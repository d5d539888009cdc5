"""UDP runs written to a real TUN (offload.coalesce, Tun.write_batch) reach a socket as the datagrams they were.

One write carries a run of equal datagrams of one flow as GSO_UDP_L4; the
kernel cuts it again and checks each datagram's checksum (partial, finished
by the kernel) before the socket gets it. So every datagram arriving with its
own payload, in order, shows that headers, lengths and checksums were right;
the Tun's counters show that it took one write for the run.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from compose.netns import Lab
from nodeagent.tun import Tun
from tests.network.test_dataplane_loop import in_namespace

pytestmark = pytest.mark.timeout(120)

LOCAL = {4: "10.78.0.1", 6: "fd00:78::1"}
REMOTE = {4: "10.78.0.2", 6: "fd00:78::2"}
PORT = 5001


def datagram(version: int, payload: bytes, ident: int) -> bytes:
    """From REMOTE to LOCAL:PORT, checksum left as any sender's (the coalesced write replaces it)."""
    src = socket.inet_pton(socket.AF_INET if version == 4 else socket.AF_INET6, REMOTE[version])
    dst = socket.inet_pton(socket.AF_INET if version == 4 else socket.AF_INET6, LOCAL[version])
    udp = struct.pack("!HHHH", 40000, PORT, 8 + len(payload), 0)
    if version == 6:
        return struct.pack("!IHBB", 6 << 28, 8 + len(payload), 17, 64) + src + dst + udp + payload
    header = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 28 + len(payload), ident, 0x4000, 64, 17, 0) + src + dst)
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    header[10:12] = struct.pack("!H", ~total & 0xFFFF)
    return bytes(header) + udp + payload


@pytest.fixture
def tun_and_socket(lab: Lab) -> Iterator[tuple[Tun, dict[int, socket.socket]]]:
    host = lab.add_host("u")

    def build() -> tuple[Tun, dict[int, socket.socket]]:
        tun = Tun("cotudp", 1400)
        tun.set_addresses([(LOCAL[4], 24), (LOCAL[6], 64)])
        sockets = {}
        for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((LOCAL[version], PORT))
            sock.settimeout(5)
            sockets[version] = sock
        return tun, sockets

    tun, sockets = in_namespace(host.ns, build)
    try:
        yield tun, sockets
    finally:
        for sock in sockets.values():
            sock.close()
        tun.close()


@pytest.mark.parametrize("version", [4, 6])
def test_a_run_of_datagrams_is_one_write_and_arrives_as_each_datagram(tun_and_socket, version: int) -> None:  # type: ignore[no-untyped-def]
    tun, sockets = tun_and_socket
    payloads = [bytes([n]) * 64 for n in range(30)] + [b"last, of another size"]
    refused = tun.write_batch([datagram(version, p, n + 1) for n, p in enumerate(payloads)])
    assert refused == 0 and tun.udp_gso, "the kernel took the UDP GSO write"
    assert (tun.writes, tun.packets_written) == (2, 31), "the 30 equal datagrams in one write, the last alone"
    received = [sockets[version].recv(2048) for _ in payloads]
    assert received == payloads, "every datagram, in order, with its own payload and a checksum the kernel accepted"
