"""A running Coterie overlay in a lab: server in the router, agents in hosts, helpers to read their state.

The data-plane tests share this set-up: everything through the real CLI, the
real agent with its TUN device and sockets, keys through the real keydist.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compose.coterie_lab import LabServer, start_agent, start_server, wait_agent
from compose.netns import Host, Lab, LabError, LabProcess
from nodeagent.cli import status_doc
from nodeagent.state import StateDir, StateError

SUBNET = "100.64.0.0/24"


@dataclass
class Overlay:
    lab: Lab
    server: LabServer
    hosts: dict[str, Host]
    agents: dict[str, LabProcess] = field(default_factory=dict)

    def state_dir(self, name: str) -> Path:
        return self.lab.workdir / f"agent-{name}"

    def start(self, name: str, join: str | None, args: Sequence[str] = ()) -> LabProcess:
        agent = start_agent(self.hosts[name], join, self.state_dir(name), ["--heartbeat", "0.5", *args], name=name)
        self.agents[name] = agent
        return agent

    def status(self, name: str) -> dict[str, Any]:
        """What `coterie agent status --json` prints, read in-process (the CLI is tested elsewhere; polls are many)."""
        try:
            return status_doc(StateDir(self.state_dir(name)))
        except StateError as exc:
            raise LabError(f"no status for agent {name}: {exc}") from None

    def dataplane(self, name: str) -> dict[str, Any]:
        return self.status(name).get("dataplane") or {}

    def counters(self, name: str) -> dict[str, int]:
        return dict(self.dataplane(name).get("counters", {}))

    def vip(self, name: str, vpn: str = "lab") -> str:
        return str(self.status(name)["vpns"][vpn]["vip"])

    def wait_synced(self, name: str, peers: Sequence[str]) -> dict[str, Any]:
        return wait_agent(self.hosts[name], self.state_dir(name), peers=peers, agent=self.agents.get(name))

    def wait_ping(self, name: str, address: str, timeout: float = 40) -> float:
        """Seconds until *address* answers a ping from *name*; LabError with both logs if it never does."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.hosts[name].ping(address, timeout=1):
                return time.monotonic() - start
        logs = "\n".join(f"--- {n}:\n{a.log_tail(25)}" for n, a in self.agents.items())
        raise LabError(f"{name} cannot ping {address} within {timeout}s\n{logs}")


def start_overlay(
    lab: Lab,
    hosts: dict[str, Host],
    server_host: Host,
    listen: str,
    members: dict[str, Sequence[str]],
    vpns: dict[str, str] | None = None,
    args: Sequence[str] = (),
    per_node_args: dict[str, Sequence[str]] | None = None,
) -> Overlay:
    """Server on *server_host*, the VPNs (name -> subnet), a node per host in its VPNs, agents started."""
    server = start_server(server_host, lab.workdir, listen=listen)
    for vpn, subnet in (vpns or {"lab": SUBNET}).items():
        server.vpn_create(vpn, subnet)
    overlay = Overlay(lab, server, hosts)
    joins = {name: server.node_add(name, list(members[name])) for name in hosts}
    for name in hosts:
        overlay.start(name, joins[name], [*args, *(per_node_args or {}).get(name, ())])
    return overlay


def star(lab: Lab, names: Sequence[str]) -> tuple[Host, dict[str, Host]]:
    """A router R and one host per name, each on its own /24 (10.201.N.0/24, the host at .2, R at .1)."""
    router = lab.add_host("r", forward=True)
    hosts = {}
    for number, name in enumerate(names, start=1):
        host = hosts[name] = lab.add_host(name)
        lab.link(router, f"r{name}", host, "eth0", f"10.201.{number}.1/24", f"10.201.{number}.2/24")
        host.run(["ip", "route", "add", "default", "via", f"10.201.{number}.1"])
    return router, hosts
