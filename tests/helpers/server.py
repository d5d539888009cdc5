"""A real Coterie server for tests (`coterie server up` in a subprocess) and in-process agents.

The server is the real supervisor with all its real processes, on a free
loopback port (the relay on another, never 443), SQLite in a temporary
directory unless a database URL is given. Agents are the real nodeagent.Agent in threads, sharing one ZeroMQ
context so that hundreds fit in one test process; each has its own CURVE
key and connection, as on a real node.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import tomllib
import uuid
from pathlib import Path

import tomli_w

from bus.client import Client, Context
from bus.client import shared_context as shared
from bus.errors import BusError
from bus.messages import Message
from bus.messages.auth import JoinString
from bus.messages.datastore import Mutated, NodeAdd
from compose.netns import kill_pids
from nodeagent.agent import Agent, enroll
from nodeagent.state import StateDir
from services.datastore.db import make_engine, reading
from services.datastore.netmap import World
from tests.conftest import ROOT, wait_until
from tui.client import connect, resolve_address, server_status


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class CoterieServer:
    def __init__(
        self, tmp: Path, *, presence_timeout: float = 3.0, database: str = "", heartbeat_budget: float = 1000.0
    ) -> None:
        self.home = tmp / "server"
        self.log_path = tmp / "server.log"
        self.port = free_port()
        init = [sys.executable, "-m", "tui.cli", "init", "--dir", str(self.home), "--port", str(self.port)]
        subprocess.run(init, cwd=ROOT, check=True, capture_output=True, timeout=60)
        config_path = self.home / "config.toml"
        config = tomllib.loads(config_path.read_text())
        config["sync"]["presence_timeout"] = presence_timeout
        config["sync"]["heartbeat_budget"] = heartbeat_budget
        config["database"]["url"] = database
        self.relay_port = free_port()  # never the real 443
        config["relay"]["port"] = self.relay_port
        config_path.write_text(tomli_w.dumps(config))
        self.database_url = database or f"sqlite:///{self.home / 'coterie.db'}"
        self.process: subprocess.Popen[bytes] | None = None
        self._operator: Client | None = None

    def start(self, timeout: float = 30.0) -> CoterieServer:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        argv = [sys.executable, "-m", "tui.cli", "server", "up", "--dir", str(self.home)]
        self.process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=log)
        log.close()
        assert wait_until(self.all_up, timeout, interval=0.3), f"server did not come up; see {self.log_path}"
        return self

    def all_up(self) -> bool:
        try:
            with connect(resolve_address(self.home), timeout=1.0, retries=0) as client:
                return all(row.up for row in server_status(client, timeout=1.0))
        except BusError:
            return False

    def pids(self) -> dict[str, int]:
        with connect(resolve_address(self.home), timeout=2.0, retries=1) as client:
            return {row.name: row.pid for row in server_status(client) if row.pid}

    def stop(self) -> None:
        if self._operator is not None:
            self._operator.close()
            self._operator = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def operator(self) -> Client:
        if self._operator is None:
            self._operator = connect(resolve_address(self.home), timeout=3.0, retries=4)
        return self._operator

    def request(self, message: Message, service: str = "datastore") -> Message:
        return self.operator.request(service, message)

    def mutate(self, message_type: type, **fields: object) -> Mutated:
        reply = self.request(message_type(idempotency_key=uuid.uuid4().hex, **fields))
        assert isinstance(reply, Mutated), reply
        return reply

    def add_node(self, name: str, vpns: list[str]) -> str:
        reply = self.mutate(NodeAdd, name=name, vpns=vpns)
        assert reply.join is not None
        return reply.join

    def server_views(self) -> dict[str, str]:
        """Each enrolled node's view digest, computed from the database itself."""
        engine = make_engine(self.database_url)
        try:
            with reading(engine) as session:
                world = World.load(session)
                return {n.curve_key: world.view(i).digest() for i, n in world.nodes.items() if n.curve_key}
        finally:
            engine.dispose()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class AgentThread:
    """A real Agent in a thread, enrolled with a join string."""

    def __init__(self, state_dir: Path, join: str, *, heartbeat: float = 0.5, context: Context | None = None) -> None:
        self.state = StateDir(state_dir)
        info = enroll(self.state, JoinString.decode(join), context=context)
        self.name = info.node
        self.key = self.state.keypair().public_text
        self.agent = Agent(self.state, heartbeat=heartbeat, timeout=2.0, context=context)
        self.thread = threading.Thread(target=self.agent.run, name=f"agent-{self.name}", daemon=True)

    def start(self) -> AgentThread:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(timeout=10)

    @property
    def view(self):  # type: ignore[no-untyped-def]
        return self.agent.replica.view

    @property
    def applied(self) -> int:
        return self.agent.counters["applied"]

    @property
    def digest(self) -> str:
        return self.agent.replica.digest


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:  # type: ignore[type-arg]
    """Stop a daemon a test started, by its PID: SIGTERM, SIGKILL after *grace* seconds, then reap it."""
    if process.poll() is None:
        kill_pids([process.pid], grace)
    process.wait(timeout=grace)


# shared: one ZeroMQ context for many agents
__all__ = ["AgentThread", "CoterieServer", "free_port", "shared", "stop_process"]
