"""Heartbeats with a stopped worker (RELIABILITY C4) and pushes to absent clients (C5)."""

from __future__ import annotations

import os
import signal
import threading
import time

from bus import constants as c
from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.messages.common import Health, HealthRequest
from tests.conftest import BusHarness, wait_until
from tests.helpers.messages import Ack, Note, PushTo


def test_stopped_worker_is_dropped_in_time_and_returns_without_restart(bus: BusHarness) -> None:
    worker = bus.process_worker("echo")
    assert bus.wait_workers("echo", 1)
    client = bus.client(timeout=3.0, retries=8)
    os.kill(worker.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(client.request("echo", HealthRequest())), daemon=True)
    thread.start()  # this request is in flight to the stopped worker
    bound = c.HEARTBEAT_INTERVAL * (c.HEARTBEAT_LIVENESS + 1) + 1.5
    assert bus.wait_workers("echo", 0, timeout=bound + 2)
    assert time.monotonic() - stopped_at <= bound, "the stopped worker was not marked down in time"
    os.kill(worker.pid, signal.SIGCONT)
    assert bus.wait_workers("echo", 1, timeout=10), "the worker did not come back after SIGCONT"
    thread.join(timeout=30)
    assert results and isinstance(results[0], Health), results
    assert results[0].pid == worker.pid, "answered by the same process: no restart"
    assert worker.poll() is None


def _node(bus: BusHarness, name: str) -> KeyPair:
    keypair = KeyPair.generate()
    bus.registry.add(Identity(Role.NODE, name, keypair.public_text))
    return keypair


def test_push_reaches_a_connected_client(bus: BusHarness) -> None:
    bus.thread_worker("vault")
    assert bus.wait_workers("vault", 1)
    node = _node(bus, "n1")
    listener = bus.client(node)
    assert listener.heartbeat()  # connected and known to the broker
    assert isinstance(bus.client().request("vault", PushTo(key=node.public_text, text="hello")), Ack)
    assert listener.next_push(5.0) == ("vault", Note(text="hello"))


def test_push_to_a_never_connected_client_waits_in_the_outbox(bus: BusHarness) -> None:
    bus.thread_worker("vault")
    assert bus.wait_workers("vault", 1)
    node = _node(bus, "n1")
    operator = bus.client()
    for i in range(3):
        operator.request("vault", PushTo(key=node.public_text, text=f"m{i}"))
    assert bus.broker is not None
    assert wait_until(lambda: bus.broker.counters["push_unroutable"] == 3, timeout=5)
    listener = bus.client(node)
    received = [listener.next_push(5.0) for _ in range(3)]
    assert [r[1] for r in received if r] == [Note(text=f"m{i}") for i in range(3)], "in order, none lost"


def test_push_to_a_client_that_went_away_is_delivered_after_reconnect(bus: BusHarness) -> None:
    bus.thread_worker("vault")
    assert bus.wait_workers("vault", 1)
    node = _node(bus, "n1")
    first = bus.client(node)
    assert first.heartbeat()
    first.close()
    time.sleep(0.5)  # let the broker's pipe to the closed connection terminate
    assert bus.broker is not None
    before = bus.broker.counters["push_unroutable"]
    bus.client().request("vault", PushTo(key=node.public_text, text="while away"))
    assert wait_until(lambda: bus.broker.counters["push_unroutable"] == before + 1, timeout=5)
    again = bus.client(node)
    assert again.next_push(5.0) == ("vault", Note(text="while away"))
