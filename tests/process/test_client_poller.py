"""bus.client.ClientPoller: many clients in one loop, over a real broker, and no reply left behind.

The poller waits in epoll on each socket's ZMQ_FD, which only says that the socket has commands to
process: a message can be queued while that descriptor stays quiet (after a send processed the
command that announced it). These tests send and receive through many clients in rounds, as the
benchmark's simulated agents do, and count every reply and push.
"""

from __future__ import annotations

import time

from bus.client import Client, ClientPoller
from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.messages.common import Health, HealthRequest
from tests.conftest import BusHarness
from tests.helpers.messages import Ack, Note, PushTo

CLIENTS = 24
ROUNDS = 15
ROUND_TIMEOUT = 10.0


def _drain_until(poller: ClientPoller, wanted: int, timeout: float) -> dict[Client, list[object]]:
    """Poll and drain (as the poller requires) until *wanted* messages came or *timeout* passed."""
    got: dict[Client, list[object]] = {}
    count = 0
    deadline = time.monotonic() + timeout
    while count < wanted and time.monotonic() < deadline:
        clients, _ = poller.poll(0.05)
        for client in clients:
            for incoming in client.incoming():
                got.setdefault(client, []).append(incoming.message)
                count += 1
    return got


def test_every_reply_to_requests_sent_in_rounds_is_seen(bus: BusHarness) -> None:
    bus.thread_worker("echo")
    assert bus.wait_workers("echo", 1)
    clients = [bus.client(timeout=3.0) for _ in range(CLIENTS)]
    assert all(client.heartbeat() for client in clients)  # connected: a non-blocking send needs the connection
    poller = ClientPoller()
    try:
        for client in clients:
            poller.add(client)
        for round_ in range(ROUNDS):
            started = {client: client.start("echo", HealthRequest()) for client in clients}
            assert all(started.values()), f"round {round_}: a request could not be sent"
            got = _drain_until(poller, CLIENTS, ROUND_TIMEOUT)
            missing = [i for i, client in enumerate(clients) if len(got.get(client, [])) != 1]
            assert not missing, f"round {round_}: clients {missing} saw no reply (or more than one)"
            assert all(isinstance(replies[0], Health) for replies in got.values())
    finally:
        poller.close()


def test_pushes_to_clients_that_send_nothing_are_seen(bus: BusHarness) -> None:
    """No send marks these clients: only their descriptors can say that a push came."""
    bus.thread_worker("vault")
    assert bus.wait_workers("vault", 1)
    keys = []
    for i in range(CLIENTS):
        keypair = KeyPair.generate()
        bus.registry.add(Identity(Role.NODE, f"n{i}", keypair.public_text))
        keys.append(keypair)
    listeners = [bus.client(keypair) for keypair in keys]
    assert all(listener.heartbeat() for listener in listeners)  # connected and known to the broker
    poller = ClientPoller()
    operator = bus.client()
    try:
        for listener in listeners:
            poller.add(listener)
        assert _drain_until(poller, 1, 0.3) == {}, "nothing was pushed yet"
        for round_ in range(3):
            for keypair in keys:
                assert isinstance(operator.request("vault", PushTo(key=keypair.public_text, text=f"r{round_}")), Ack)
            got = _drain_until(poller, CLIENTS, ROUND_TIMEOUT)
            assert {listener: [Note(text=f"r{round_}")] for listener in listeners} == got, f"round {round_}"
    finally:
        poller.close()


def test_a_client_removed_reconnected_and_added_again_is_followed(bus: BusHarness) -> None:
    """A reconnect makes a new socket (a new descriptor): removed before, added after, it is polled again."""
    bus.thread_worker("echo")
    assert bus.wait_workers("echo", 1)
    client, other = bus.client(timeout=3.0), bus.client(timeout=3.0)
    assert client.heartbeat() and other.heartbeat()
    poller = ClientPoller()
    try:
        poller.add(client)
        poller.add(other)
        assert client.start("echo", HealthRequest())
        assert list(_drain_until(poller, 1, ROUND_TIMEOUT)) == [client]
        poller.remove(client)
        poller.remove(client)  # twice is harmless
        client.backoff.base = client.backoff.cap = 0.01  # reconnect at once
        client.reconnect()
        poller.add(client)
        deadline = time.monotonic() + ROUND_TIMEOUT
        while client.start("echo", HealthRequest()) is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the new connection comes up after its backoff
        got = _drain_until(poller, 1, ROUND_TIMEOUT)
        assert list(got) == [client] and isinstance(got[client][0], Health)
        assert other.start("echo", HealthRequest())
        assert list(_drain_until(poller, 1, ROUND_TIMEOUT)) == [other]
    finally:
        poller.close()
