"""nodeagent/patmap.py: port overloading for peers behind one PAT (RELIABILITY.md D12, the unit part).

Two peers, the same public address, the same source port, the same port
here: inbound they must come out as two flows on distinct ports, and each
reply must be restored to the original port and handed to the right peer;
checksums stay what scapy computes from scratch; mappings expire when idle;
the table is bounded; what carries no port is left alone.
"""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Packet, Raw, raw

from nodeagent.dataplane import DataPlane
from nodeagent.packets import summarize
from nodeagent.patmap import IDLE, PortMap
from nodeagent.transport import MASQUERADE_MARKER, Wire
from tests.helpers.netviews import peer, view, vpn
from tests.helpers.planes import inbound_sa, outbound_sa

PAT, ME = "198.18.1.2", "198.18.0.2"


def pkt(p: Packet) -> bytearray:
    return bytearray(raw(p))


def inbound(table: PortMap, peer: str, p: Packet, now: float = 0.0) -> tuple[bool, bytearray]:
    packet = pkt(p)
    return table.inbound(peer, packet, summarize(packet), now), packet


def outbound(table: PortMap, p: Packet, now: float = 0.0, adjust: bool = True) -> tuple[str | None, bytearray]:
    packet = pkt(p)
    return table.outbound(packet, summarize(packet), now, adjust=adjust), packet


def test_same_source_port_from_two_peers_gets_two_ports_and_replies_go_back_right() -> None:
    table = PortMap()
    ok1, first = inbound(table, "b1", IP(src=PAT, dst=ME) / TCP(sport=40000, dport=5201, flags="S"))
    ok2, second = inbound(table, "b2", IP(src=PAT, dst=ME) / TCP(sport=40000, dport=5201, flags="S"))
    assert ok1 and ok2
    port1, port2 = IP(bytes(first))[TCP].sport, IP(bytes(second))[TCP].sport
    assert port1 == 40000, "the first flow keeps its port, as a PAT does when it is free"
    assert port2 != 40000
    assert bytes(second) == raw(IP(src=PAT, dst=ME) / TCP(sport=port2, dport=5201, flags="S"))
    for port, name in ((port1, "b1"), (port2, "b2")):
        found, reply = outbound(table, IP(src=ME, dst=PAT) / TCP(sport=5201, dport=port, flags="SA") / b"hi")
        assert found == name
        assert bytes(reply) == raw(IP(src=ME, dst=PAT) / TCP(sport=5201, dport=40000, flags="SA") / b"hi")
    # the same flow again maps the same way
    _, again = inbound(table, "b2", IP(src=PAT, dst=ME) / TCP(sport=40000, dport=5201, flags="A"))
    assert IP(bytes(again))[TCP].sport == port2
    assert len(table) == 2


def test_reply_without_a_mapping_is_ambiguous() -> None:
    table = PortMap()
    inbound(table, "b1", IP(src=PAT, dst=ME) / UDP(sport=1000, dport=53))
    assert outbound(table, IP(src=ME, dst=PAT) / UDP(sport=53, dport=1001))[0] is None, "unknown port"
    assert outbound(table, IP(src=ME, dst=PAT) / UDP(sport=54, dport=1000))[0] is None, "other local port"
    assert outbound(table, IP(src=ME, dst=PAT) / TCP(sport=53, dport=1000))[0] is None, "other protocol"
    assert outbound(table, IP(src=ME, dst=PAT) / UDP(sport=53, dport=1000))[0] == "b1"


def test_icmp_echo_identifiers_are_overloaded_too() -> None:
    table = PortMap()
    _, one = inbound(table, "b1", IP(src=PAT, dst=ME) / ICMP(type=8, id=7, seq=1))
    _, two = inbound(table, "b2", IP(src=PAT, dst=ME) / ICMP(type=8, id=7, seq=1))
    id1, id2 = IP(bytes(one))[ICMP].id, IP(bytes(two))[ICMP].id
    assert id1 == 7 and id2 != 7
    assert bytes(two) == raw(IP(src=PAT, dst=ME) / ICMP(type=8, id=id2, seq=1))
    found, reply = outbound(table, IP(src=ME, dst=PAT) / ICMP(type=0, id=id2, seq=1), adjust=False)
    assert found == "b2"
    assert bytes(reply) == raw(IP(src=ME, dst=PAT) / ICMP(type=0, id=7, seq=1)), "ICMP checksums are never partial"


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["tcp", "udp"]), st.integers(1, 65535), st.integers(1, 65535), st.binary(max_size=200))
def test_checksums_equal_full_recompute(kind: str, sport: int, dport: int, payload: bytes) -> None:
    def layer(s: int, d: int) -> Packet:
        return (TCP(sport=s, dport=d, flags="PA") if kind == "tcp" else UDP(sport=s, dport=d)) / Raw(payload)

    table = PortMap()
    inbound(table, "b1", IP(src=PAT, dst=ME) / layer(sport, dport))
    _, packet = inbound(table, "b2", IP(src=PAT, dst=ME) / layer(sport, dport))
    public = int.from_bytes(packet[20:22], "big")
    assert public != sport
    assert bytes(packet) == raw(IP(src=PAT, dst=ME) / layer(public, dport))
    _, reply = outbound(table, IP(src=ME, dst=PAT) / layer(dport, public))
    assert bytes(reply) == raw(IP(src=ME, dst=PAT) / layer(dport, sport))


def test_partial_checksums_are_left_alone_and_udp_zero_stays_zero() -> None:
    table = PortMap()
    inbound(table, "b1", IP(src=PAT, dst=ME) / UDP(sport=9, dport=9, chksum=0) / b"x")
    _, packet = inbound(table, "b2", IP(src=PAT, dst=ME) / UDP(sport=9, dport=9, chksum=0) / b"x")
    assert packet[26:28] == b"\0\0"
    inbound(table, "b1", IP(src=PAT, dst=ME) / TCP(sport=9, dport=9))
    _, packet = inbound(table, "b2", IP(src=PAT, dst=ME) / TCP(sport=9, dport=9))
    public = int.from_bytes(packet[20:22], "big")
    tcp = pkt(IP(src=ME, dst=PAT) / TCP(sport=9, dport=public, chksum=0x1234))
    found = table.outbound(tcp, summarize(tcp), 0.0, adjust=False)
    assert found == "b2" and tcp[22:24] == b"\x00\x09", "restored"
    assert tcp[36:38] == b"\x12\x34", "a partial sum does not cover ports: left alone"


def test_idle_mappings_expire_and_their_ports_are_reused() -> None:
    table = PortMap()
    inbound(table, "b1", IP(src=PAT, dst=ME) / UDP(sport=5, dport=6), now=0.0)
    inbound(table, "b2", IP(src=PAT, dst=ME) / UDP(sport=5, dport=6), now=0.0)
    inbound(table, "b1", IP(src=PAT, dst=ME) / TCP(sport=5, dport=6), now=0.0)
    assert table.sweep(IDLE[17] / 2) == 0
    outbound(table, IP(src=ME, dst=PAT) / UDP(sport=6, dport=5), now=IDLE[17] - 1)  # b1's UDP flow stays alive
    assert table.sweep(IDLE[17] + 1) == 1, "b2's idle UDP mapping goes; b1's used one and the TCP one stay"
    assert len(table) == 2
    assert outbound(table, IP(src=ME, dst=PAT) / UDP(sport=6, dport=5))[0] == "b1"
    ok, packet = inbound(table, "b3", IP(src=PAT, dst=ME) / UDP(sport=5, dport=6), now=IDLE[17] + 2)
    assert ok and int.from_bytes(packet[20:22], "big") != 5


def test_table_is_bounded_and_port_range_exhaustion_drops() -> None:
    table = PortMap(ports=(61000, 61001), limit=3)
    results = [inbound(table, f"b{n}", IP(src=PAT, dst=ME) / UDP(sport=5, dport=6))[0] for n in range(4)]
    assert results == [True, True, True, False], "the 4th flow finds a full table"
    small = PortMap(ports=(61000, 61000), limit=100)
    got = [inbound(small, f"b{n}", IP(src=PAT, dst=ME) / UDP(sport=5, dport=6))[0] for n in range(3)]
    assert got == [True, True, False], "one spare port: the third sharer has none"


def test_what_carries_no_port_passes_untouched() -> None:
    table = PortMap()
    fragment = IP(src=PAT, dst=ME, proto=17, frag=100) / Raw(b"y" * 40)
    error = IP(src=PAT, dst=ME) / ICMP(type=3, code=3) / raw(IP(src=ME, dst=PAT) / UDP(sport=1, dport=2))
    for p in (fragment, error, IP(src=PAT, dst=ME, proto=47) / Raw(b"gre!")):
        ok, packet = inbound(table, "b1", p)
        assert ok and bytes(packet) == raw(p)
    assert len(table) == 0
    assert outbound(table, IP(src=ME, dst=PAT, proto=17, frag=100) / Raw(b"y" * 40))[0] is None


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["tcp", "udp"]), st.integers(1, 65535), st.integers(1, 65535), st.binary(max_size=60))
def test_icmp_error_about_an_overloaded_flow_quotes_the_public_port(
    kind: str, sport: int, dport: int, payload: bytes
) -> None:
    def layer(s: int, d: int) -> Packet:
        return (TCP(sport=s, dport=d, flags="A") if kind == "tcp" else UDP(sport=s, dport=d)) / Raw(payload)

    table = PortMap()
    inbound(table, "b1", IP(src=PAT, dst=ME) / layer(sport, dport))
    _, packet = inbound(table, "b2", IP(src=PAT, dst=ME) / layer(sport, dport))
    public = int.from_bytes(packet[20:22], "big")

    def error(port: int) -> Packet:  # what b2's kernel says about a's reply, as it reaches a's kernel after RNAT
        return IP(src=PAT, dst=ME) / ICMP(type=3, code=3) / raw(IP(src=ME, dst=PAT) / layer(dport, port))

    ok, got = inbound(table, "b2", error(sport))
    assert ok and bytes(got) == raw(error(public)), "the quote names the port a's socket knows"
    _, untouched = inbound(table, "b1", error(sport))
    assert bytes(untouched) == raw(error(sport)), "b1 kept its port: nothing to change"


# -- through a real DataPlane (no TUN): RNAT, cryptokey routing and the port map in the pipeline --------------


def native_plane() -> tuple[DataPlane, dict[str, socket.socket]]:
    """Plane a (public, 198.18.0.2) in native VPN "lab" with b1 and b2 behind one PAT (198.18.1.2)."""
    captures = {}
    peers = []
    for name, private in (("b1", "192.168.1.10"), ("b2", "192.168.1.11")):
        sock = captures[name] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5.0)
        entry = peer(name, {"lab": PAT}, endpoints=(f"{private}:4500",))
        peers.append(entry.model_copy(update={"endpoint": f"127.0.0.1:{sock.getsockname()[1]}"}))
    mine = vpn("lab", ME).model_copy(update={"addressing": "native"})
    plane = DataPlane(Wire(0, raw_esp=False))
    plane.apply_view(view("a", [mine], peers))
    for name in captures:
        plane.install(name, outbound_sa("a", name), [inbound_sa(name, "a")])
    return plane, captures


def test_plane_rnat_and_overloading_end_to_end() -> None:
    plane, captures = native_plane()
    try:
        assert plane.overloaded == {"b1", "b2"}
        delivered = {}
        senders = {name: outbound_sa(name, "a") for name in captures}  # one sequence per sender (replay window)
        for name, private in (("b1", "192.168.1.10"), ("b2", "192.168.1.11")):
            inner = raw(IP(src=private, dst=ME) / TCP(sport=40000, dport=5201, flags="S"))
            datagram = MASQUERADE_MARKER + senders[name].seal(inner)
            [packet] = plane.inbound_udp([(datagram, captures[name].getsockname())])
            delivered[name] = IP(bytes(packet))
        assert {p.src for p in delivered.values()} == {PAT}, "RNAT: the source is the address a knows them by"
        assert delivered["b1"][TCP].sport == 40000 and delivered["b2"][TCP].sport != 40000
        for name, got in delivered.items():
            assert got[TCP].chksum == IP(raw(IP(src=PAT, dst=ME) / got[TCP].copy()))[TCP].chksum
            reply = raw(IP(src=ME, dst=PAT) / TCP(sport=5201, dport=got[TCP].sport, flags="SA"))
            assert plane.outbound_batch([reply]) == []
            data, _ = captures[name].recvfrom(65536)
            opened = inbound_sa("a", name).open(memoryview(data)[len(MASQUERADE_MARKER) :])
            assert IP(bytes(opened.inner))[TCP].dport == 40000, f"{name}'s reply, its own port restored"  # type: ignore[union-attr]
        # b1 speaking from b2's private address is not corrected into the shared one: cryptokey routing refuses it
        spoof = raw(IP(src="192.168.1.11", dst=ME) / TCP(sport=1, dport=2))
        assert plane.inbound_udp([(MASQUERADE_MARKER + senders["b1"].seal(spoof), captures["b1"].getsockname())]) == []
        assert plane.counters["in_source_not_allowed"] == 1
        # a flow a starts towards the shared address names neither peer: dropped, counted
        assert plane.outbound_batch([raw(IP(src=ME, dst=PAT) / UDP(sport=7, dport=7))]) == []
        assert plane.counters["out_native_ambiguous"] == 1
    finally:
        plane.close()
        for sock in captures.values():
            sock.close()
