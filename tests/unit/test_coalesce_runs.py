"""coalesce's one-compare test for the next full segment of a run, against the cases it must not join.

A full-sized ACK segment with the next sequence number joins by one unpack
compared with the values it must have; everything else goes through the
detailed checks. These cases sit at the edge between the two: a PSH segment,
a shorter segment and then a full one, the segment and size limits of one
write, and header fields that may differ between segments (IP id, window)
beside ones that may not (ack, flags, addresses, TTL).
"""

from __future__ import annotations

import struct

import pytest

from nodeagent.offload import GSO_NONE, GSO_TCPV4, GSO_TCPV6, MAX_COALESCED, MAX_SEGMENTS, VNET, coalesce

ACK, PSH, ECE = 0x10, 0x08, 0x40
TS = b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamp: a 32-byte TCP header


def segment(seq: int, size: int, *, flags: int = ACK, ident: int = 1, ttl: int = 64, ack: int = 555,
            window: int = 512, src: int = 1, version: int = 4) -> bytes:  # fmt: skip
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, ack, 8 << 4, flags, window, 0, 0) + TS
    payload = bytes([seq & 0xFF]) * size
    if version == 6:
        addresses = bytes(15) + bytes([src]) + bytes(15) + b"\x02"
        return struct.pack("!IHBB", 6 << 28, len(tcp) + size, 6, ttl) + addresses + tcp + payload
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp) + size, ident, 0x4000, ttl, 6, 0)
    return ip + bytes((10, 0, 0, src, 10, 0, 0, 2)) + tcp + payload


def shape(writes: list[list]) -> list[tuple[int, int]]:
    """(gso_type, payload bytes) of each write."""
    result = []
    for write in writes:
        vnet = VNET.unpack(bytes(write[0]))
        result.append((vnet[1], sum(len(bytes(part)) for part in write[2:])))
    return result


def flow(count: int, size: int = 1000, start: int = 1000, **fields: int) -> list[bytes]:
    return [segment(start + n * size, size, ident=n + 1, **fields) for n in range(count)]


@pytest.mark.parametrize("version, gso", [(4, GSO_TCPV4), (6, GSO_TCPV6)])
def test_full_segments_join_and_fields_that_may_differ_do_not_split(version: int, gso: int) -> None:
    packets = flow(3, version=version)
    packets += [segment(4000, 1000, window=9000, ident=77, version=version)]  # window and IP id differ
    writes = coalesce(packets)
    assert shape(writes) == [(gso, 4000)]
    payload = b"".join(bytes(part) for part in writes[0][2:])
    assert payload == b"".join(p[-1000:] for p in packets)


def test_a_psh_segment_closes_the_run_and_the_next_starts_another() -> None:
    packets = [*flow(2), segment(3000, 1000, flags=ACK | PSH), segment(4000, 1000)]
    writes = coalesce(packets)
    assert shape(writes) == [(GSO_TCPV4, 3000), (GSO_NONE, 1000)]
    header = bytes(writes[0][1])
    assert header[20 + 13] == ACK | PSH  # the super-packet carries the last segment's PSH


def test_nothing_joins_after_a_shorter_segment() -> None:
    packets = [*flow(2), segment(3000, 400), segment(3400, 1000), segment(4400, 1000)]
    assert shape(coalesce(packets)) == [(GSO_TCPV4, 2400), (GSO_TCPV4, 2000)]


@pytest.mark.parametrize(
    "change",
    [
        {"ack": 556},
        {"flags": ACK | ECE},
        {"src": 9},
        {"ttl": 63},  # as the kernel's GRO: one TTL per super-packet
        {"seq": 1000 + 3 * 1000 + 1},
    ],
)
def test_a_full_segment_that_differs_where_it_may_not_starts_a_new_write(change: dict[str, int]) -> None:
    seq = change.pop("seq", 4000)
    packets = [*flow(3), segment(seq, 1000, **change)]
    assert [gso for gso, _ in shape(coalesce(packets))] == [GSO_TCPV4, GSO_NONE]


def test_a_write_holds_at_most_max_segments_and_max_coalesced_bytes() -> None:
    small = flow(MAX_SEGMENTS + 3, size=100)
    assert shape(coalesce(small)) == [(GSO_TCPV4, MAX_SEGMENTS * 100), (GSO_TCPV4, 300)]
    per_write = (MAX_COALESCED - 52) // 1348  # 48 segments of 1348 bytes under a 52-byte header
    big = flow(per_write + 2, size=1348)
    writes = coalesce(big)
    assert shape(writes) == [(GSO_TCPV4, per_write * 1348), (GSO_TCPV4, 2 * 1348)]
    assert all(sum(len(bytes(part)) for part in write[1:]) <= MAX_COALESCED for write in writes)


def test_two_flows_interleaved_never_join_each_other() -> None:
    a, b = flow(4, src=1), flow(4, src=3)
    mixed = [p for pair in zip(a, b, strict=True) for p in pair]
    assert [gso for gso, _ in shape(coalesce(mixed))] == [GSO_NONE] * 8
