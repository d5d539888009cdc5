"""Run Coterie for real inside a lab: a server in one namespace, operators' CLI calls, agents in others.

Everything goes through the real ``coterie`` CLI (``python -m tui.cli`` of
this checkout, so a test runs the code it tests), inside ``ip netns exec``.
The server listens on one address of its host that the other namespaces
route to; that address is also what the join strings carry. Operator
commands run in the server's namespace, where that address is local.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compose.netns import ROOT, Host, LabError, LabProcess, checkout_env

DEFAULT_PORT = 7870
coterie_env = checkout_env


def coterie_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tui.cli", *args]


def coterie(host: Host, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run one ``coterie`` CLI command in *host*; LabError with its stderr if it fails and *check*."""
    argv = host.argv(coterie_argv(*args))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=coterie_env(), cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"coterie {' '.join(args)} in {host.name}: timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        raise LabError(f"coterie {' '.join(args)} in {host.name}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass
class LabServer:
    """A running ``coterie server up`` in a lab host, and operator commands against it."""

    host: Host
    home: Path
    listen: str
    port: int
    process: LabProcess

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.listen}:{self.port}"

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """An operator command (``--dir`` added) in the server's namespace."""
        return coterie(self.host, *args, "--dir", str(self.home), check=check, timeout=timeout)

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def up(self) -> bool:
        """True if ``coterie status`` says the broker and every service are up."""
        return self.process.poll() is None and self.cli("status", check=False, timeout=30).returncode == 0

    def vpn_create(self, name: str, subnet: str, *extra: str) -> None:
        self.cli("vpn", "create", name, "--subnet", subnet, *extra)

    def node_add(self, name: str, vpns: Sequence[str] = (), *extra: str) -> str:
        """Create node *name* (in *vpns*) and return its one-time join string."""
        args = [a for vpn in vpns for a in ("--vpn", vpn)]
        join = self.cli_json("node", "add", name, *args, *extra).get("join")
        if not join:
            raise LabError(f"node add {name}: no join string in the reply")
        return str(join)

    def member_add(self, node: str, vpn: str, role: str = "member") -> None:
        self.cli("member", "add", node, vpn, "--role", role)

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.cli_json("node", "list"))


def start_server(
    host: Host, workdir: Path, listen: str | None = None, port: int = DEFAULT_PORT, timeout: float = 120
) -> LabServer:
    """``coterie init`` + ``coterie server up`` in *host*, listening on *listen* (default: its first address).

    Returns once ``coterie status`` answers with every process up; LabError
    (with the server's log tail) if that takes longer than *timeout* seconds.
    """
    listen = listen or _first_address(host)
    home = Path(workdir) / f"server-{host.name}"
    coterie(host, "init", "--dir", str(home), "--listen", listen, "--port", str(port))
    argv = coterie_argv("server", "up", "--dir", str(home), "--listen", listen, "--port", str(port))
    process = host.spawn(argv, "server", env=coterie_env(), cwd=ROOT)
    server = LabServer(host, home, listen, port, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.up():
            return server
        if process.poll() is not None:
            break
        time.sleep(0.5)
    raise LabError(f"server in {host.name} not up within {timeout}s; {process.log_path}:\n{process.log_tail()}")


def start_agent(
    host: Host, join: str | None, state_dir: Path, extra_args: Sequence[str] = (), name: str = "agent"
) -> LabProcess:
    """``coterie agent up --join J --state-dir S EXTRA...`` in *host*, in the background (the lab stops it).

    *join* None restarts an enrolled agent from its state directory. Data-plane
    flags (``--tun``, ``--port``, ...) go in *extra_args* unchanged.
    """
    args = ["agent", "up", "--state-dir", str(state_dir)]
    if join:
        args += ["--join", join]
    return host.spawn(coterie_argv(*args, *extra_args), name, env=coterie_env(), cwd=ROOT)


def agent_status(host: Host, state_dir: Path) -> dict[str, Any] | None:
    """``coterie agent status --json`` of the agent with *state_dir* (None before it has enrolled)."""
    proc = coterie(host, "agent", "status", "--json", "--state-dir", str(state_dir), check=False, timeout=30)
    if proc.returncode != 0:
        return None
    return dict(json.loads(proc.stdout))


def wait_agent(
    host: Host, state_dir: Path, peers: Sequence[str] = (), timeout: float = 120, agent: LabProcess | None = None
) -> dict[str, Any]:
    """Wait until the agent is connected and sees each of *peers* online; returns its last status.

    LabError with the agent's status and log tail if that takes longer than *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    status: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        status = agent_status(host, state_dir)
        if status and _synced(status, peers):
            return status
        if agent is not None and agent.poll() is not None:
            break
        time.sleep(0.5)
    tail = f"\n{agent.log_path}:\n{agent.log_tail()}" if agent is not None else ""
    raise LabError(f"agent in {host.name} not synced with peers {list(peers)} within {timeout}s: {status}{tail}")


def _synced(status: dict[str, Any], peers: Sequence[str]) -> bool:
    seen = status.get("peers", {})
    return status.get("state") == "connected" and all(seen.get(p, {}).get("online") for p in peers)


def _first_address(host: Host) -> str:
    proc = host.run(["ip", "-j", "-4", "addr", "show", "scope", "global"])
    for link in json.loads(proc.stdout or "[]"):
        for info in link.get("addr_info", []):
            return str(info["local"])
    raise LabError(f"{host.name} has no global IPv4 address to listen on")
