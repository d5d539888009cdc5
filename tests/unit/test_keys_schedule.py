"""The key schedule: make-before-break over random clocks and relay orders, early rekey, offline recovery.

Two real KeyRings (alpha, bravo) with skewed clocks exchange real signed keys
through keydist's real KeyStore, each publication pushed to the other node
after a random delay (below ``lead``, so publications may overtake each
other). At every step each side seals a packet with the SA it would use and
the other end must open it (the make-before-break invariant, RELIABILITY
D15); an SA replaced at the sender still opens at the receiver for a while
after the switch and is gone within grace (plus skew and one tick) of it.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from scapy.layers.inet import IP, UDP
from scapy.packet import raw

from bus.errors import RemoteError
from bus.messages import Message
from bus.messages.keys import FetchPeerKeys, KeyPublished, PeerKeys, PeerKeyUpdate, PublishKey
from nodeagent.esp import DropReason, InboundSA, Opened, OutboundSA, RekeyRequired
from nodeagent.keys import KeyRing, Timing, derive_pair
from services.keydist.store import KeyStore

T0 = 1_800_000_000.0
FAST = Timing(rekey_interval=20.0, lead=5.0, grace=12.0, lifetime=3600.0)
MAX_SKEW = 1.0
MAX_DELAY = 2.5  # relay delay: MAX_DELAY + 2 * MAX_SKEW < lead
MAX_STEP = 1.0
INNER = raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"payload")


@dataclass
class Node:
    name: str
    node_id: int
    identity: SigningKey
    skew: float
    ring: KeyRing
    online: bool = True

    def clock(self, t: float) -> float:
        return t + self.skew


@dataclass
class Relay:
    """keydist in miniature: its real KeyStore, pushes delivered after a chosen delay."""

    nodes: dict[str, Node]
    up: bool = True  # keydist reachable at all
    store: KeyStore = field(default_factory=KeyStore)
    queue: list[tuple[float, int, str, Message]] = field(default_factory=list)
    order: itertools.count = field(default_factory=itertools.count)

    def tick(self, node: Node, t: float, delay: float) -> None:
        for request in node.ring.tick(node.clock(t)):
            node.ring.on_reply(request, self.handle(node, request, t, delay), node.clock(t))

    def handle(self, node: Node, request: Message, t: float, delay: float) -> Message | RemoteError:
        if not (node.online and self.up):
            return RemoteError("service_unavailable", "keydist unreachable")
        if isinstance(request, FetchPeerKeys):
            keys = [k for other in self.peers(node) for k in self.store.keys_of(other.node_id, t)]
            return PeerKeys(keys=keys)
        assert isinstance(request, PublishKey)
        key = request.as_peer_key(node.name)
        try:
            fresh = self.store.put(node.node_id, node.identity.verify_key.encode().hex(), key, t)
        except RemoteError as exc:
            return exc
        if fresh:
            for other in self.peers(node):
                if other.online:
                    heapq.heappush(self.queue, (t + delay, next(self.order), other.name, PeerKeyUpdate(key=key)))
        return KeyPublished(epoch=request.epoch, fresh=fresh)

    def peers(self, node: Node) -> list[Node]:
        return [n for n in self.nodes.values() if n is not node]

    def deliver(self, t: float) -> None:
        while self.queue and self.queue[0][0] <= t:
            due, _, name, push = heapq.heappop(self.queue)
            target = self.nodes[name]
            if target.online:
                target.ring.on_push(push, target.clock(due))


def make_world(skews: tuple[float, float], timing: Timing, rekey_after: int) -> tuple[Relay, Node, Node]:
    identities = {"alpha": SigningKey.generate(), "bravo": SigningKey.generate()}
    nodes = {}
    for node_id, ((name, identity), skew) in enumerate(zip(identities.items(), skews, strict=True), start=1):
        ring = KeyRing(name, identity, T0 + skew, timing=timing, rekey_after_packets=rekey_after)
        nodes[name] = Node(name, node_id, identity, skew, ring)
    for node in nodes.values():
        others = {n: i.verify_key.encode().hex() for n, i in identities.items() if n != node.name}
        node.ring.set_peers(others, node.clock(T0))
        node.ring.on_connect(node.clock(T0))
    return Relay(nodes), nodes["alpha"], nodes["bravo"]


@dataclass
class Direction:
    """What one direction's sender used: each SA with the times it was first and last used."""

    sender: Node
    receiver: Node
    current: OutboundSA | None = None
    first_used: float = 0.0
    retired: list[tuple[OutboundSA, float, float]] = field(default_factory=list)  # (sa, last used, successor first)
    last_used: float = 0.0

    def send(self, t: float, count: int) -> None:
        sa = self.sender.ring.outbound(self.receiver.name, self.sender.clock(t))
        if sa is None:
            assert self.current is None, f"{self.sender.name} lost its SA for {self.receiver.name} at +{t - T0:.1f}s"
            return
        if sa is not self.current:
            if self.current is not None:
                assert sa.spi != self.current.spi
                self.retired.append((self.current, self.last_used, t))
            self.current, self.first_used = sa, t
        for _ in range(count):
            opened = self.receiver.ring.spi_table.open(sa.seal(INNER))
            assert isinstance(opened, Opened), f"make-before-break broken at +{t - T0:.2f}s: {opened}"
            assert bytes(opened.inner) == INNER
            assert self.receiver.ring.peer_of(sa.spi) == self.sender.name
        self.last_used = t

    def check_retired(self, t: float, timing: Timing) -> None:
        for sa, last_used, successor_first in self.retired:
            result = self.receiver.ring.spi_table.open(sa.seal(INNER))
            if t <= last_used + timing.grace - timing.lead - 2 * MAX_SKEW - MAX_STEP:
                assert isinstance(result, Opened), f"old SA removed before grace at +{t - last_used:.1f}s"
            elif t >= successor_first + timing.grace + 2 * MAX_SKEW + MAX_STEP + 0.01:
                assert result is DropReason.UNKNOWN_SPI, f"old SA still accepted {t - successor_first:.1f}s after"


steps = st.lists(
    st.tuples(
        st.floats(0.05, MAX_STEP),  # time to the next step
        st.floats(0.0, MAX_DELAY),  # relay delay of whatever is published at this step
        st.integers(0, 4),  # packets each way
        st.sampled_from(["ab", "ba", "a", "b"]),  # who ticks, in which order (a busy agent skips a tick)
        st.sampled_from([0.0] * 12 + [2.0, 7.0, 15.0]),  # keydist unreachable from now for this long
    ),
    min_size=60,
    max_size=250,
)


@given(
    skews=st.tuples(st.floats(-MAX_SKEW, MAX_SKEW), st.floats(-MAX_SKEW, MAX_SKEW)),
    rekey_after=st.sampled_from([15, 60, 2**40]),
    plan=steps,
)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_make_before_break_over_random_clocks_and_orders(
    skews: tuple[float, float], rekey_after: int, plan: list[tuple[float, float, int, str, float]]
) -> None:
    relay, alpha, bravo = make_world(skews, FAST, rekey_after)
    ways = [Direction(alpha, bravo), Direction(bravo, alpha)]
    t = T0
    down_until = up_since = T0
    for dt, delay, packets, order, outage in plan:
        t += dt
        down_until = max(down_until, t + outage) if outage else down_until
        if relay.up != (t >= down_until):
            relay.up, up_since = t >= down_until, t
        relay.deliver(t)
        for node in (alpha if c == "a" else bravo for c in order):
            relay.tick(node, t, delay)
        for way in ways:
            way.send(t, packets)
            way.check_retired(t, FAST)
    if relay.up and t - up_since >= 2 * FAST.lead:
        assert all(way.current is not None for way in ways), "keydist reachable for a while, still no SA"


def test_default_timing_over_many_rollovers() -> None:
    """Two minutes per epoch, five seconds of lead, thirty of grace: ten rollovers at 0.5 s ticks."""
    timing = Timing()
    relay, alpha, bravo = make_world((0.4, -0.3), timing, 2**40)
    ways = [Direction(alpha, bravo), Direction(bravo, alpha)]
    t = T0
    for step in range(int(10 * timing.rekey_interval / 0.5)):
        t += 0.5
        relay.deliver(t)
        for node in (alpha, bravo):
            relay.tick(node, t, delay=1.0 + (step % 3) * 0.5)
        for way in ways:
            way.send(t, 1)
            way.check_retired(t, timing)
    assert alpha.ring.counters["epochs"] >= 9
    assert len(ways[0].retired) >= 9
    assert all(n.ring.counters["spi_collision"] == 0 for n in (alpha, bravo))


def test_a_keydist_outage_across_a_rollover_never_breaks_traffic() -> None:
    """A key accepted late (after its not_before) is used only ``lead`` after acceptance, never at once."""
    relay, alpha, bravo = make_world((0.0, 0.0), FAST, 2**40)
    ways = [Direction(alpha, bravo), Direction(bravo, alpha)]
    t = T0
    for _ in range(160):
        t += 0.5
        relay.up = not 18 <= t - T0 < 30  # down from before the first rollover (+15 s) to after its not_before
        relay.deliver(t)
        for node in (alpha, bravo):
            relay.tick(node, t, delay=2.0)
        for way in ways:
            way.send(t, 1)
            way.check_retired(t, FAST)
    assert alpha.ring.counters["publish_service_unavailable"] > 0
    assert len(ways[0].retired) >= 2 and len(ways[1].retired) >= 2


def test_packet_count_triggers_an_early_epoch() -> None:
    relay, alpha, bravo = make_world((0.0, 0.0), FAST, rekey_after=10)
    t = T0
    for _ in range(10):  # both sides ready: keys published, lead passed
        t += 1.0
        relay.deliver(t)
        for node in (alpha, bravo):
            relay.tick(node, t, delay=0.5)
    way = Direction(alpha, bravo)
    way.send(t, 11)
    first = way.current
    assert first is not None and first.next_seq == 12
    epochs_before = alpha.ring.counters["epochs"]
    relay.tick(alpha, t, delay=0.5)
    assert alpha.ring.counters["rekey_packets"] == 1
    assert alpha.ring.counters["epochs"] == epochs_before + 1
    relay.tick(alpha, t, delay=0.5)
    assert alpha.ring.counters["rekey_packets"] == 1, "one early epoch per SA, not one per tick"
    way.send(t + 0.1, 1)
    assert way.current is first, "the old SA stays in use until the new key had its lead"
    for _ in range(int(FAST.lead) + 2):
        t += 1.0
        relay.deliver(t)
        relay.tick(alpha, t, delay=0.5)
        relay.tick(bravo, t, delay=0.5)
    way.send(t, 1)
    assert way.current is not first and way.current.next_seq == 2, "a new SA, counting from 1"


def test_hard_packet_limit_raises_and_asks_for_a_rekey() -> None:
    relay, alpha, bravo = make_world((0.0, 0.0), FAST, rekey_after=2**40)
    for node in (alpha, bravo):
        node.ring.packet_limit = 5
        for state in node.ring.peers.values():
            state.packet_limit = 5
    t = T0
    for _ in range(10):
        t += 1.0
        relay.deliver(t)
        for node in (alpha, bravo):
            relay.tick(node, t, delay=0.5)
    sa = alpha.ring.outbound("bravo", t)
    assert sa is not None
    for _ in range(5):
        sa.seal(INNER)
    with pytest.raises(RekeyRequired):
        sa.seal(INNER)
    alpha.ring.rekey("bravo")
    relay.tick(alpha, t, delay=0.5)
    assert alpha.ring.counters["rekey_limit"] == 1
    for _ in range(int(FAST.lead) + 2):
        t += 1.0
        relay.deliver(t)
        for node in (alpha, bravo):
            relay.tick(node, t, delay=0.5)
    fresh = alpha.ring.outbound("bravo", t)
    assert fresh is not None and fresh is not sa
    assert isinstance(bravo.ring.spi_table.open(fresh.seal(INNER)), Opened)


def test_a_node_offline_during_a_rollover_recovers_after_reconnecting() -> None:
    relay, alpha, bravo = make_world((0.0, 0.0), FAST, rekey_after=2**40)
    t = T0
    to_bravo = Direction(alpha, bravo)

    def run(seconds: float) -> None:
        nonlocal t
        for _ in range(int(seconds / 0.5)):
            t += 0.5
            relay.deliver(t)
            for node in (alpha, bravo):
                relay.tick(node, t, delay=0.5)

    run(10)
    to_bravo.send(t, 1)
    bravo.online = False  # misses alpha's next epochs; alpha still has bravo's key and keeps sending
    run(FAST.rekey_interval * 2 + FAST.grace)
    sa = alpha.ring.outbound("bravo", t)
    assert sa is not None
    assert bravo.ring.spi_table.open(sa.seal(INNER)) is DropReason.UNKNOWN_SPI, "bravo never learnt alpha's key"
    bravo.online = True
    bravo.ring.on_connect(t)  # the agent calls this after each snapshot: republish and fetch everything
    run(1.0)
    sa = alpha.ring.outbound("bravo", t)
    assert sa is not None and isinstance(bravo.ring.spi_table.open(sa.seal(INNER)), Opened)
    back = bravo.ring.outbound("alpha", t)
    assert back is not None and isinstance(alpha.ring.spi_table.open(back.seal(INNER)), Opened)


def test_a_peer_removed_from_the_netmap_loses_its_sas_at_once() -> None:
    relay, alpha, bravo = make_world((0.0, 0.0), FAST, rekey_after=2**40)
    t = T0
    for _ in range(10):
        t += 1.0
        relay.deliver(t)
        for node in (alpha, bravo):
            relay.tick(node, t, delay=0.5)
    sa = bravo.ring.outbound("alpha", t)
    assert sa is not None and isinstance(alpha.ring.spi_table.open(sa.seal(INNER)), Opened)
    assert alpha.ring.set_peers({}, t) == ["bravo"]
    assert len(alpha.ring.spi_table) == 0
    assert alpha.ring.spi_table.open(sa.seal(INNER)) is DropReason.UNKNOWN_SPI
    assert alpha.ring.outbound("bravo", t) is None


def test_a_peer_removed_and_re_added_never_gets_a_restarted_sa() -> None:
    """Back in the netmap within the same epochs: no SA is made twice, so no replay and no nonce reuse."""
    relay, alpha, bravo = make_world((0.0, 0.0), FAST, rekey_after=2**40)
    t = T0

    def run(seconds: float) -> None:
        nonlocal t
        for _ in range(int(seconds / 0.5)):
            t += 0.5
            relay.deliver(t)
            for node in (alpha, bravo):
                relay.tick(node, t, delay=0.5)

    run(8)
    old = bravo.ring.outbound("alpha", t)
    assert old is not None
    captured = old.seal(INNER)
    assert isinstance(alpha.ring.spi_table.open(captured), Opened)
    signs = {n.name: n.identity.verify_key.encode().hex() for n in (alpha, bravo)}
    for node, other in ((alpha, bravo), (bravo, alpha)):
        node.ring.set_peers({}, node.clock(t))
        node.ring.set_peers({other.name: signs[other.name]}, node.clock(t))
        node.ring.on_connect(node.clock(t))
        assert node.ring.counters["rekey_peer_back"] == 1
    assert alpha.ring.spi_table.open(captured) is DropReason.UNKNOWN_SPI, "a replay must not open a fresh window"
    assert bravo.ring.outbound("alpha", t) is None, "the old pair is spent"
    run(FAST.lead + 3)
    fresh = bravo.ring.outbound("alpha", t)
    assert fresh is not None and fresh.spi != old.spi
    assert isinstance(alpha.ring.spi_table.open(fresh.seal(INNER)), Opened)
    assert alpha.ring.spi_table.open(captured) is DropReason.UNKNOWN_SPI


def test_an_spi_collision_keeps_the_installed_sa_and_starts_an_early_epoch() -> None:
    relay, alpha, bravo = make_world((0.0, 0.0), FAST, rekey_after=2**40)
    # Before alpha hears of bravo's key, an SA of something else already holds the SPI the pair will derive.
    mine, theirs = alpha.ring.own.newest, bravo.ring.own.newest
    spi = derive_pair("alpha", mine.private, mine.epoch, "bravo", theirs.public, theirs.epoch).inbound.spi
    squatter = InboundSA(spi, bytes(32), bytes(4))
    alpha.ring.spi_table.add(squatter)
    t = T0
    for _ in range(40):
        t += 0.5
        relay.deliver(t)
        for node in (alpha, bravo):
            relay.tick(node, t, delay=0.5)
    assert alpha.ring.counters["spi_collision"] == 1
    assert alpha.ring.counters["rekey_spi_collision"] == 1
    assert alpha.ring.peer_of(spi) is None, "the SA installed first keeps its SPI"
    sa = bravo.ring.outbound("alpha", t)
    assert sa is not None and sa.spi != spi, "bravo moved to alpha's new epoch, with a new SPI"
    assert isinstance(alpha.ring.spi_table.open(sa.seal(INNER)), Opened)
