"""A client backs off its reconnects: counted as new TCP connections to a listener that never answers.

The listener accepts and holds every connection without speaking ZMTP, so
the client's handshake never completes, each attempt times out, and the
client throws its socket away and opens a new one (the Lazy Pirate
pattern) after its backoff. Only lower bounds are asserted: a loaded
machine can only lengthen the gaps.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time

import pytest

from bus.client import Backoff, Client
from bus.errors import BusTimeout
from bus.keys import KeyPair

TIMEOUT = 0.3
RETRIES = 4


class Holder:
    """Accepts TCP connections on loopback, notes when each came, answers nothing."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[float] = []
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted.append(time.monotonic())
            self.held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        for conn in self.held:
            conn.close()
        self.listener.close()


@pytest.fixture
def holder():  # type: ignore[no-untyped-def]
    h = Holder()
    yield h
    h.close()


def test_reconnects_wait_a_growing_backoff(holder: Holder) -> None:
    backoff = Backoff(base=0.5, cap=4.0)
    client = Client(
        f"tcp://127.0.0.1:{holder.port}",
        KeyPair.generate(),
        KeyPair.generate().public,
        timeout=TIMEOUT,
        retries=RETRIES,
        backoff=backoff,
    )
    try:
        with pytest.raises(BusTimeout):
            client.request("fanout", _ping())
    finally:
        client.close()
    assert client.counters["reconnects"] == RETRIES + 1
    time.sleep(0.5)
    attempts = holder.accepted
    assert len(attempts) >= RETRIES + 1, f"expected a connection per attempt, got {len(attempts)}"
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # Attempt k+1 comes at least TIMEOUT plus half the k-th ceiling (0.5, 1, 2, 4 s) after attempt k.
    for gap, ceiling in zip(gaps, [0.5, 1.0, 2.0, 4.0], strict=False):
        assert gap >= TIMEOUT + ceiling / 2 - 0.05, f"gaps {gaps}: a reconnect came before its backoff"
    assert gaps[-1] > gaps[0], f"gaps {gaps} do not grow"


def test_a_crowd_of_clients_does_not_reconnect_in_step(holder: Holder) -> None:
    clients = [
        Client(f"tcp://127.0.0.1:{holder.port}", KeyPair.generate(), KeyPair.generate().public, timeout=0.2, retries=0)
        for _ in range(8)
    ]
    due = []  # each client's wait before its next connection, read as soon as its attempt failed
    try:
        for client in clients:
            with pytest.raises(BusTimeout):
                client.request("fanout", _ping())
            due.append(client.connecting_in)
    finally:
        for client in clients:
            client.close()
    assert all(0 < d <= 0.5 for d in due), due
    assert len({round(d, 3) for d in due}) > 4, f"reconnects scheduled in step: {due}"


def _ping():  # type: ignore[no-untyped-def]
    from bus.messages.common import Ping

    return Ping()
