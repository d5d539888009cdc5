"""The relay through the server (issue 6): real server processes, enrolled nodes' identity keys, TLS on loopback.

Authenticated relaying works both ways; a wrong signature, an unknown name
and an anonymous stream are refused; a node that shares no VPN gets
nothing, and removing a member stops relaying at once; a stalled receiver
does not hold up another pair.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from bus.messages.auth import JoinString
from bus.messages.common import Health, HealthRequest
from bus.messages.datastore import MemberRemove, VpnCreate
from bus.signing import load_signing_key
from nodeagent.agent import enroll
from nodeagent.state import StateDir
from nodeagent.tcp443 import RelayClient, RelaySettings, Route, TcpPaths
from nodeagent.tlsstream import (
    AUTH,
    CHALLENGE,
    PREFIX,
    REFUSED,
    RELAY,
    WELCOME,
    Framer,
    Loop,
    auth_payload,
    control,
    ensure_certificate,
    frame,
    pack_named,
    parse_control,
    server_context,
)
from services.relay.relay import RelayServer
from tests.conftest import wait_until
from tests.helpers.server import CoterieServer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoterieServer]:
    tmp = tmp_path_factory.mktemp("relay")
    srv = CoterieServer(tmp).start(timeout=120)  # a loaded shared machine starts six processes slowly
    try:
        srv.mutate(VpnCreate, name="v", subnet="10.61.0.0/24")
        srv.mutate(VpnCreate, name="w", subnet="10.62.0.0/24")
        yield srv
    finally:
        srv.stop()


def enrolled(server: CoterieServer, tmp: Path, name: str, vpns: list[str]) -> SigningKey:
    """Add and enroll node *name*; its Ed25519 identity key, as the agent holds it."""
    state = StateDir(tmp / name)
    enroll(state, JoinString.decode(server.add_node(name, vpns)))
    return load_signing_key(state.path / "identity.key")


@pytest.fixture
def clients() -> Iterator[list[RelayClient]]:
    made: list[RelayClient] = []
    yield made
    for client in made:
        client.close()


def relay_client(server: CoterieServer, made: list[RelayClient], name: str, key: SigningKey) -> RelayClient:
    client = RelayClient(RelaySettings("127.0.0.1", server.relay_port, name, key))
    made.append(client)
    return client


def esp(n: int, size: int = 200) -> bytes:
    return b"\x00\x00\x20\x02" + n.to_bytes(4, "big") + os.urandom(size)


def relay_counters(server: CoterieServer) -> dict[str, int]:
    health = server.request(HealthRequest(), service="relay")
    assert isinstance(health, Health)
    return health.counters


def drain(client: RelayClient, want: int, timeout: float) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    wait_until(lambda: got.extend(client.receive(256)) or len(got) >= want, timeout, interval=0.02)
    return got


def test_relay_is_part_of_the_server(server: CoterieServer) -> None:
    counters = relay_counters(server)
    assert wait_until(lambda: relay_counters(server).get("listening") == 1, 15.0), counters
    assert (server.home / "keys" / "relay-tls.crt").exists(), "the self-signed certificate is made at first start"


def test_authenticated_relaying_both_ways(server: CoterieServer, tmp_path: Path, clients: list[RelayClient]) -> None:
    a = relay_client(server, clients, "ra", enrolled(server, tmp_path, "ra", ["v"]))
    b = relay_client(server, clients, "rb", enrolled(server, tmp_path, "rb", ["v"]))
    assert wait_until(lambda: a.authenticated and b.authenticated, 15.0), (a.refused, b.refused)
    to_b = [esp(i, 1400) for i in range(200)]
    assert wait_until(lambda: a.send_to("rb", esp(0)) and bool(drain(b, 1, 0.5)), 10.0), "relay never forwarded"
    for packet in to_b:
        assert a.send_to("rb", packet)
    got = drain(b, len(to_b), 15.0)
    assert got == [("ra", p) for p in to_b], "every packet, in order, named by its authenticated source"
    to_a = [esp(i, 600) for i in range(200)]
    for packet in to_a:
        assert b.send_to("ra", packet)
    assert drain(a, len(to_a), 15.0) == [("rb", p) for p in to_a]
    assert relay_counters(server)["relayed"] >= 401


def test_wrong_signature_and_unknown_node_are_refused(
    server: CoterieServer, tmp_path: Path, clients: list[RelayClient]
) -> None:
    enrolled(server, tmp_path, "rc", ["v"])
    before = relay_counters(server)
    forger = relay_client(server, clients, "rc", SigningKey.generate())  # right name, wrong key
    stranger = relay_client(server, clients, "nobody", SigningKey.generate())
    assert wait_until(lambda: forger.refused == "bad signature" and stranger.refused == "unknown node", 15.0)
    assert not forger.authenticated and not stranger.authenticated
    assert not forger.send_to("rc", esp(1)), "an unauthenticated client cannot send"
    after = relay_counters(server)
    assert after.get("refused_bad_signature", 0) > before.get("refused_bad_signature", 0)
    assert after.get("refused_unknown", 0) > before.get("refused_unknown", 0)


def test_a_node_that_shares_no_vpn_gets_nothing(
    server: CoterieServer, tmp_path: Path, clients: list[RelayClient]
) -> None:
    d = relay_client(server, clients, "rd", enrolled(server, tmp_path, "rd", ["v"]))
    e = relay_client(server, clients, "re", enrolled(server, tmp_path, "re", ["w"]))
    assert wait_until(lambda: d.authenticated and e.authenticated, 15.0)
    before = relay_counters(server).get("dropped_not_peers", 0)
    for i in range(20):
        assert e.send_to("rd", esp(i))  # accepted by the stream; dropped by the relay
        assert d.send_to("re", esp(i))
    assert wait_until(lambda: relay_counters(server).get("dropped_not_peers", 0) >= before + 40, 10.0)
    time.sleep(0.5)
    assert d.receive(256) == [] and e.receive(256) == []


def test_removing_a_member_stops_relaying(server: CoterieServer, tmp_path: Path, clients: list[RelayClient]) -> None:
    f = relay_client(server, clients, "rf", enrolled(server, tmp_path, "rf", ["v"]))
    g = relay_client(server, clients, "rg", enrolled(server, tmp_path, "rg", ["v"]))
    assert wait_until(lambda: f.authenticated and g.authenticated, 15.0)
    assert wait_until(lambda: f.send_to("rg", esp(0)) and bool(drain(g, 1, 0.5)), 10.0)
    server.mutate(MemberRemove, node="rg", vpn="v")
    removed_at = time.monotonic()

    def cut() -> bool:
        f.send_to("rg", esp(1))
        return drain(g, 1, 0.2) == []

    assert wait_until(cut, 10.0, interval=0.1)
    assert time.monotonic() - removed_at < 5.0, "the relay must follow the datastore within seconds"


class RawNode:
    """A node speaking the relay protocol by hand with the standard ssl client (blocking)."""

    def __init__(self, port: int) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
        self.sock.sendall(PREFIX)
        self.framer = Framer()
        self.pending: list[bytes] = []

    def next(self, timeout: float = 10.0) -> bytes | None:
        deadline = time.monotonic() + timeout
        while not self.pending and time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLError, OSError):
                return None
            if not data:
                return None
            self.pending += self.framer.feed(data)
        return self.pending.pop(0) if self.pending else None

    def authenticate(self, name: str, key: SigningKey) -> None:
        kind, challenge = parse_control(self.next() or b"")
        assert kind == CHALLENGE
        self.sock.sendall(frame(control(AUTH, pack_named(name, key.sign(auth_payload(challenge, name)).signature))))
        assert parse_control(self.next() or b"")[0] == WELCOME

    def close(self) -> None:
        self.sock.close()


def test_the_relay_cannot_be_used_anonymously(
    server: CoterieServer, tmp_path: Path, clients: list[RelayClient]
) -> None:
    h = relay_client(server, clients, "rh", enrolled(server, tmp_path, "rh", ["v"]))
    assert wait_until(lambda: h.authenticated, 15.0)
    raw = RawNode(server.relay_port)
    try:
        assert parse_control(raw.next() or b"")[0] == CHALLENGE
        raw.sock.sendall(frame(control(RELAY, pack_named("rh", esp(1)))))  # no AUTH: addressed frame first
        kind, reason = parse_control(raw.next() or b"")
        assert (kind, reason) == (REFUSED, b"authenticate first")
        assert raw.next(timeout=5.0) is None, "the relay closes the stream after refusing"
    finally:
        raw.close()
    bare = RawNode(server.relay_port)
    try:
        bare.next()
        bare.sock.sendall(frame(esp(2)))  # bare ESP without authentication
        assert parse_control(bare.next() or b"")[0] == REFUSED
    finally:
        bare.close()
    time.sleep(0.3)
    assert h.receive(256) == [], "nothing reached the node"
    assert relay_counters(server)["refused_anonymous"] >= 2


def test_a_stalled_receiver_does_not_hold_up_another_pair(
    server: CoterieServer, tmp_path: Path, clients: list[RelayClient]
) -> None:
    sender = relay_client(server, clients, "rs", enrolled(server, tmp_path, "rs", ["v"]))
    live = relay_client(server, clients, "rl", enrolled(server, tmp_path, "rl", ["v"]))
    stalled_key = enrolled(server, tmp_path, "rt", ["v"])
    assert wait_until(lambda: sender.authenticated and live.authenticated, 15.0)
    stalled = RawNode(server.relay_port)
    try:
        stalled.authenticate("rt", stalled_key)  # then never reads again
        before = relay_counters(server).get("dropped_full", 0)
        received: list[tuple[str, bytes]] = []
        expected: list[tuple[str, bytes]] = []
        stop = threading.Event()
        reader = threading.Thread(
            target=lambda: [received.extend(drain(live, 10**9, 0.2)) for _ in iter(stop.is_set, True)], daemon=True
        )
        reader.start()
        for round_ in range(300):  # at most 300 x 100 x 1.4 kB = 42 MB towards the stalled node
            for i in range(100):
                sender.send_to("rt", esp(i, 1400))
            batch = [esp(round_ * 20 + i, 1400) for i in range(20)]
            for packet in batch:
                assert sender.send_to("rl", packet)
            expected += [("rs", p) for p in batch]
            want = len(expected)
            assert wait_until(lambda want=want: len(received) >= want, 15.0), "the live pair stalled too"
            if round_ % 10 == 9 and relay_counters(server).get("dropped_full", 0) > before + 500:
                break
        stop.set()
        reader.join(timeout=5)
        assert relay_counters(server).get("dropped_full", 0) > before + 500, "the stalled buffer never filled"
        assert received == expected
    finally:
        stalled.close()


def test_tcp_paths_send_through_the_relay_and_answer_on_it(server: CoterieServer, tmp_path: Path) -> None:
    """The data plane's view: Route(relay=True) to send; bind() to the relay stream to answer."""
    a_key, b_key = enrolled(server, tmp_path, "pa", ["v"]), enrolled(server, tmp_path, "pb", ["v"])
    a, b = TcpPaths(node="pa"), TcpPaths(node="pb")
    try:
        a.set_relay(RelaySettings("127.0.0.1", server.relay_port, "pa", a_key))
        b.set_relay(RelaySettings("127.0.0.1", server.relay_port, "pb", b_key))
        a.set_routes({"pb": Route(relay=True)})
        b.set_routes({"pa": Route()})  # b has no route of its own to pa: it answers where pa's packets came from
        assert wait_until(lambda: a.status()["relay"]["authenticated"] and b.status()["relay"]["authenticated"], 15.0)
        assert not b.send("pa", esp(0)), "nothing bound yet"
        first = esp(1)
        got: list[tuple[bytes, int]] = []
        assert wait_until(lambda: a.send("pb", first) and bool(got.extend(b.recv_batch(64)) or got), 10.0)
        packet, stream_id = got[0]
        assert packet == first and b.relay is not None and stream_id == b.relay.stream_id
        b.bind(stream_id, "pa")
        answer = esp(2, 1300)
        assert b.send("pa", answer)
        back: list[tuple[bytes, int]] = []
        assert wait_until(lambda: bool(back.extend(a.recv_batch(64)) or back), 10.0)
        assert back[0][0] == answer
    finally:
        a.close()
        b.close()


def test_a_stream_that_never_authenticates_is_closed(server: CoterieServer) -> None:
    raw = RawNode(server.relay_port)
    try:
        assert parse_control(raw.next() or b"")[0] == CHALLENGE
        began = time.monotonic()
        assert raw.next(timeout=30.0) is None, "the relay must close a silent unauthenticated stream"
        assert time.monotonic() - began < 25.0
    finally:
        raw.close()
    assert relay_counters(server).get("auth_timeout", 0) >= 1


def test_a_newer_stream_of_the_same_node_replaces_the_older(
    server: CoterieServer, tmp_path: Path, clients: list[RelayClient]
) -> None:
    key = enrolled(server, tmp_path, "ri", ["v"])
    sender = relay_client(server, clients, "rj", enrolled(server, tmp_path, "rj", ["v"]))
    old = relay_client(server, clients, "ri", key)
    assert wait_until(lambda: old.authenticated and sender.authenticated, 15.0)
    new = relay_client(server, clients, "ri", key)  # the agent restarted, or roamed
    assert wait_until(lambda: new.authenticated, 15.0)
    assert wait_until(lambda: old.client.last_error != "", 10.0), "the relay closes the older stream"
    old.close()  # a dead agent does not redial; this one would take the name back
    assert wait_until(lambda: sender.send_to("ri", esp(1)) and bool(drain(new, 1, 0.3)), 15.0)
    assert drain(old, 1, 0.3) == []


def test_unauthenticated_streams_are_capped(tmp_path: Path) -> None:
    """A connection flood fills at most max_pending slots; the rest are refused "busy" (relay logic alone)."""
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    ensure_certificate(cert, key)
    loop = Loop("relay-test").start()
    relay = RelayServer(loop, max_pending=2)
    listener = socket.create_server(("127.0.0.1", 0))
    loop.call_soon(lambda: loop.listen(listener, server_context(cert, key), lambda: relay))
    port = listener.getsockname()[1]
    waiting = [RawNode(port), RawNode(port)]
    try:
        for node in waiting:
            assert parse_control(node.next() or b"")[0] == CHALLENGE
        third = RawNode(port)
        waiting.append(third)
        assert parse_control(third.next() or b"") == (REFUSED, b"busy")
        waiting.pop(0).close()  # a slot frees when a pending stream goes
        assert wait_until(lambda: relay.pending == 1, 10.0)
        fourth = RawNode(port)
        waiting.append(fourth)
        assert parse_control(fourth.next() or b"")[0] == CHALLENGE
        assert relay.counters["refused_busy"] == 1
    finally:
        for node in waiting:
            node.close()
        loop.stop()
