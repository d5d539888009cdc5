"""Worker lanes and liveness in the broker: a kind's own workers answer while the general one is busy.

Real broker, real CURVE sockets on loopback, workers in threads and in
processes. No time is asserted beyond ordering: what was answered while
what else was still held.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from bus import constants as c
from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.messages.common import Ping, Pong
from tests.conftest import BusHarness, wait_until
from tests.helpers.messages import Ack, Note, PushTo, Sleep, Slept
from tests.helpers.workers import worker_class


def _lane_worker(bus: BusHarness, service: str, kinds: tuple[str, ...], capacity: int = 8):  # type: ignore[no-untyped-def]
    cls = type("LaneWorker", (worker_class(service),), {"kinds": kinds, "capacity": capacity})
    worker = cls(bus.endpoint, bus.service_key(service), bus.server.public)
    bus._spawn(worker)
    return worker


def test_kind_lane_answers_while_the_general_worker_is_busy(bus: BusHarness) -> None:
    general = bus.thread_worker("echo")
    lane = _lane_worker(bus, "echo", (Ping.KIND,))
    assert bus.wait_workers("echo", 2)
    slept: list[object] = []
    sleeper = threading.Thread(
        target=lambda: slept.append(bus.client(timeout=30.0, retries=0).request("echo", Sleep(seconds=4.0))),
        daemon=True,
    )
    sleeper.start()
    assert wait_until(lambda: general.counters["requests"] == 1, 10), "the general worker never got the sleep"
    pinger = bus.client(timeout=10.0, retries=0)
    replies = [pinger.request("echo", Ping(payload=str(i).encode())) for i in range(20)]
    assert sleeper.is_alive() and not slept, "the pings were answered only after the general worker was free"
    assert replies == [Pong(payload=str(i).encode(), service="echo") for i in range(20)]
    assert lane.counters["requests"] == 20 and general.counters["requests"] == 1, "pings served by their lane only"
    sleeper.join(timeout=30)
    assert slept and isinstance(slept[0], Slept)


def test_lane_kinds_fall_back_to_the_general_worker_when_their_lane_is_empty(bus: BusHarness) -> None:
    general = bus.thread_worker("echo")
    lane = _lane_worker(bus, "echo", (Ping.KIND,))
    assert bus.wait_workers("echo", 2)
    client = bus.client(timeout=10.0, retries=2)
    assert isinstance(client.request("echo", Ping()), Pong)
    assert lane.counters["requests"] == 1
    lane.stop()
    assert bus.wait_workers("echo", 1), "the lane worker did not leave"
    assert isinstance(client.request("echo", Ping()), Pong)
    assert general.counters["requests"] == 1 and lane.counters["requests"] == 1, "served by the general worker"


def test_pipelined_worker_takes_several_requests_before_its_first_reply(bus: BusHarness) -> None:
    lane = _lane_worker(bus, "echo", (Sleep.KIND,), capacity=4)
    assert bus.wait_workers("echo", 1)
    results: list[object] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(bus.client(timeout=30.0, retries=0).request("echo", Sleep(seconds=1.0))),
            daemon=True,
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    assert bus.broker is not None
    held = lambda: max((len(w.busy) for w in list(bus.broker.workers.values())), default=0)  # noqa: E731
    assert wait_until(lambda: held() == 3, 10), "the broker did not hand the worker three requests at once"
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 3 and all(isinstance(r, Slept) for r in results)
    assert lane.counters["requests"] == 3


def test_a_worker_silent_longer_than_three_heartbeats_is_not_dropped(bus: BusHarness) -> None:
    """A starved worker (SIGSTOP for 4 s, more than the old 3 x 1 s window) keeps its registration and answers."""
    worker = bus.process_worker("echo")
    assert bus.wait_workers("echo", 1, timeout=20)
    client = bus.client(timeout=5.0, retries=3)
    assert isinstance(client.request("echo", Ping()), Pong)
    assert bus.broker is not None
    dropped = bus.broker.counters["workers_dropped"]
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        time.sleep(4.0)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert c.HEARTBEAT_INTERVAL * c.HEARTBEAT_LIVENESS > 4.0
    assert isinstance(client.request("echo", Ping()), Pong)
    assert bus.broker.counters["workers_dropped"] == dropped, "the silent worker was dropped"
    assert bus.wait_workers("echo", 1)


def test_several_pushes_in_one_message_each_reach_their_client_in_order(bus: BusHarness) -> None:
    def on_push_to(self, request: PushTo, caller: Identity) -> Ack:  # type: ignore[no-untyped-def]
        self.push_many([(request.key, Note(text=f"{request.text}{i}")) for i in range(250)])  # three PUSH messages
        return Ack()

    cls = type("BatchWorker", (worker_class("vault"),), {"on_push_to": on_push_to})
    bus._spawn(cls(bus.endpoint, bus.service_key("vault"), bus.server.public))
    assert bus.wait_workers("vault", 1)
    node = KeyPair.generate()
    bus.registry.add(Identity(Role.NODE, "n1", node.public_text))
    listener = bus.client(node)
    assert listener.heartbeat()
    assert isinstance(bus.client().request("vault", PushTo(key=node.public_text, text="m")), Ack)
    received = [listener.next_push(10.0) for _ in range(250)]
    assert [r[1] for r in received if r] == [Note(text=f"m{i}") for i in range(250)], "in order, none lost"


def test_a_notification_is_served_but_its_reply_is_not_forwarded(bus: BusHarness) -> None:
    worker = bus.thread_worker("echo")
    assert bus.wait_workers("echo", 1)
    client = bus.client()
    assert client.notify("echo", Ping()) or wait_until(lambda: client.notify("echo", Ping()), 10)
    assert wait_until(lambda: worker.counters["requests"] >= 1, 10), "the notification was not served"
    assert isinstance(client.request("echo", Ping()), Pong)  # a reply that is forwarded comes after it
    assert client.counters["notify_replies"] == 0, "the broker forwarded a notification's reply"
