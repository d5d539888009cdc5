"""Inner checksums per peer: partial toward an agent that reports "csum", complete toward any other (issue 8).

Two real DataPlanes on loopback (tests/helpers/planes.py). Plane a sends
what its TUN would hand over with checksum offload: single TCP/UDP packets
whose checksum field holds only the pseudo-header sum (offload.Partial) and
TSO super-packets. What plane b opens is checked with scapy, which
recomputes each checksum on a reparsed copy: toward a peer without "csum"
every TCP/UDP checksum must verify; toward one with "csum" the packet
arrives as it was read (partial), for the peer's kernel to finish.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw, raw

from bus.messages.sync import CAP_CSUM, CAP_GSO
from nodeagent.dataplane import DataPlane
from nodeagent.offload import GSO_TCPV4, NEEDS_CSUM, VNET, Partial, SuperPacket, pseudo_sum, unpack_read
from tests.helpers.planes import VIPS, Pair, make_pair

A, B = VIPS["a"], VIPS["b"]
MSS = 1300
PAYLOAD = bytes(range(256)) * 20  # 5120 bytes: three full segments and a short one


def with_caps(pair: Pair, node: str, caps: list[str]) -> None:
    """Give *node*'s view of its peer these capabilities, as a netmap update would."""
    other = "b" if node == "a" else "a"
    view = pair.views[node]
    entry = view.peers[other].model_copy(update={"caps": caps})
    pair.views[node] = view.model_copy(update={"peers": {other: entry}})
    pair.planes[node].apply_view(pair.views[node])


def partial(packet: IP | IPv6) -> bytes:
    """The packet as the TUN hands it over with TUN_F_CSUM: the checksum field holds the pseudo-header sum."""
    data = bytearray(raw(packet))
    l4 = (data[0] & 0x0F) * 4 if data[0] >> 4 == 4 else 40
    proto = data[9] if data[0] >> 4 == 4 else data[6]
    offset = 16 if proto == 6 else 6
    data[l4 + offset : l4 + offset + 2] = pseudo_sum(data, len(data) - l4, proto).to_bytes(2, "big")
    return bytes(data)


def verifies(packet: bytes | memoryview) -> bool:
    """scapy's checksum of a reparsed copy equals the one in the packet."""
    data = bytes(packet)
    layer = IP if data[0] >> 4 == 4 else IPv6
    parsed = layer(data)
    rebuilt = parsed.copy()
    del rebuilt[TCP if TCP in parsed else UDP].chksum
    return raw(layer(raw(rebuilt))) == data


def tcp(payload: bytes = b"hello", flags: str = "PA", seq: int = 1000) -> IP:
    return IP(src=A, dst=B, id=9) / TCP(sport=40000, dport=5201, seq=seq, ack=1, flags=flags) / Raw(payload)


def udp(payload: bytes = b"datagram") -> IP:
    return IP(src=A, dst=B) / UDP(sport=5353, dport=9999) / Raw(payload)


def super_packet(payload: bytes = PAYLOAD) -> SuperPacket:
    read = unpack_read(VNET.pack(NEEDS_CSUM, GSO_TCPV4, 40, MSS, 20, 16) + partial(tcp(payload)), complete=False)
    assert type(read) is SuperPacket
    return read


@pytest.fixture
def pair() -> Iterator[Pair]:
    pair = make_pair()
    yield pair
    pair.close()


def test_the_tun_read_marks_what_it_left_partial() -> None:
    single = unpack_read(VNET.pack(NEEDS_CSUM, 0, 0, 0, 20, 16) + partial(tcp()), complete=False)
    assert type(single) is Partial and single == partial(tcp())
    whole = unpack_read(VNET.pack(0, 0, 0, 0, 0, 0) + raw(tcp()), complete=False)
    assert type(whole) is bytes and verifies(whole)  # forwarded traffic comes complete: no mark
    completed = unpack_read(VNET.pack(NEEDS_CSUM, 0, 0, 0, 20, 16) + partial(tcp()), complete=True)
    assert type(completed) is bytes and verifies(completed)


@pytest.mark.parametrize("build", [tcp, udp], ids=["tcp", "udp"])
def test_toward_a_peer_without_csum_a_partial_packet_is_completed(pair: Pair, build) -> None:  # type: ignore[no-untyped-def]
    a = pair.planes["a"]
    assert not a.tunnels["b"].takes_partial  # the view says nothing about b: complete
    sent = Partial(partial(build()))
    assert not verifies(sent)
    a.outbound_batch([sent])
    [opened] = pair.carry("a", 1)
    assert verifies(opened)
    assert bytes(opened) == raw(build())  # the checksum scapy computes itself


@pytest.mark.parametrize("build", [tcp, udp], ids=["tcp", "udp"])
def test_toward_an_agent_with_csum_it_stays_partial(pair: Pair, build) -> None:  # type: ignore[no-untyped-def]
    with_caps(pair, "a", [CAP_CSUM, CAP_GSO])
    assert pair.planes["a"].tunnels["b"].takes_partial
    sent = Partial(partial(build()))
    pair.planes["a"].outbound_batch([sent])
    [opened] = pair.carry("a", 1)
    assert bytes(opened) == sent and not verifies(opened)  # b's kernel finishes it (NEEDS_CSUM write)


@pytest.mark.parametrize("caps", [[], [CAP_GSO], [CAP_CSUM]])
def test_segments_of_a_super_packet_follow_the_peer(pair: Pair, caps: list[str]) -> None:
    with_caps(pair, "a", caps)
    pair.planes["a"].outbound_batch([super_packet()])
    opened = pair.carry("a", 4)
    assert b"".join(bytes(TCP(bytes(p)[20:]).payload) for p in opened) == PAYLOAD
    if CAP_CSUM in caps:
        assert not any(verifies(p) for p in opened)
    else:
        assert all(verifies(p) for p in opened)


def test_a_complete_packet_is_never_touched(pair: Pair) -> None:
    """Forwarded traffic arrives complete and is sent as it is: even a wrong checksum is not "fixed" here."""
    good = raw(tcp())
    bad = bytearray(good)
    bad[36] ^= 0xFF  # the TCP checksum's first byte
    pair.planes["a"].outbound_batch([good, bytes(bad)])
    opened = [bytes(p) for p in pair.carry("a", 2)]
    assert opened == [good, bytes(bad)]


def test_a_clamped_syn_toward_a_peer_without_csum_verifies(pair: Pair) -> None:
    syn = IP(src=A, dst=B) / TCP(sport=40001, dport=22, flags="S", options=[("MSS", 1460)])
    pair.planes["a"].outbound_batch([Partial(partial(syn))])
    [opened] = pair.carry("a", 1)
    assert pair.planes["a"].counters["out_mss_clamped"] == 1
    assert dict(TCP(bytes(opened)[20:]).options)["MSS"] < 1460
    assert verifies(opened)


def test_held_segments_are_completed_if_the_peer_loses_csum_meanwhile() -> None:
    pair = make_pair(keyed=False)
    try:
        with_caps(pair, "a", [CAP_CSUM])
        a = pair.planes["a"]
        a.outbound_batch([super_packet(), Partial(partial(udp()))])
        assert len(a.tunnels["b"].queue) == 5 and a.counters["out_queued"] == 5
        with_caps(pair, "a", [])  # b restarted without offloads: its next heartbeat says so
        pair.key("a")
        pair.key("b")
        a.flush_queues(a.tunnels["b"].keyed_at)
        opened = pair.carry("a", 5)
        assert all(verifies(p) for p in opened)
    finally:
        pair.close()


def test_a_node_that_completes_everything_does_so_toward_agents_with_csum_too(pair: Pair) -> None:
    plane: DataPlane = pair.planes["a"]
    plane.partial_checksums = False
    with_caps(pair, "a", [CAP_CSUM])
    assert not plane.tunnels["b"].takes_partial
    plane.outbound_batch([Partial(partial(tcp()))])
    [opened] = pair.carry("a", 1)
    assert verifies(opened)


def test_without_a_tun_the_plane_reports_no_capabilities(pair: Pair) -> None:
    assert pair.planes["a"].capabilities() == []
    assert pair.planes["a"].status()["caps"] == []
    assert pair.planes["a"].status()["peers"]["b"]["inner_checksums"] == "complete"
