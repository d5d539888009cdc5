"""The data plane's stages without a TUN device: two real DataPlanes keyed for each other.

What plane a sends goes out of its real UDP socket to a socket the test holds
on loopback (tests/helpers/planes.py); the test hands it to plane b's
``inbound_udp`` as if from a's address. Covered: the round trip both ways,
replays and corrupted packets refused without moving the window or the
endpoint (D3 through the plane), cryptokey routing (D7) and VPN isolation on
the way in, ACLs with replies of this node's own flows, the queue of packets
waiting for keys (sent on ``install``, answered with ICMP unreachable after
QUEUE_WAIT, driven with an explicit ``now``), the MSS clamp on the way out,
and the tunnel MTU bound (D14). ESP's own trailer checks are in test_esp.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.packet import raw

from nodeagent.constants import SEQ_FIRST
from nodeagent.dataplane import INTRODUCE_WINDOW, QUEUE_LIMIT, QUEUE_WAIT, UNDERLAY_MTU, DataPlane, tunnel_mtu
from nodeagent.esp import InboundSA, OutboundSA
from nodeagent.packets import checksum
from nodeagent.transport import MASQUERADE_MARKER, PATH_OVERHEAD, Wire
from tests.helpers.netviews import peer, rule, view, vpn
from tests.helpers.planes import VIPS, Pair, inbound_sa, make_pair, outbound_sa, sa_material

A, B = VIPS["a"], VIPS["b"]


def ping(src: str = A, dst: str = B, seq: int = 1, ident: int = 7) -> bytes:
    return raw(IP(src=src, dst=dst) / ICMP(type=8, id=ident, seq=seq) / b"coterie")


def pong(src: str = B, dst: str = A, seq: int = 1, ident: int = 7) -> bytes:
    return raw(IP(src=src, dst=dst) / ICMP(type=0, id=ident, seq=seq) / b"coterie")


@pytest.fixture
def pair() -> Iterator[Pair]:
    pair = make_pair()
    yield pair
    pair.close()


@pytest.fixture
def unkeyed() -> Iterator[Pair]:
    pair = make_pair(keyed=False)
    yield pair
    pair.close()


def window_of(plane: DataPlane, sender: str, receiver: str) -> tuple[int, tuple[int, ...]]:
    return plane.spis[sa_material(sender, receiver)[0]][0].window.snapshot()


# -- the round trip -------------------------------------------------------------------------------


def test_round_trip_both_ways(pair: Pair) -> None:
    a, b = pair.planes["a"], pair.planes["b"]
    packets = [ping(seq=n) for n in range(1, 6)]
    assert a.outbound_batch(packets) == []
    sent = pair.received("b", 5)
    assert all(data.startswith(MASQUERADE_MARKER) for data, _ in sent)
    assert all(source[1] == a.wire.port for _, source in sent)  # from a's own UDP socket
    delivered = b.inbound_udp([(data, pair.address_of("a")) for data, _ in sent])
    assert [bytes(p) for p in delivered] == packets
    assert a.counters["out_packets"] == 5 and b.counters["in_packets"] == 5
    assert b.tunnels["a"].learned == pair.address_of("a") and b.tunnels["a"].rx == 5
    assert a.tunnels["b"].tx == 5
    # b answers to where a's packets came from (learned), which is the capture socket again.
    assert b.outbound_batch([pong()]) == []
    assert [bytes(p) for p in pair.carry("b", 1)] == [pong()]
    assert pair.planes["a"].counters["in_packets"] == 1


def test_ipv6_round_trip_and_cryptokey_routing() -> None:
    pair = make_pair(vips={"a": "fd00:1::1", "b": "fd00:1::2"})
    try:
        a, b = pair.planes["a"], pair.planes["b"]
        echo = raw(IPv6(src="fd00:1::1", dst="fd00:1::2") / ICMPv6EchoRequest(id=3) / b"six")
        a.outbound_batch([echo])
        assert [bytes(p) for p in pair.carry("a", 1)] == [echo]
        forged = raw(IPv6(src="fd00:1::99", dst="fd00:1::2") / ICMPv6EchoRequest(id=3))
        assert b.inbound_udp([(seal_from_a(forged, 5), pair.address_of("a"))]) == []
        assert b.counters["in_source_not_allowed"] == 1 and b.counters["in_packets"] == 1
    finally:
        pair.close()


def test_replayed_and_corrupted_datagrams_change_nothing(pair: Pair) -> None:
    a, b = pair.planes["a"], pair.planes["b"]
    a.outbound_batch([ping(seq=1), ping(seq=2)])
    (first, _), (second, _) = pair.received("b", 2)
    home = pair.address_of("a")
    assert len(b.inbound_udp([(first, home)])) == 1
    window, learned = window_of(b, "a", "b"), b.tunnels["a"].learned
    elsewhere = ("127.0.0.2", 40999)
    corrupted = bytearray(second)
    corrupted[40] ^= 0x01  # a ciphertext bit
    refused = [(first, home), (first, elsewhere), (bytes(corrupted), home), (bytes(corrupted), elsewhere)]
    assert b.inbound_udp(refused) == []
    assert b.counters["in_replay_duplicate"] == 2
    assert b.counters["in_auth_failed"] == 2
    assert window_of(b, "a", "b") == window and b.tunnels["a"].learned == learned == home
    assert b.counters["endpoint_moved"] == 0 and b.tunnels["a"].rx == 1
    # The genuine next packet still passes, and it may move the endpoint (roaming after authentication).
    assert [bytes(p) for p in b.inbound_udp([(second, elsewhere)])] == [ping(seq=2)]
    assert b.tunnels["a"].learned == elsewhere and b.counters["endpoint_moved"] == 1


def seal_from_a(packet: bytes, seq: int) -> bytes:
    """What a modified agent a could send: any inner packet, under a's genuine SA."""
    return MASQUERADE_MARKER + OutboundSA(*sa_material("a", "b"), first_seq=seq).seal(packet)


def test_inner_source_not_the_peers_is_dropped(pair: Pair) -> None:
    b = pair.planes["b"]
    forged = [ping(src="10.1.0.99"), ping(src=B), ping(src="192.0.2.1")]
    datagrams = [(seal_from_a(p, SEQ_FIRST + n), pair.address_of("a")) for n, p in enumerate(forged)]
    assert b.inbound_udp(datagrams) == []
    assert b.counters["in_source_not_allowed"] == 3 and b.counters["in_packets"] == 0


def test_inner_destination_outside_this_node_is_dropped(pair: Pair) -> None:
    b = pair.planes["b"]
    datagrams = [(seal_from_a(ping(dst="10.1.0.3"), SEQ_FIRST), pair.address_of("a"))]
    assert b.inbound_udp(datagrams) == []
    assert b.counters["in_vpn_isolation"] == 1


def test_outbound_refuses_a_source_that_is_not_this_nodes(pair: Pair) -> None:
    a = pair.planes["a"]
    assert a.outbound_batch([ping(src="10.1.0.77"), ping(src="172.16.0.1")]) == []
    assert a.counters["out_vpn_isolation"] == 2 and a.counters["out_packets"] == 0
    assert pair.nothing_sent_to("b")


def test_no_route_is_answered_with_icmp_unreachable(pair: Pair) -> None:
    a = pair.planes["a"]
    original = raw(IP(src=A, dst="10.1.0.200") / UDP(sport=5000, dport=53) / b"query")
    (answer,) = a.outbound_batch([original, b"\x45garbage"])
    parsed = IP(answer)
    assert (parsed.src, parsed.dst) == (A, A)
    assert (parsed[ICMP].type, parsed[ICMP].code) == (3, 1)
    assert parsed[IPerror].dst == "10.1.0.200"
    assert checksum(answer[:20]) == 0 and checksum(answer[20:]) == 0
    assert a.counters["out_no_route"] == 1 and a.counters["out_malformed"] == 1


def test_peer_removed_from_the_view_loses_its_sas(pair: Pair) -> None:
    a, b = pair.planes["a"], pair.planes["b"]
    a.outbound_batch([ping(seq=1)])
    ((datagram, _),) = pair.received("b", 1)
    b.apply_view(view("b", [vpn("corp", B)], []))
    assert b.spis == {} and "a" not in b.tunnels
    assert b.inbound_udp([(datagram, pair.address_of("a"))]) == []
    assert b.counters["in_unknown_spi"] == 1


# -- ACLs ---------------------------------------------------------------------------------------


def test_acl_denies_allows_and_lets_replies_of_own_flows_through() -> None:
    pair = make_pair(acl=[rule("corp", "a", "b", "tcp", "22")])  # a may start ssh to b; nothing else
    try:
        a, b = pair.planes["a"], pair.planes["b"]
        ssh = raw(IP(src=A, dst=B) / TCP(sport=40000, dport=22, flags="S"))
        web = raw(IP(src=A, dst=B) / TCP(sport=40001, dport=80, flags="S"))
        a.outbound_batch([ssh, web, ping()])
        assert [bytes(p) for p in pair.carry("a", 3)] == [ssh]
        assert b.counters["in_acl_denied"] == 2
        # b pings a: a's rules refuse it (b may start nothing), but b's own flow lets a's answer in at b.
        b.outbound_batch([ping(src=B, dst=A, ident=9)])
        assert pair.carry("b", 1) == [] and a.counters["in_acl_denied"] == 1
        answer, stranger = pong(src=A, dst=B, ident=9), pong(src=A, dst=B, ident=10)
        a.outbound_batch([answer, stranger])
        assert [bytes(p) for p in pair.carry("a", 2)] == [answer]
        assert b.counters["in_acl_denied"] == 3
    finally:
        pair.close()


# -- queue: packets wait for keys -------------------------------------------------------------------


def test_queued_packets_are_sent_when_keys_arrive(unkeyed: Pair) -> None:
    a, b = unkeyed.planes["a"], unkeyed.planes["b"]
    packets = [ping(seq=n) for n in range(1, 4)]
    assert a.outbound_batch(packets) == []
    assert a.counters["out_queued"] == 3 and len(a.tunnels["b"].queue) == 3
    assert unkeyed.nothing_sent_to("b")
    now = time.monotonic()
    assert a.flush_queues(now) == []  # still no keys: kept, nothing answered yet
    assert len(a.tunnels["b"].queue) == 3
    unkeyed.key("a")
    unkeyed.key("b")
    assert a.flush_queues(now + 1.0) == []
    assert a.counters["out_queue_sent"] == 3 and not a.tunnels["b"].queue
    assert [bytes(p) for p in unkeyed.carry("a", 3)] == packets  # in order
    assert b.counters["in_packets"] == 3


def test_queued_packets_are_answered_with_unreachable_after_queue_wait(unkeyed: Pair) -> None:
    a = unkeyed.planes["a"]
    before = time.monotonic()
    udp = raw(IP(src=A, dst=B) / UDP(sport=6000, dport=7000) / b"hello")
    a.outbound_batch([udp, ping()])
    after = time.monotonic()
    assert a.flush_queues(before + QUEUE_WAIT - 0.5) == []
    assert len(a.tunnels["b"].queue) == 2
    answers = a.flush_queues(after + QUEUE_WAIT + 0.5)
    assert len(answers) == 2 and not a.tunnels["b"].queue
    assert a.counters["out_queue_expired"] == 2
    for answer, original in zip(answers, (udp, ping()), strict=True):
        parsed = IP(answer)
        assert (parsed.src, parsed.dst) == (A, A)
        assert (parsed[ICMP].type, parsed[ICMP].code) == (3, 1)
        assert bytes(answer[28:]) == original[:28]
        assert checksum(answer[:20]) == 0 and checksum(answer[20:]) == 0
    assert unkeyed.nothing_sent_to("b")


def test_the_queue_is_bounded(unkeyed: Pair) -> None:
    a = unkeyed.planes["a"]
    extra = 5
    a.outbound_batch([ping(seq=n) for n in range(QUEUE_LIMIT + extra)])
    queue = a.tunnels["b"].queue
    assert len(queue) == QUEUE_LIMIT
    assert a.counters["out_queue_full"] == extra
    assert queue[0][1] == ping(seq=extra)  # the oldest went first


# -- MSS clamp and MTU (D14) -------------------------------------------------------------------------


def test_syn_leaves_with_mss_clamped_to_the_tunnel_mtu(pair: Pair) -> None:
    a, b = pair.planes["a"], pair.planes["b"]
    syn = raw(IP(src=A, dst=B) / TCP(sport=40000, dport=22, flags="S", options=[("NOP", None), ("MSS", 1460)]))
    a.outbound_batch([syn])
    (delivered,) = pair.carry("a", 1)
    parsed = IP(bytes(delivered))
    assert dict(parsed[TCP].options)["MSS"] == a.mtu - 40
    stored = parsed[TCP].chksum
    del parsed[TCP].chksum
    assert IP(raw(parsed))[TCP].chksum == stored
    assert a.counters["out_mss_clamped"] == 1 and b.counters["in_packets"] == 1


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["udp", "esp"]), st.integers(576, 9000), st.integers(0, 4000), st.booleans())
def test_an_inner_packet_of_tunnel_mtu_fits_the_underlay(path: str, vpn_mtu: int, length: int, v6: bool) -> None:
    mtu = tunnel_mtu(vpn_mtu, path)
    assert mtu <= vpn_mtu
    size = min(length, mtu)
    size = max(size, 40 if v6 else 20)
    inner = (
        raw(IPv6(src="fd00::1", dst="fd00::2", plen=size - 40) / (b"x" * (size - 40)))
        if v6
        else raw(IP(src=A, dst=B, len=size) / (b"x" * (size - 20)))
    )
    sealed = OutboundSA(*sa_material("a", "b")).seal(inner)
    assert len(sealed) + PATH_OVERHEAD[path] <= UNDERLAY_MTU


# -- keys: install, rekey, collisions ----------------------------------------------------------------


def test_install_makes_exactly_the_given_inbound_sas_live(pair: Pair) -> None:
    a, b = pair.planes["a"], pair.planes["b"]
    old_spi = sa_material("a", "b")[0]
    a.outbound_batch([ping(seq=1)])
    ((under_old, _),) = pair.received("b", 1)
    new_material = (old_spi + 1, bytes(range(32)), b"salt")
    # make-before-break: b accepts both SAs while a switches.
    old_in = b.spis[old_spi][0]
    b.install("a", outbound_sa("b", "a"), [old_in, InboundSA(*new_material)])
    a.install("b", OutboundSA(*new_material), [inbound_sa("b", "a")])
    a.outbound_batch([ping(seq=2)])
    ((under_new, _),) = pair.received("b", 1)
    home = pair.address_of("a")
    assert [bytes(p) for p in b.inbound_udp([(under_new, home), (under_old, home)])] == [ping(seq=2), ping(seq=1)]
    assert b.spis[old_spi][0] is old_in  # the same SA object: its replay window survived the install
    # break: the old SA goes, its packets are refused as unknown.
    b.install("a", outbound_sa("b", "a"), [InboundSA(*new_material)])
    assert old_spi not in b.spis and b.tunnels["a"].inbound_spis == {old_spi + 1}
    assert b.inbound_udp([(under_old, home)]) == []
    assert b.counters["in_unknown_spi"] == 1


def test_an_spi_already_owned_by_another_peer_is_not_installed() -> None:
    plane = DataPlane(Wire(0, raw_esp=False))
    try:
        plane.apply_view(view("me", [vpn("corp", A)], [peer("p", {"corp": B}), peer("q", {"corp": "10.1.0.3"})]))
        shared = (0x5000, bytes(32), bytes(4))
        plane.install("p", None, [InboundSA(*shared)])
        plane.install("q", None, [InboundSA(*shared)])
        assert plane.spis[0x5000][1] == "p"
        assert plane.counters["spi_collision"] == 1
        plane.install("nobody", None, [InboundSA(0x6000, bytes(32), bytes(4))])  # not a peer: ignored
        assert 0x6000 not in plane.spis
    finally:
        plane.close()


def test_a_spent_sa_holds_packets_until_a_new_one_is_installed(pair: Pair) -> None:
    a = pair.planes["a"]
    a.install("b", OutboundSA(*sa_material("a", "b"), limit=2), [inbound_sa("b", "a")])
    a.outbound_batch([ping(seq=n) for n in (1, 2, 3)])
    assert a.counters["out_packets"] == 2 and a.counters["out_rekey_wait"] == 1
    assert len(a.tunnels["b"].queue) == 1
    fresh = (sa_material("a", "b")[0] + 7, bytes(range(32, 64)), b"new!")
    a.install("b", OutboundSA(*fresh), [inbound_sa("b", "a")])
    pair.planes["b"].install("a", outbound_sa("b", "a"), [InboundSA(*sa_material("a", "b")), InboundSA(*fresh)])
    assert a.flush_queues(time.monotonic()) == []
    assert [bytes(p) for p in pair.carry("a", 3)] == [ping(seq=n) for n in (1, 2, 3)]


# -- other paths and chores -------------------------------------------------------------------------


def test_raw_esp_is_opened_and_teaches_only_the_host(pair: Pair) -> None:
    b = pair.planes["b"]
    sealed = OutboundSA(*sa_material("a", "b")).seal(ping())
    outer = raw(IP(src="192.0.2.1", dst="192.0.2.2", proto=50) / sealed)
    assert [bytes(p) for p in b.inbound_esp([(outer, ("192.0.2.1", 0))])] == [ping()]
    # Raw ESP has no port to learn; the host is learned, so a peer that moves keeps being reached (D9).
    assert b.tunnels["a"].learned is None and b.tunnels["a"].learned_host == "192.0.2.1"
    assert b.inbound_esp([(outer, ("192.0.2.1", 0)), (outer[:30], ("192.0.2.1", 0))]) == []
    assert b.counters["in_replay_duplicate"] == 1 and b.counters["in_truncated"] == 1


def test_dummy_packets_are_counted_and_not_delivered(pair: Pair) -> None:
    b = pair.planes["b"]
    sealer = OutboundSA(*sa_material("a", "b"))
    datagrams = [(MASQUERADE_MARKER + sealer.seal_dummy(b"tfc"), pair.address_of("a"))]
    datagrams.append((MASQUERADE_MARKER + sealer.seal(ping()), pair.address_of("a")))
    assert [bytes(p) for p in b.inbound_udp(datagrams)] == [ping()]
    assert b.counters["in_dummy"] == 1 and b.counters["in_packets"] == 1


def test_an_authenticated_dummy_moves_the_endpoint_and_delivers_nothing(pair: Pair) -> None:
    b = pair.planes["b"]
    sealer = OutboundSA(*sa_material("a", "b"))
    b.inbound_udp([(MASQUERADE_MARKER + sealer.seal(ping()), pair.address_of("a"))])
    moved = ("127.0.0.1", 9)
    forged = MASQUERADE_MARKER + sealer.seal_dummy()[:-1] + b"\0"  # a broken ICV from yet another address
    assert b.inbound_udp([(forged, ("127.0.0.2", 9))]) == []
    assert b.tunnels["a"].learned == pair.address_of("a")
    assert b.inbound_udp([(MASQUERADE_MARKER + sealer.seal_dummy(), moved)]) == []
    assert b.tunnels["a"].learned == moved and b.counters["endpoint_moved"] == 1
    assert b.counters["in_dummy"] == 1 and b.tunnels["a"].rx == 1  # rx counts data only


def test_a_new_tunnel_introduces_itself_until_the_peer_answers(pair: Pair) -> None:
    a, b = pair.planes["a"], pair.planes["b"]
    keyed = a.tunnels["b"].keyed_at
    assert keyed > 0
    a.tunnels["b"].last_sent = keyed  # (the very first keepalive is due at once; count introductions here)
    a.keepalive = 100.0  # and no regular keepalive during this test
    a.keepalives(keyed + 0.1)
    a.keepalives(keyed + 0.5)  # at most one per LIVENESS_QUIET
    ((datagram, _),) = pair.received("b", 1)
    assert pair.nothing_sent_to("b") and a.counters["out_introduce"] == 1
    # Authenticated: it teaches b where a is (the PAT mapping, when a sits behind one).
    assert b.tunnels["a"].learned is None
    assert b.inbound_udp([(datagram, pair.address_of("a"))]) == [] and b.counters["in_dummy"] == 1
    assert b.tunnels["a"].learned == pair.address_of("a")
    a.keepalives(keyed + INTRODUCE_WINDOW + 1.0)
    assert pair.nothing_sent_to("b"), "a peer that never answers is not introduced to forever"
    b.outbound_batch([pong()])
    pair.carry("b", 1)
    a.keepalives(a.tunnels["b"].last_received + 0.5)
    assert pair.nothing_sent_to("b"), "b answered: no more introductions"


def test_liveness_dummies_go_to_a_peer_that_fell_silent_after_data(pair: Pair) -> None:
    a, b = pair.planes["a"], pair.planes["b"]
    b.outbound_batch([pong()])
    assert [bytes(p) for p in pair.carry("b", 1)] == [pong()]
    heard = a.tunnels["b"].last_data
    a.tunnels["b"].last_sent = heard  # a just sent too: no keepalive due
    a.keepalives(heard + 0.5)
    assert pair.nothing_sent_to("b"), "b spoke half a second ago"
    a.keepalives(heard + 1.5)
    a.keepalives(heard + 2.0)  # at most one probe per LIVENESS_QUIET
    assert b.inbound_udp(pair.received("b", 1)) == [] and b.counters["in_dummy"] == 1
    assert pair.nothing_sent_to("b") and a.counters["out_liveness"] == 1
    a.tunnels["b"].last_sent = heard + 25.0
    a.keepalives(heard + 30.0)
    assert pair.nothing_sent_to("b"), "past the window an idle tunnel sends nothing extra"


def test_a_batch_is_opened_as_one_run_yet_every_packet_is_still_checked(pair: Pair) -> None:
    """A GRO read's run of one SA: the flow decided once, but a spoofed source, a replay, a forged tag
    and a dummy in the middle of it are each refused and counted, and the rest arrive in order."""
    b = pair.planes["b"]
    sealer = OutboundSA(*sa_material("a", "b"))

    def tcp(seq: int, src: str = A) -> bytes:
        return raw(IP(src=src, dst=B) / TCP(sport=40000, dport=5201, seq=seq, flags="A") / (b"x" * 100))

    good = [tcp(n * 100) for n in range(5)]
    sealed = [MASQUERADE_MARKER + sealer.seal(p) for p in good[:2]]
    sealed.append(MASQUERADE_MARKER + sealer.seal(tcp(200, src="10.9.9.9")))  # not a's address (D7)
    sealed.append(sealed[0])  # a replay
    sealed.append(MASQUERADE_MARKER + sealer.seal(good[2])[:-1] + b"\0")  # a forged tag
    sealed.append(MASQUERADE_MARKER + sealer.seal_dummy())
    sealed += [MASQUERADE_MARKER + sealer.seal(p) for p in good[3:]]
    delivered = b.inbound_udp([(packet, pair.address_of("a")) for packet in sealed])
    assert [bytes(p) for p in delivered] == good[:2] + good[3:]
    counters = b.counters
    assert counters["in_packets"] == 4 and counters["in_source_not_allowed"] == 1
    assert counters["in_replay_duplicate"] == 1 and counters["in_auth_failed"] == 1 and counters["in_dummy"] == 1
    assert b.tunnels["a"].rx == 5  # authenticated inner packets (the spoofed one too), dummies apart


def test_forged_packets_are_limited_per_source_but_never_the_peers_own_address(pair: Pair) -> None:
    b = pair.planes["b"]
    sealer = OutboundSA(*sa_material("a", "b"))
    b.inbound_udp([(MASQUERADE_MARKER + sealer.seal(ping()), pair.address_of("a"))])  # a's address is known
    forged = MASQUERADE_MARKER + sealer.seal(ping(seq=2))[:-1] + b"\0"
    stranger = ("127.0.0.99", 4500)
    assert b.inbound_udp([(forged, stranger)] * 50) == []
    assert b.counters["in_auth_failed"] == 5 and b.counters["in_rate_limited"] == 45
    assert b.inbound_udp([(forged, pair.address_of("a"))] * 10) == []  # spoofing a's address: decrypted, not limited
    assert b.counters["in_auth_failed"] == 15 and b.counters["in_rate_limited"] == 45
    assert [bytes(p) for p in b.inbound_udp([(MASQUERADE_MARKER + sealer.seal(ping(seq=3)), pair.address_of("a"))])]
    assert b.status()["rate_limited_sources"] == 1


def test_keepalive_is_authenticated_and_sent_to_a_quiet_peer(pair: Pair) -> None:
    a, b = pair.planes["a"], pair.planes["b"]
    tunnel = a.tunnels["b"]
    tunnel.last_received = tunnel.last_sent = time.monotonic()  # introduced, and no data: no liveness either
    a.keepalives(tunnel.last_sent + a.keepalive - 1.0)
    assert pair.nothing_sent_to("b")
    a.keepalives(tunnel.last_sent + a.keepalive)
    ((datagram, _),) = pair.received("b", 1)
    assert datagram.startswith(MASQUERADE_MARKER) and a.counters["out_keepalive"] == 1
    assert b.inbound_udp([(datagram, pair.address_of("a"))]) == [] and b.counters["in_dummy"] == 1


def test_unauthenticated_keepalive_is_counted_and_teaches_nothing(pair: Pair) -> None:
    b = pair.planes["b"]
    assert b.inbound_udp([(b"\xff", pair.address_of("a"))]) == []
    assert b.counters["in_keepalive"] == 1 and b.tunnels["a"].learned is None


def test_default_route_goes_through_the_chosen_exit_node_only() -> None:
    internet = raw(IP(src=A, dst="1.1.1.1") / UDP(sport=5000, dport=53))
    chosen = make_pair(routes={"b": ("0.0.0.0/0",)}, exit_node={"a": "b"})
    try:
        assert chosen.planes["a"].outbound_batch([internet]) == []
        # b is the exit: it accepts a packet for the internet from a (its 0/0 route makes it b's to take).
        assert [bytes(p) for p in chosen.carry("a", 1)] == [internet]
        # and the answer from the internet, through b, is b's to send: a accepts it.
        answer = raw(IP(src="1.1.1.1", dst=A) / UDP(sport=53, dport=5000))
        chosen.planes["b"].outbound_batch([answer])
        assert [bytes(p) for p in chosen.carry("b", 1)] == [answer]
    finally:
        chosen.close()
    not_chosen = make_pair(routes={"b": ("0.0.0.0/0",)})
    try:
        (unreachable,) = not_chosen.planes["a"].outbound_batch([internet])
        assert IP(unreachable)[ICMP].type == 3 and not_chosen.planes["a"].counters["out_no_route"] == 1
        assert not_chosen.nothing_sent_to("b")
        answer = raw(IP(src="1.1.1.1", dst=A) / UDP(sport=53, dport=5000))
        spoofed = (MASQUERADE_MARKER + OutboundSA(*sa_material("b", "a")).seal(answer), not_chosen.address_of("b"))
        assert not_chosen.planes["a"].inbound_udp([spoofed]) == []
        assert not_chosen.planes["a"].counters["in_source_not_allowed"] == 1
    finally:
        not_chosen.close()


# -- found by review: the ICMP source with an IPv6 VPN first, IPv6 MSS clamping, ICMP errors and ACLs --


def test_no_route_answer_with_an_ipv6_vpn_listed_first() -> None:
    plane = DataPlane(Wire(0, raw_esp=False))
    try:
        plane.apply_view(view("a", [vpn("a6", "fd00:1::1"), vpn("corp", A)], [peer("b", {"corp": B})]))
        answers = plane.outbound_batch([ping(dst="10.1.0.200")])
        assert len(answers) == 1 and IP(answers[0]).src == A
    finally:
        plane.close()


def test_ipv6_syn_is_clamped_too() -> None:
    pair = Pair()
    try:
        plane = DataPlane(Wire(0, raw_esp=False))
        pair.planes["a"] = plane
        plane.apply_view(
            view("a", [vpn("v6", "fd00:2::1")], [peer("b", {"v6": "fd00:2::2"}, endpoints=("127.0.0.1:9",))])
        )
        plane.install("b", outbound_sa("a", "b"), [inbound_sa("b", "a")])
        syn = bytearray(
            raw(IPv6(src="fd00:2::1", dst="fd00:2::2") / TCP(sport=1, dport=22, flags="S", options=[("MSS", 1440)]))
        )
        plane.outbound_batch([bytes(syn)])
        assert plane.counters["out_mss_clamped"] == 1
    finally:
        pair.close()


def test_icmp_errors_about_own_flows_pass_restricted_vpns() -> None:
    pair = make_pair(acl=[rule("corp", "a", "b", "tcp", "22")])
    try:
        a, b = pair.planes["a"], pair.planes["b"]
        query = raw(IP(src=B, dst=A) / UDP(sport=53000, dport=53) / b"query")
        b.outbound_batch([query])  # b's own flow: its answers must come back
        pair.received("a", 1)
        refusal = raw(IP(src=A, dst=B) / ICMP(type=3, code=3) / query[:28])
        a.outbound_batch([refusal])
        assert [bytes(p) for p in pair.carry("a", 1)] == [refusal]
    finally:
        pair.close()
