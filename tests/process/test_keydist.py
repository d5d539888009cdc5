"""keydist end to end: real server processes, real enrolled nodes' keys, real CURVE (issue 5).

Three nodes per test, on one server per module:

    vpn t<i>-a: t<i>-n1, t<i>-n2        vpn t<i>-b: t<i>-n3 (shares no VPN with the other two)

Each node is its enrollment (CURVE key pair and Ed25519 identity, made by the
real ``enroll``), one bus client, and a real KeyRing driven the way the agent
drives it: publish and fetch through keydist, take its pushes, then seal with
the SAs the ring chose and open at the other end.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from bus import errors
from bus.client import Client
from bus.errors import BusError, RemoteError
from bus.messages import Message
from bus.messages.auth import JoinString
from bus.messages.datastore import MemberAdd, MemberRemove, VpnCreate
from bus.messages.keys import FetchPeerKeys, KeyPublished, PeerKeys, PeerKeyUpdate, PublishKey, publication_payload
from bus.messages.sync import Snapshot, SnapshotRequest
from bus.signing import load_signing_key
from nodeagent.agent import enroll
from nodeagent.esp import DropReason, Opened
from nodeagent.keys import KeyRing, Timing
from nodeagent.state import StateDir
from tests.conftest import wait_until
from tests.helpers.server import CoterieServer, shared

TIMING = Timing(rekey_interval=30.0, lead=1.0, grace=4.0, lifetime=600.0)
INNER = bytes.fromhex("4500001c000100004011f9cc0a0000010a000002000100020008f7fc")  # IPv4/UDP, 28 bytes


class Node:
    """An enrolled node: its own keys, a bus client, and the KeyRing the agent would hold."""

    def __init__(self, tmp: Path, join: str, context: object) -> None:
        self.state = StateDir(tmp)
        info = enroll(self.state, JoinString.decode(join), context=context)  # type: ignore[arg-type]
        self.name = info.node
        self.identity = load_signing_key(self.state.path / "identity.key")
        self.client = Client(info.endpoints[0], self.state.keypair(), info.server_key.encode(), timeout=5.0)
        self.ring = KeyRing(self.name, self.identity, time.time(), timing=TIMING)
        self.refresh_view()
        self.ring.on_connect(time.time())
        self.replies: list[Message | BusError] = []

    def refresh_view(self) -> None:
        """Take the netmap again and give the ring its peers' identity keys, as the agent does on each change."""
        self.view = self._snapshot().view
        self.ring.set_peers({n: p.sign_key for n, p in self.view.peers.items()}, time.time())

    def _snapshot(self) -> Snapshot:
        """The node's view (which also marks it online)."""
        snapshot = _let_in(self.client, self.name, "fanout", SnapshotRequest())
        assert isinstance(snapshot, Snapshot)
        return snapshot

    def exchange(self) -> None:
        """One agent tick: send what the ring asks for, hand back the answers."""
        for request in self.ring.tick(time.time()):
            try:
                reply: Message | BusError = self.client.request("keydist", request)
            except BusError as exc:
                reply = exc
            self.replies.append(reply)
            self.ring.on_reply(request, reply, time.time())

    def take_pushes(self, timeout: float) -> list[PeerKeyUpdate]:
        taken = []
        deadline = time.monotonic() + timeout
        while (push := self.client.next_push(max(0.0, deadline - time.monotonic()))) is not None:
            if push[0] == "keydist" and isinstance(push[1], PeerKeyUpdate):
                taken.append(push[1])
                self.ring.on_push(push[1], time.time())
            if time.monotonic() >= deadline:
                break
        return taken

    def publish_raw(self, **change: object) -> Message:
        """A publication of the current key, altered by *change* (which the signature does not cover)."""
        key = self.ring.own.newest
        fields = {"epoch": key.epoch, "public_key": key.public, "not_before": key.not_before,
                  "expires": key.expires, "signature": key.signature} | change
        return self.client.request("keydist", PublishKey(**fields))

    def close(self) -> None:
        self.client.close()


def _let_in(client: Client, name: str, service: str, request: Message) -> Message:
    """A just-enrolled node's first request: the broker may need a moment to know its key (FORBIDDEN meanwhile)."""
    last: RemoteError | None = None
    for _ in range(50):
        try:
            return client.request(service, request)
        except RemoteError as exc:
            if exc.code != errors.FORBIDDEN:
                raise
            last = exc
            time.sleep(0.2)
    raise AssertionError(f"{name} was never let in: {last}")


def wait_all_online(nodes: list[Node]) -> None:
    """Presence is written in batches (every 0.25 s); the tests start from nodes every peer sees online."""

    def all_online() -> bool:
        for node in nodes:
            node.refresh_view()
        return all(p.online for node in nodes for p in node.view.peers.values())

    assert wait_until(all_online, 10), "the nodes never showed online"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoterieServer]:
    srv = CoterieServer(tmp_path_factory.mktemp("keydist"), presence_timeout=120.0).start(timeout=90.0)
    yield srv
    srv.stop()


_tests = itertools.count(1)


@pytest.fixture
def nodes(server: CoterieServer, tmp_path: Path) -> Iterator[dict[str, Node]]:
    """Each test its own two VPNs and three nodes (t<i>-n1 ...) on the module's server."""
    i = next(_tests)
    a, b = f"t{i}-a", f"t{i}-b"
    server.mutate(VpnCreate, name=a, subnet=f"10.{i}.1.0/24")
    server.mutate(VpnCreate, name=b, subnet=f"10.{i}.2.0/24")
    names = {"n1": a, "n2": a, "n3": b}
    joins = {label: server.add_node(f"t{i}-{label}", [vpn]) for label, vpn in names.items()}
    context = shared()
    made = {label: Node(tmp_path / label, join, context) for label, join in joins.items()}
    for node in made.values():  # everyone enrolled: every netmap now holds its peers' identity keys
        node.refresh_view()
        assert all(p.sign_key for p in node.view.peers.values())
    wait_all_online(list(made.values()))
    yield made
    for node in made.values():
        node.close()
    context.term()


def _ready(nodes: dict[str, Node], names: list[str], seconds: float) -> None:
    """Tick the named nodes (taking pushes between ticks) for *seconds*."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name in names:
            nodes[name].exchange()
            nodes[name].take_pushes(0.05)


def test_co_members_exchange_keys_and_their_sas_carry_packets(nodes: dict[str, Node]) -> None:
    n1, n2 = nodes["n1"], nodes["n2"]
    n1.exchange()  # publishes; n2 is online, so keydist pushes it there
    published = [r for r in n1.replies if isinstance(r, KeyPublished)]
    assert published and published[0].fresh and published[0].relayed == 1
    pushes = n2.take_pushes(5.0)
    assert [p.key.node for p in pushes] == [n1.name]
    assert pushes[0].key.epoch == n1.ring.own.newest.epoch
    n2.exchange()  # publishes (pushed to n1) and fetches n1's key
    fetched = [r for r in n2.replies if isinstance(r, PeerKeys)]
    assert fetched and {k.node for k in fetched[0].keys} == {n1.name}
    assert n1.take_pushes(5.0), "n1 hears of n2's key"
    _ready(nodes, ["n1", "n2"], TIMING.lead + 0.5)
    for sender, receiver in ((n1, n2), (n2, n1)):
        sa = sender.ring.outbound(receiver.name, time.time())
        assert sa is not None, f"{sender.name} has no SA for {receiver.name}"
        opened = receiver.ring.spi_table.open(sa.seal(INNER))
        assert isinstance(opened, Opened) and bytes(opened.inner) == INNER
        assert receiver.ring.peer_of(sa.spi) == sender.name


def test_a_key_published_before_a_peers_presence_is_written_still_reaches_it(
    nodes: dict[str, Node], server: CoterieServer, tmp_path: Path
) -> None:
    """The agent fetches every key right after its snapshot; its presence is written a moment later.

    A key stored in between was in neither that fetch nor any push (keydist pushed only to peers shown
    online), and its owner began sealing with it: the node dropped those packets as unknown SPIs.
    """
    n1 = nodes["n1"]
    vpn = next(iter(n1.view.vpns))
    join = JoinString.decode(server.add_node(f"{n1.name}-late", [vpn]))
    state = StateDir(tmp_path / "late")
    info = enroll(state, join, context=shared())
    late = Client(info.endpoints[0], state.keypair(), info.server_key.encode(), timeout=5.0)
    try:
        assert isinstance(_let_in(late, info.node, "keydist", FetchPeerKeys()), PeerKeys)
        n1.refresh_view()
        assert n1.view.peers[info.node].online is False, "no snapshot, no heartbeat: not shown online"
        n1.ring.own.new_epoch(time.time())
        n1.exchange()
        assert [r.relayed for r in n1.replies if isinstance(r, KeyPublished)][-1] == 2  # n2 and the new node
        epochs = set()
        deadline = time.monotonic() + 5.0
        while n1.ring.own.newest.epoch not in epochs and (push := late.next_push(0.2)) is not None:
            assert push[0] == "keydist" and isinstance(push[1], PeerKeyUpdate) and push[1].key.node == n1.name
            epochs.add(push[1].key.epoch)
            assert time.monotonic() < deadline
        assert n1.ring.own.newest.epoch in epochs, "the new key was pushed to the node not yet shown online"
    finally:
        late.close()


def test_keys_never_reach_a_node_that_shares_no_vpn(nodes: dict[str, Node]) -> None:
    n1, n3 = nodes["n1"], nodes["n3"]
    n1.exchange()
    assert n3.take_pushes(2.0) == []
    for ask in (FetchPeerKeys(), FetchPeerKeys(peers=[n1.name, nodes["n2"].name])):
        reply = n3.client.request("keydist", ask, expect=PeerKeys)
        assert isinstance(reply, PeerKeys) and reply.keys == []
    # And the other way: n3's key reaches neither n1 nor n2.
    n3.exchange()
    assert [r.relayed for r in n3.replies if isinstance(r, KeyPublished)] == [0]
    reply = n1.client.request("keydist", FetchPeerKeys(peers=[n3.name]), expect=PeerKeys)
    assert isinstance(reply, PeerKeys) and reply.keys == []


def test_in_a_hub_spoke_vpn_spokes_get_the_hub_keys_only(server: CoterieServer, tmp_path: Path) -> None:
    """Trust is the netmap's peer relation: two spokes share a VPN but never see each other."""
    server.mutate(VpnCreate, name="hs", subnet="10.200.0.0/24", topology="hub-spoke")
    joins = {name: server.add_node(name, ["hs"]) for name in ("hs-s1", "hs-s2", "hs-hub")}
    server.mutate(MemberRemove, node="hs-hub", vpn="hs")
    server.mutate(MemberAdd, node="hs-hub", vpn="hs", role="hub")
    context = shared()
    made = {name: Node(tmp_path / name, join, context) for name, join in joins.items()}
    try:
        wait_all_online(list(made.values()))
        s1, s2, hub = made["hs-s1"], made["hs-s2"], made["hs-hub"]
        s1.exchange()
        assert [r.relayed for r in s1.replies if isinstance(r, KeyPublished)] == [1]
        assert [p.key.node for p in hub.take_pushes(5.0)] == [s1.name]
        assert s2.take_pushes(1.0) == []
        reply = s2.client.request("keydist", FetchPeerKeys(peers=[s1.name]), expect=PeerKeys)
        assert isinstance(reply, PeerKeys) and reply.keys == []
        hub.exchange()
        assert [p.key.node for p in s2.take_pushes(5.0)] == [hub.name]
    finally:
        for node in made.values():
            node.close()
        context.term()


def test_forged_stale_and_expired_keys_are_refused(nodes: dict[str, Node], server: CoterieServer) -> None:
    n1 = nodes["n1"]
    n1.exchange()
    key = n1.ring.own.newest
    cases = {
        "another identity": ({"signature": SigningKey.generate().sign(
            publication_payload(n1.name, key.epoch + 1, key.public, key.not_before, key.expires)).signature,
            "epoch": key.epoch + 1}, errors.BAD_SIGNATURE),
        "altered expiry": ({"expires": key.expires + 1}, errors.BAD_SIGNATURE),
        "another key in a held epoch": ({"public_key": bytes(32)}, errors.BAD_SIGNATURE),
    }
    for label, (change, code) in cases.items():
        with pytest.raises(RemoteError) as refused:
            n1.publish_raw(**change)
        assert refused.value.code == code, label
    now = int(time.time())
    for (epoch, not_before, expires), code in {
        (key.epoch - 1, now, now + 60): errors.STALE_EPOCH,  # older than the held epoch
        (key.epoch + 5, now - 120, now - 60): errors.EXPIRED,
    }.items():
        signature = n1.identity.sign(publication_payload(n1.name, epoch, key.public, not_before, expires)).signature
        with pytest.raises(RemoteError) as refused:
            n1.publish_raw(epoch=epoch, not_before=not_before, expires=expires, signature=signature)
        assert refused.value.code == code
    # A republish of the held key is fine (agents republish periodically); an operator may not publish.
    assert isinstance(n1.publish_raw(), KeyPublished)
    with pytest.raises(RemoteError) as refused:
        server.operator.request("keydist", FetchPeerKeys())
    assert refused.value.code == errors.FORBIDDEN
    # Nothing refused was relayed: n2 holds only the genuine key.
    reply = nodes["n2"].client.request("keydist", FetchPeerKeys(), expect=PeerKeys)
    assert isinstance(reply, PeerKeys) and [(k.node, k.epoch) for k in reply.keys] == [(n1.name, key.epoch)]


def test_removing_a_membership_stops_the_relay_at_once(nodes: dict[str, Node], server: CoterieServer) -> None:
    n1, n2 = nodes["n1"], nodes["n2"]
    n1.exchange()
    assert n2.take_pushes(5.0)
    server.mutate(MemberRemove, node=n2.name, vpn=next(iter(n2.view.vpns)))
    n1.ring.own.new_epoch(time.time())  # a new epoch after the removal
    n1.exchange()
    assert [r.relayed for r in n1.replies if isinstance(r, KeyPublished)][-1] == 0
    assert n2.take_pushes(2.0) == []
    reply = n2.client.request("keydist", FetchPeerKeys(), expect=PeerKeys)
    assert isinstance(reply, PeerKeys) and reply.keys == []
    # n2's agent learns of the removal from its netmap and drops n1's SAs itself.
    assert n2.ring.set_peers({}, time.time()) == [n1.name]
    assert n2.ring.spi_table.open(bytes(64)) is DropReason.UNKNOWN_SPI and len(n2.ring.spi_table) == 0


def test_a_restarted_keydist_is_complete_again_after_one_republish(
    nodes: dict[str, Node], server: CoterieServer
) -> None:
    n1, n2 = nodes["n1"], nodes["n2"]
    n1.exchange()
    n2.exchange()
    old = server.pids()["keydist"]
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: server.all_up() and server.pids().get("keydist") not in (None, old), 60, interval=0.5)
    reply = n2.client.request("keydist", FetchPeerKeys(), expect=PeerKeys)
    assert isinstance(reply, PeerKeys) and reply.keys == [], "keydist keeps keys in memory only"
    n1.ring.on_connect(time.time())  # what the republish timer (REPUBLISH_INTERVAL) also does
    n1.exchange()
    assert [r.fresh for r in n1.replies if isinstance(r, KeyPublished)][-1] is True
    reply = n2.client.request("keydist", FetchPeerKeys(), expect=PeerKeys)
    assert isinstance(reply, PeerKeys) and [k.node for k in reply.keys] == [n1.name]
