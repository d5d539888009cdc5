"""Shared fixtures: a broker on loopback with workers in threads or processes.

Tests are marked by layer from their folder (unit, process, network,
external), so ``pytest -m unit`` runs only the pure tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bus.broker import Broker
from bus.client import Client
from bus.identity import Identity, Role
from bus.keys import KeyPair, save_keypair
from bus.registry import MemoryKeyRegistry
from bus.worker import Worker
from tests.helpers.workers import worker_class

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("unit", "process", "network", "external", "cli", "tui")  # cli and tui tests run real processes


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(item.fspath).relative_to(ROOT / "tests").parts
        if parts and parts[0] in LAYERS:
            item.add_marker(getattr(pytest.mark, "process" if parts[0] in ("cli", "tui") else parts[0]))


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll *predicate* until it is truthy or *timeout* passes (bounded, never a spin)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@dataclass
class BusHarness:
    """A broker in a thread, plus workers and clients that are cleaned up after the test."""

    tmp: Path
    allow_anonymous: bool = True
    server: KeyPair = field(default_factory=KeyPair.generate)
    operator: KeyPair = field(default_factory=KeyPair.generate)
    registry: MemoryKeyRegistry = field(default_factory=MemoryKeyRegistry)
    broker: Broker | None = None
    _threads: list[tuple[object, threading.Thread]] = field(default_factory=list)
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _clients: list[Client] = field(default_factory=list)

    def start(self) -> BusHarness:
        self.registry.add(Identity(Role.OPERATOR, "admin", self.operator.public_text))
        self.broker = Broker(self.server, self.registry, "tcp://127.0.0.1:*", allow_anonymous=self.allow_anonymous)
        self._spawn(self.broker)
        return self

    @property
    def endpoint(self) -> str:
        assert self.broker is not None
        return self.broker.endpoint

    def _spawn(self, runner: Broker | Worker) -> None:
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        self._threads.append((runner, thread))

    def service_key(self, service: str) -> KeyPair:
        keypair = KeyPair.generate()
        self.registry.add(Identity(Role.SERVICE, service, keypair.public_text))
        return keypair

    def thread_worker(self, service: str, anonymous: bool = False) -> Worker:
        worker = worker_class(service, anonymous)(self.endpoint, self.service_key(service), self.server.public)
        self._spawn(worker)
        return worker

    def process_worker(self, service: str, anonymous: bool = False) -> subprocess.Popen[bytes]:
        keypair = self.service_key(service)
        key_file = save_keypair(keypair, self.tmp / "keys", f"{service}-{len(self._processes)}")
        argv = [
            sys.executable,
            "-m",
            "tests.helpers.workers",
            service,
            self.endpoint,
            self.server.public_text,
            str(key_file),
        ] + (["anon"] if anonymous else [])
        process = subprocess.Popen(argv, cwd=ROOT)
        self._processes.append(process)
        return process

    def client(self, keypair: KeyPair | None = None, server_key: bytes | None = None, **kw: float) -> Client:
        client = Client(self.endpoint, keypair or self.operator, server_key or self.server.public, **kw)
        self._clients.append(client)
        return client

    def wait_workers(self, service: str, count: int, timeout: float = 10.0) -> bool:
        assert self.broker is not None
        return wait_until(
            lambda: sum(1 for w in list(self.broker.workers.values()) if w.service == service) == count, timeout
        )

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        for process in self._processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for runner, _ in reversed(self._threads):
            runner.stop()  # type: ignore[attr-defined]
        for _, thread in self._threads:
            thread.join(timeout=5)


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[BusHarness]:
    harness = BusHarness(tmp_path).start()
    yield harness
    harness.stop()


@pytest.fixture
def closed_bus(tmp_path: Path) -> Iterator[BusHarness]:
    """A broker that refuses unknown keys at the handshake (no anonymous services)."""
    harness = BusHarness(tmp_path, allow_anonymous=False).start()
    yield harness
    harness.stop()
