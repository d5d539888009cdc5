"""Helpers of the auth tests: run the real `coterie agent up` against a real CoterieServer."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from bus.client import Client
from bus.keys import KeyPair, load_public_key
from bus.messages.auth import AuditInfo, AuditLog, AuditRequest
from tests.conftest import ROOT, wait_until
from tests.helpers.server import CoterieServer

PASSWORD = "correct horse battery"
START_TIMEOUT = 90.0  # seconds for a whole server to come up (five processes; the machine is shared)


def endpoint(server: CoterieServer, source: str = "") -> str:
    """The broker's endpoint; with *source*, connecting from that loopback address (127.0.0.X)."""
    return f"tcp://{source}:0;127.0.0.1:{server.port}" if source else f"tcp://127.0.0.1:{server.port}"


def server_pub(server: CoterieServer) -> Path:
    return server.home / "keys" / "server.pub"


def agent_up(
    server: CoterieServer, state: Path, *args: str, stdin: str = "", timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`coterie agent up` that is expected to fail (it returns); a success keeps running, see AgentProcess."""
    argv = [sys.executable, "-m", "tui.cli", "agent", "up", "--control-only", "--state-dir", str(state), *args]
    return subprocess.run(argv, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=timeout)


def login_args(server: CoterieServer, user: str, *extra: str) -> list[str]:
    return [
        "--server",
        endpoint(server),
        "--server-key",
        str(server_pub(server)),
        "--user",
        user,
        "--password-stdin",
        *extra,
    ]


class AgentProcess:
    """A real `coterie agent up` that logged in and keeps running until stopped."""

    def __init__(self, tmp: Path, args: list[str], stdin: str) -> None:
        self.log = tmp / f"agent-{len(list(tmp.glob('agent-*.log')))}.log"
        argv = [sys.executable, "-m", "tui.cli", "agent", "up", "--control-only", *args]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=out, stderr=out)
        assert self.process.stdin is not None
        self.process.stdin.write(stdin.encode())
        self.process.stdin.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 20) -> bool:
        return wait_until(lambda: needle in self.text() or self.process.poll() is not None, timeout, 0.1) and (
            needle in self.text()
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def audit_entries(server: CoterieServer) -> list[AuditInfo]:
    reply = server.request(AuditRequest(limit=1000), service="auth")
    assert isinstance(reply, AuditLog)
    return reply.entries


def anonymous_client(server: CoterieServer, source: str = "", timeout: float = 10.0) -> Client:
    """A brand-new key (as a node before its first login), optionally from another loopback address."""
    key = load_public_key(server_pub(server))
    return Client(endpoint(server, source), KeyPair.generate(), key, timeout=timeout, retries=0)
