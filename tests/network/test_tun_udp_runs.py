"""UDP runs written to a real TUN (offload.coalesce, Tun.write_batch) leave the kernel as the datagrams they were.

One write carries a run of equal datagrams of one flow as GSO_UDP_L4; the
kernel cuts it again. Delivered locally, every datagram reaches its socket
with its own payload, in order (the Tun's counters show one write for the
run). Forwarded, as a gateway forwards to its LAN, each datagram leaves with
a checksum the kernel can finish: local delivery trusts a partial checksum
and would not notice a wrong one, so the forwarded copies are read back from
the TUN itself and their checksum fields checked.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from compose.netns import Lab
from nodeagent.offload import NEEDS_CSUM, PROTO_UDP, VNET, VNET_SIZE, ipv4_header_checksum, ones_sum, pseudo_sum
from nodeagent.tun import Tun
from tests.network.test_dataplane_loop import in_namespace

pytestmark = pytest.mark.timeout(120)

LOCAL = {4: "10.78.0.1", 6: "fd00:78::1"}
REMOTE = {4: "10.78.0.2", 6: "fd00:78::2"}
BEYOND = "10.78.5.5"  # routed back out of the TUN: what the kernel forwards
PORT = 5001


def datagram(version: int, payload: bytes, ident: int, to: str | None = None) -> bytes:
    """From REMOTE to LOCAL:PORT (or *to*), checksum left as any sender's (the coalesced write replaces it)."""
    src = socket.inet_pton(socket.AF_INET if version == 4 else socket.AF_INET6, REMOTE[version])
    dst = socket.inet_pton(socket.AF_INET if version == 4 else socket.AF_INET6, to or LOCAL[version])
    udp = struct.pack("!HHHH", 40000, PORT, 8 + len(payload), 0)
    if version == 6:
        return struct.pack("!IHBB", 6 << 28, 8 + len(payload), 17, 64) + src + dst + udp + payload
    header = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 28 + len(payload), ident, 0x4000, 64, 17, 0) + src + dst)
    ipv4_header_checksum(header)  # the kernel checks it on every packet written, alone or in a run
    return bytes(header) + udp + payload


@pytest.fixture
def tun_and_socket(lab: Lab) -> Iterator[tuple[Tun, dict[int, socket.socket]]]:
    host = lab.add_host("u", forward=True)
    host.sysctl("net.ipv4.conf.all.send_redirects", 0)  # forwarding back out of the TUN is what the test wants

    def build() -> tuple[Tun, dict[int, socket.socket]]:
        tun = Tun("cotudp", 1400)
        tun.set_addresses([(LOCAL[4], 24), (LOCAL[6], 64)])
        tun.set_routes([(f"{BEYOND}/32", LOCAL[4])])
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


def test_a_forwarded_run_leaves_as_datagrams_whose_checksums_the_kernel_can_finish(tun_and_socket) -> None:  # type: ignore[no-untyped-def]
    tun, _ = tun_and_socket
    payloads = [bytes([n]) * 64 for n in range(30)]
    assert tun.write_batch([datagram(4, p, n + 1, to=BEYOND) for n, p in enumerate(payloads)]) == 0
    assert tun.writes == 1, "the run in one write"
    forwarded = []
    deadline = time.monotonic() + 5
    while len(forwarded) < len(payloads) and time.monotonic() < deadline:
        try:
            read = os.read(tun.fd, 65536)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        packet = read[VNET_SIZE:]
        if packet[0] >> 4 == 4 and packet[9] == PROTO_UDP:  # not the kernel's own IPv6 chatter
            forwarded.append((VNET.unpack_from(read)[0], packet))
    assert [packet[28:] for _, packet in forwarded] == payloads, "cut back into the datagrams, in order"
    for flags, packet in forwarded:
        assert struct.unpack_from("!H", packet, 24)[0] == len(packet) - 20, "each with its own UDP length"
        assert ones_sum(packet[:20]) == 0xFFFF, "and a valid IP header"
        field = struct.unpack_from("!H", packet, 26)[0]
        if flags & NEEDS_CSUM:  # left for the next device to finish: the field must be this datagram's pseudo sum
            assert field == pseudo_sum(packet, len(packet) - 20, PROTO_UDP)
        else:  # finished by the kernel: the sum over pseudo-header and datagram checks out
            assert ones_sum(packet[12:20] + struct.pack("!HH", PROTO_UDP, len(packet) - 20) + packet[20:]) == 0xFFFF
