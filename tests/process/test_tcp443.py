"""ESP over TLS on loopback (RELIABILITY.md D17): the standard ssl client, data both ways, stalls, redials."""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from nodeagent.tcp443 import Route, TcpPaths
from nodeagent.tlsstream import PREFIX, Framer, frame
from tests.conftest import wait_until
from tests.helpers.server import free_port


def esp(n: int, size: int = 100) -> bytes:
    """A stand-in ESP packet: a non-zero SPI, a counter, padding (the paths never look inside)."""
    return b"\x00\x00\x10\x01" + n.to_bytes(4, "big") + os.urandom(size)


@pytest.fixture
def paths() -> Iterator[list[TcpPaths]]:
    made: list[TcpPaths] = []
    yield made
    for p in made:
        p.close()


def listening(made: list[TcpPaths], **kw: object) -> TcpPaths:
    p = TcpPaths(listen=("127.0.0.1", 0), **kw)  # type: ignore[arg-type]
    made.append(p)
    return p


def receive(p: TcpPaths, count: int, timeout: float = 15.0) -> list[tuple[bytes, int]]:
    got: list[tuple[bytes, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        if select.select([p], [], [], 0.2)[0]:
            got += p.recv_batch(64)
    return got


class RawClient:
    """The standard library's blocking ssl client, speaking RFC 9329 by hand."""

    def __init__(self, port: int) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
        self.sock.sendall(PREFIX)
        self.framer = Framer()
        self.pending: list[bytes] = []

    def send(self, message: bytes) -> None:
        self.sock.sendall(frame(message))

    def recv(self, count: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.pending) < count and time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            self.pending += self.framer.feed(data)
        got, self.pending = self.pending[:count], self.pending[count:]
        return got

    def close(self) -> None:
        self.sock.close()


def test_standard_ssl_client_handshakes_and_exchanges_esp(paths: list[TcpPaths]) -> None:
    server = listening(paths)
    client = RawClient(server.port or 0)
    try:
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert client.sock.getpeercert(binary_form=True), "the server presents a (self-signed) certificate"
        client.send(esp(1))
        [(packet, stream_id)] = receive(server, 1)
        assert packet[4:8] == (1).to_bytes(4, "big")
        assert not server.send("alice", esp(2)), "no route and no stream yet: refused and counted"
        server.set_routes({"alice": Route()})
        server.bind(stream_id, "alice")  # the data plane authenticated the packet: answer on its stream
        answer = esp(3, 1300)
        assert server.send("alice", answer)
        assert client.recv(1) == [answer]
        assert server.counters["out_no_route"] == 1
    finally:
        client.close()


def test_stream_client_and_server_carry_data_both_ways(paths: list[TcpPaths]) -> None:
    a = listening(paths, node="a")
    b = TcpPaths(node="b")
    paths.append(b)
    b.set_routes({"a": Route(address=("127.0.0.1", a.port or 0))})
    a.set_routes({"b": Route()})
    outbound = [esp(i, 1400) for i in range(300)]
    for packet in outbound:
        assert b.send("a", packet)  # queued while connecting, then written in order
    arrived = receive(a, len(outbound))
    assert [p for p, _ in arrived] == outbound
    stream_id = arrived[0][1]
    assert {s for _, s in arrived} == {stream_id}
    a.bind(stream_id, "b")
    back = [esp(i, 700) for i in range(300)]
    for packet in back:
        assert a.send("b", packet)
    assert [p for p, _ in receive(b, len(back))] == back
    status = a.status()
    assert [s["hello"] for s in status["streams"]] == ["b"], "the dialler says hello with its name"


def test_a_stalled_reader_does_not_block_another_stream(paths: list[TcpPaths]) -> None:
    """DERP TestSendFreeze: one peer stops reading; the other keeps getting every packet."""
    server = listening(paths)
    server.set_routes({"stalled": Route(), "live": Route()})
    stalled, live = RawClient(server.port or 0), RawClient(server.port or 0)
    try:
        for name, client in (("stalled", stalled), ("live", live)):
            client.send(esp(0))
            [(_, stream_id)] = receive(server, 1)
            server.bind(stream_id, name)
        received: list[bytes] = []
        stop = threading.Event()

        def read_live() -> None:
            while not stop.is_set():
                received.extend(live.recv(1, timeout=0.2))

        reader = threading.Thread(target=read_live, daemon=True)
        reader.start()
        sent_live: list[bytes] = []
        stalled_refused = 0
        for round_ in range(400):  # at most 400 x 100 x 1.4 kB = 56 MB towards the stalled peer
            for i in range(100):
                if not server.send("stalled", esp(i, 1400)):
                    stalled_refused += 1
            batch = [esp(round_ * 100 + i, 1400) for i in range(20)]
            for packet in batch:
                assert server.send("live", packet), "the live stream's buffer must not fill"
            sent_live += batch
            want = len(sent_live)
            assert wait_until(lambda want=want: len(received) >= want, 15.0), "the live stream stalled too"
            if stalled_refused > 1000:
                break
        stop.set()
        reader.join(timeout=5)
        assert stalled_refused > 1000, "the stalled stream's buffer never filled"
        assert received == sent_live
        streams = {s["id"]: s for s in server.status()["streams"]}
        assert streams[server.status()["bound"]["stalled"]]["dropped_full"] == stalled_refused
    finally:
        stalled.close()
        live.close()


def test_malformed_length_closes_only_that_stream(paths: list[TcpPaths]) -> None:
    server = listening(paths)
    bad, good = RawClient(server.port or 0), RawClient(server.port or 0)
    try:
        good.send(esp(1))
        assert len(receive(server, 1)) == 1
        bad.sock.sendall(b"\x00\x01garbage")  # a length of 1 cannot even hold itself
        assert wait_until(lambda: server.loop.counters["framing_errors"] == 1, 10.0)
        bad.sock.settimeout(5)
        with _eof_or_error():
            assert bad.sock.recv(100) == b""
        good.send(esp(2))
        assert [p[4:8] for p, _ in receive(server, 1)] == [(2).to_bytes(4, "big")]
    finally:
        bad.close()
        good.close()


class _eof_or_error:
    """The closed stream ends with EOF or a TLS/socket error, both fine."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, value: BaseException | None, tb: object) -> bool:
        return kind is None or issubclass(kind, (ConnectionError, ssl.SSLError, OSError))


def test_client_redials_with_backoff_after_the_server_restarts(paths: list[TcpPaths]) -> None:
    port = free_port()
    a = TcpPaths(listen=("127.0.0.1", port))
    b = TcpPaths()
    paths.append(b)
    b.set_routes({"a": Route(address=("127.0.0.1", port))})
    assert b.send("a", esp(1))
    assert len(receive(a, 1)) == 1
    a.close()
    assert wait_until(lambda: not b.status()["streams"] or b.status()["streams"][0]["state"] != "open", 10.0)
    a2 = TcpPaths(listen=("127.0.0.1", port))
    paths.append(a2)

    def delivered() -> bool:
        b.send("a", esp(2))
        return bool(a2.recv_batch(64)) or bool(receive(a2, 1, timeout=0.3))

    assert wait_until(delivered, 20.0, interval=0.2), "the client never redialled"


def test_keepalives_hold_a_quiet_stream_and_a_silent_one_is_closed(paths: list[TcpPaths]) -> None:
    a = listening(paths)
    a.loop.idle_timeout = 1.5  # nothing received for this long: the peer is gone
    b = TcpPaths(node="b")
    paths.append(b)
    b.loop.keepalive_interval = 0.3
    b.set_routes({"a": Route(address=("127.0.0.1", a.port or 0))})
    assert b.send("a", esp(1)) and len(receive(a, 1)) == 1
    silent = RawClient(a.port or 0)  # says nothing after the prefix
    try:
        assert wait_until(lambda: len(a.loop.streams) == 2, 10.0)
        assert wait_until(lambda: len(a.loop.streams) == 1, 10.0), "the silent stream was not closed"
        time.sleep(2.0)  # > idle_timeout: only keepalives flow on b's stream
        [survivor] = a.status()["streams"]
        assert survivor["hello"] == "b" and survivor["state"] == "open"
        assert survivor["messages_in"] >= 4, "hello, one ESP packet and keepalives"
    finally:
        silent.close()


def test_a_slow_consumer_pauses_reading_instead_of_dropping(paths: list[TcpPaths]) -> None:
    """TLS already carried these bytes: when the data plane falls behind, stop reading and let TCP push back."""
    a = listening(paths)
    b = TcpPaths()
    paths.append(b)
    b.set_routes({"a": Route(address=("127.0.0.1", a.port or 0))})
    count = a.inbound.limit * 2
    sent = [esp(i, 1000) for i in range(count)]

    def produce() -> None:
        deadline = time.monotonic() + 120
        for packet in sent:
            while not b.send("a", packet) and time.monotonic() < deadline:
                time.sleep(0.001)  # b's buffer is full because a stopped reading: wait, as a data plane queue does

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    assert wait_until(lambda: a.loop.counters["reads_paused"] > 0, 20.0), "the consumer never fell behind"
    time.sleep(1.0)  # the consumer stays away a while longer
    got = receive(a, count, timeout=120.0)
    producer.join(timeout=10)
    assert len(got) == count, (len(got), a.status(), dict(a.loop.counters), b.status(), len(a.loop._paused))
    assert [p for p, _ in got] == sent
    assert a.inbound.dropped == 0
