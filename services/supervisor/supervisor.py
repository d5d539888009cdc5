"""Runs the broker and the services as child processes and keeps them running.

A child that dies is restarted after a delay that doubles with each quick
death (0.5 s up to 30 s) and resets once the child has stayed up for a while,
so a crash loop is logged and slowed, never spun. SIGINT or SIGTERM stops
every child (SIGTERM, then SIGKILL after a grace period) and returns.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType

from services.config import ServerConfig
from services.processes import PROCESS_NAMES
from services.supervisor.errors import PortInUseError

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0  # seconds up after which a child's backoff resets
STOP_GRACE = 5.0
POLL_INTERVAL = 0.2


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None
    restarts: int = 0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv)
        self.started = time.monotonic()
        self.restart_at = None
        log.info("started %s (pid %d)", self.name, self.process.pid)


class Supervisor:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        base = [sys.executable, "-m", "services"]
        where = ["--dir", str(config.directory), "--listen", config.listen, "--port", str(config.port)]
        self.children = [Child(n, [*base, n, *where]) for n in PROCESS_NAMES]
        self._stop = threading.Event()

    def run(self) -> None:
        check_port_free(self.config.listen, self.config.port)
        log.info("server starting: broker on %s, database %s", self.config.bind_endpoint, self.config.database_url)
        for child in self.children:
            child.start()
        try:
            while not self._stop.wait(POLL_INTERVAL):
                self._watch(time.monotonic())
        finally:
            self._stop_all()

    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def _stop(signum: int, frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)

    def pids(self) -> dict[str, int | None]:
        return {c.name: c.process.pid if c.process and c.process.poll() is None else None for c in self.children}

    def _watch(self, now: float) -> None:
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restarts += 1
                    child.start()
                continue
            assert child.process is not None
            code = child.process.poll()
            if code is None:
                continue
            uptime = now - child.started
            child.backoff = BACKOFF_FIRST if uptime >= STABLE_AFTER else min(child.backoff * 2, BACKOFF_MAX)
            delay = BACKOFF_FIRST if uptime >= STABLE_AFTER else child.backoff
            child.restart_at = now + delay
            log.warning(
                "%s (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                child.name,
                child.process.pid,
                _describe_exit(code),
                uptime,
                delay,
            )

    def _stop_all(self) -> None:
        running = [c.process for c in reversed(self.children) if c.process and c.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop within %.0fs; killing it", process.pid, STOP_GRACE)
                process.kill()
                process.wait()
        log.info("server stopped")


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host if host != "*" else "0.0.0.0", port))
        except OSError as exc:
            raise PortInUseError(
                f"cannot listen on {host}:{port}: {exc.strerror} (is another Coterie server running?)"
            ) from None
