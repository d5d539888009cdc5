"""Requests through the broker: routing, load balancing, lost workers, unknown services."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from bus import errors
from bus.errors import BusTimeout, RemoteError
from bus.messages.common import BrokerHealth, Health, HealthRequest, Ping, Pong
from tests.conftest import BusHarness, wait_until
from tests.helpers.messages import Sleep, Slept


def test_request_reaches_the_named_service_and_comes_back(bus: BusHarness) -> None:
    bus.thread_worker("alpha")
    bus.thread_worker("beta")
    assert bus.wait_workers("alpha", 1) and bus.wait_workers("beta", 1)
    client = bus.client()
    for service in ("alpha", "beta"):
        reply = client.request(service, Ping(payload=service.encode()), expect=Pong)
        assert reply == Pong(payload=service.encode(), service=service)


def test_broker_answers_for_itself(bus: BusHarness) -> None:
    bus.thread_worker("alpha")
    assert bus.wait_workers("alpha", 1)
    health = bus.client().request("broker", HealthRequest(), expect=BrokerHealth)
    assert isinstance(health, BrokerHealth)
    assert health.health.pid == os.getpid()
    assert [(s.name, s.workers) for s in health.services] == [("alpha", 1)]


def test_unknown_service_gets_an_error_not_silence(bus: BusHarness) -> None:
    with pytest.raises(RemoteError) as info:
        bus.client().request("nosuch", Ping())
    assert info.value.code == errors.UNKNOWN_SERVICE


def test_two_workers_share_the_requests(bus: BusHarness) -> None:
    first, second = bus.process_worker("echo"), bus.process_worker("echo")
    assert bus.wait_workers("echo", 2)
    client = bus.client()
    pids = [client.request("echo", HealthRequest(), expect=Health).pid for _ in range(20)]  # type: ignore[union-attr]
    assert set(pids) == {first.pid, second.pid}
    # Least recently used first: neither worker takes more than its share.
    assert abs(pids.count(first.pid) - pids.count(second.pid)) <= 2


def _request_in_thread(client_call, results: list) -> threading.Thread:  # type: ignore[no-untyped-def]
    def run() -> None:
        try:
            results.append(client_call())
        except Exception as exc:  # the assertion is on what comes back
            results.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_killing_a_worker_mid_request_fails_over_to_another(bus: BusHarness, tmp_path: Path) -> None:
    bus.process_worker("echo")
    bus.process_worker("echo")
    assert bus.wait_workers("echo", 2)
    client = bus.client(timeout=2.0, retries=2)
    marker = tmp_path / "busy.pid"
    results: list[object] = []
    thread = _request_in_thread(lambda: client.request("echo", Sleep(seconds=0.5, marker=str(marker))), results)
    assert wait_until(lambda: marker.exists() and marker.read_text(), timeout=10)
    busy = int(marker.read_text())
    os.kill(busy, signal.SIGKILL)
    thread.join(timeout=20)
    assert not thread.is_alive(), "the client hung"
    assert len(results) == 1 and isinstance(results[0], Slept), results
    assert results[0].pid != busy


def test_killing_the_only_worker_gives_a_clear_error(bus: BusHarness, tmp_path: Path) -> None:
    bus.process_worker("echo")
    assert bus.wait_workers("echo", 1)
    client = bus.client(timeout=1.0, retries=1)
    marker = tmp_path / "busy.pid"
    results: list[object] = []
    thread = _request_in_thread(lambda: client.request("echo", Sleep(seconds=0.5, marker=str(marker))), results)
    assert wait_until(marker.exists, timeout=10) and wait_until(marker.read_text, timeout=5)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    thread.join(timeout=20)
    assert not thread.is_alive(), "the client hung"
    assert len(results) == 1
    outcome = results[0]
    assert isinstance(outcome, BusTimeout) or (
        isinstance(outcome, RemoteError) and outcome.code in (errors.SERVICE_UNAVAILABLE, errors.WORKER_LOST)
    ), outcome


def test_request_waits_briefly_for_a_restarting_worker(bus: BusHarness) -> None:
    worker = bus.thread_worker("alpha")
    assert bus.wait_workers("alpha", 1)
    worker.stop()
    assert bus.wait_workers("alpha", 0)
    client = bus.client(timeout=5.0, retries=0)
    results: list[object] = []
    thread = _request_in_thread(lambda: client.request("alpha", Ping()), results)
    bus.thread_worker("alpha")
    thread.join(timeout=10)
    assert results and isinstance(results[0], Pong)


def test_absent_service_is_answered_unavailable_after_the_wait(bus: BusHarness) -> None:
    worker = bus.thread_worker("alpha")
    assert bus.wait_workers("alpha", 1)
    worker.stop()
    assert bus.wait_workers("alpha", 0)
    with pytest.raises(RemoteError) as info:
        bus.client(timeout=5.0, retries=0).request("alpha", Ping())
    assert info.value.code == errors.SERVICE_UNAVAILABLE
