"""coalesce's UDP runs: equal datagrams of one flow become one GSO_UDP_L4 write, nothing else does.

The kernel cuts such a write into datagrams of gso_size with the run's
headers, so a run may only hold datagrams that those headers describe: one
flow (addresses, ports), the same IP header bar id and checksum (TTL, TOS,
DF), and the same length. tests/network/test_tun_udp_runs.py writes them to
a real TUN and reads the datagrams back from a socket.
"""

from __future__ import annotations

import struct

import pytest

from nodeagent.offload import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_UDP_L4,
    MAX_COALESCED,
    MAX_SEGMENTS,
    NEEDS_CSUM,
    PLAIN,
    VNET,
    coalesce,
    ones_sum,
    pseudo_sum,
)
from tests.unit.test_coalesce_runs import segment


def datagram(payload: bytes, *, sport: int = 40000, ttl: int = 64, ident: int = 1, version: int = 4,
             frag: int = 0x4000, udp_length: int | None = None) -> bytes:  # fmt: skip
    udp = struct.pack("!HHHH", sport, 5001, 8 + len(payload) if udp_length is None else udp_length, 0x1234)
    if version == 6:
        addresses = bytes(15) + b"\x01" + bytes(15) + b"\x02"
        return struct.pack("!IHBB", 6 << 28, 8 + len(payload), 17, ttl) + addresses + udp + payload
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 28 + len(payload), ident, frag, ttl, 17, 0)
    return ip + bytes((10, 0, 0, 1, 10, 0, 0, 2)) + udp + payload


def flood(count: int, size: int = 64, **fields: int) -> list[bytes]:
    return [datagram(bytes([n % 256]) * size, ident=n + 1, **fields) for n in range(count)]


def vnet_of(write: list) -> tuple[int, ...]:
    return VNET.unpack(bytes(write[0]))


@pytest.mark.parametrize("version", [4, 6])
def test_equal_datagrams_of_one_flow_are_one_udp_gso_write(version: int) -> None:
    packets = flood(20, version=version)
    writes = coalesce(packets)
    assert len(writes) == 1
    flags, gso_type, header_length, gso_size, csum_start, csum_offset = vnet_of(writes[0])
    l4 = 20 if version == 4 else 40
    assert (flags, gso_type, header_length, gso_size, csum_start, csum_offset) == (
        NEEDS_CSUM,
        GSO_UDP_L4,
        l4 + 8,
        64,
        l4,
        6,
    )
    header = bytes(writes[0][1])
    assert b"".join(bytes(p) for p in writes[0][2:]) == b"".join(p[l4 + 8 :] for p in packets)
    total = 8 + 20 * 64  # the UDP length of the whole, in the UDP header and the IP length
    assert struct.unpack_from("!H", header, l4 + 4)[0] == total
    if version == 4:
        assert struct.unpack_from("!H", header, 2)[0] == 20 + total
        assert ones_sum(header[:20]) == 0xFFFF, "a valid IPv4 header checksum"
    else:
        assert struct.unpack_from("!H", header, 4)[0] == total
    assert struct.unpack_from("!H", header, l4 + 6)[0] == pseudo_sum(header, total, 17), "partial: the pseudo sum"


def test_what_the_headers_would_not_describe_starts_a_new_write() -> None:
    base = flood(3)
    other_port = datagram(bytes(64), sport=1)
    other_ttl = datagram(bytes(64), ttl=9)
    longer = datagram(bytes(65))
    shorter = datagram(bytes(63))
    writes = coalesce([*base, other_port, other_ttl, *flood(2), longer, shorter])
    kinds = [(vnet_of(w)[1], sum(len(bytes(p)) for p in w[2:])) for w in writes]
    # A write of one datagram is the datagram as it was (NEEDS_CSUM, no GSO), header and payload apart.
    assert kinds == [
        (GSO_UDP_L4, 3 * 64),
        (GSO_NONE, 64),
        (GSO_NONE, 64),
        (GSO_UDP_L4, 2 * 64),
        (GSO_NONE, 65),
        (GSO_NONE, 63),
    ]


def test_fragments_and_datagrams_shorter_than_their_packet_are_written_alone() -> None:
    fragment = datagram(bytes(64), frag=0x2000)  # MF: its UDP header covers the whole datagram, not this piece
    padded = datagram(bytes(64), udp_length=8 + 60)  # 4 bytes after the datagram: cutting again would keep them
    writes = coalesce([fragment, fragment, padded, padded])
    assert len(writes) == 4
    assert all(vnet_of(w)[1] == GSO_NONE for w in writes)
    assert bytes(writes[0][0]) == PLAIN, "a fragment is written as it is"


def test_runs_stop_at_the_segment_and_size_limits() -> None:
    small = coalesce(flood(MAX_SEGMENTS + 3))
    assert [vnet_of(w)[1] for w in small] == [GSO_UDP_L4, GSO_UDP_L4]
    assert [len(w) - 2 for w in small] == [MAX_SEGMENTS, 3]
    size = 1372  # 1400-byte packets: 47 of them make a UDP length of 64,492; 48 would pass 65,535
    big = coalesce(flood(50, size=size))
    assert [len(w) - 2 for w in big] == [(MAX_COALESCED - 28) // size, 50 - (MAX_COALESCED - 28) // size]


def test_order_is_kept_between_udp_and_tcp_runs() -> None:
    tcp = [segment(1000 + n * 1000, 1000, ident=n + 1) for n in range(3)]
    writes = coalesce([*flood(2), *tcp, *flood(2)])
    assert [vnet_of(w)[1] for w in writes] == [GSO_UDP_L4, GSO_TCPV4, GSO_UDP_L4]


def test_without_udp_runs_every_datagram_is_its_own_write() -> None:
    writes = coalesce(flood(5), udp=False)
    assert len(writes) == 5
    assert all(vnet_of(w)[:2] == (NEEDS_CSUM, GSO_NONE) for w in writes)
