"""Topologies as files: a small TOML format that names a shape, its impairments, the server and the VPN.

A file (see compose/labs/, each opening with an ASCII diagram in comments)::

    shape = "sites"                  # "two-hosts" (A - R - B) or "sites" (R as the internet)
    kinds = ["public", "nat", "pat"] # sites only: one site per kind (see topologies.KINDS)
    hosts_per_site = 1               # sites only: 1 or 2 (an agent runs on each)
    loss = 0                         # percent of what R forwards, dropped at random
    delay_ms = 0                     # one-way delay on R, through compose/delay.py
    firewall_ports = [443]           # what a firewall box lets out

    [server]
    port = 7870                      # 443 where a firewalled site must reach it

    [vpn]
    name = "demo"
    subnet = "100.64.0.0/24"
    agent_args = []                  # extra `coterie agent up` arguments for every agent

``build(lab, spec)`` makes the network and says where the server and each
node go; ``python3 -m compose.demo --file FILE`` starts them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compose.netns import Host, Lab
from compose.topologies import KINDS, add_delay, add_loss, sites_behind, two_hosts

SHAPES = ("two-hosts", "sites")
_TOP_KEYS = {"shape", "kinds", "hosts_per_site", "loss", "delay_ms", "firewall_ports", "server", "vpn"}


class SpecError(ValueError):
    """A topology file that cannot be built; the message names the file and the field."""


@dataclass(frozen=True)
class LabSpec:
    shape: str = "two-hosts"
    kinds: tuple[str, ...] = ()
    hosts_per_site: int = 1
    loss: int = 0
    delay_ms: float = 0
    firewall_ports: tuple[int, ...] = (443,)
    server_port: int = 7870
    vpn: str = "demo"
    subnet: str = "100.64.0.0/24"
    agent_args: tuple[str, ...] = ()


@dataclass
class Built:
    """Where things go: the server's host and listen address, and {node name: host} for the agents."""

    server_host: Host
    listen: str
    nodes: dict[str, Host] = field(default_factory=dict)


def load(path: Path) -> LabSpec:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"{path}: {exc}") from None
    try:
        return parse(doc)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{path}: {exc}") from None


def parse(doc: dict[str, Any]) -> LabSpec:
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    server, vpn = dict(doc.get("server", {})), dict(doc.get("vpn", {}))
    spec = LabSpec(
        shape=str(doc.get("shape", "two-hosts")),
        kinds=tuple(str(k) for k in doc.get("kinds", ())),
        hosts_per_site=int(doc.get("hosts_per_site", 1)),
        loss=int(doc.get("loss", 0)),
        delay_ms=float(doc.get("delay_ms", 0)),
        firewall_ports=tuple(int(p) for p in doc.get("firewall_ports", (443,))),
        server_port=int(server.get("port", 7870)),
        vpn=str(vpn.get("name", "demo")),
        subnet=str(vpn.get("subnet", "100.64.0.0/24")),
        agent_args=tuple(str(a) for a in vpn.get("agent_args", ())),
    )
    if spec.shape not in SHAPES:
        raise ValueError(f"shape {spec.shape!r}: choose {' or '.join(SHAPES)}")
    if spec.shape == "sites" and not spec.kinds:
        raise ValueError("shape 'sites' needs kinds = [...]")
    if bad := [k for k in spec.kinds if k not in KINDS]:
        raise ValueError(f"unknown kinds {bad}; choose from {', '.join(KINDS)}")
    if not 0 <= spec.loss < 100 or not 0 <= spec.delay_ms <= 10000 or not 0 < spec.server_port < 65536:
        raise ValueError("loss must be 0..99, delay_ms 0..10000, server.port 1..65535")
    return spec


def build(lab: Lab, spec: LabSpec) -> Built:
    """The network of *spec* in *lab*, with its impairments on R."""
    if spec.shape == "two-hosts":
        t = two_hosts(lab)
        built, router, devs = Built(t.r, t.ra_addr, {"a": t.a, "b": t.b}), t.r, ["ra", "rb"]
    else:
        s = sites_behind(lab, spec.kinds, spec.hosts_per_site, firewall_ports=spec.firewall_ports)
        nodes = {
            f"{site.kind.replace('-', '')}{site.index}{'ab'[j]}": h
            for site in s.sites
            for j, h in enumerate(site.hosts)
        }
        built, router, devs = Built(s.r, s.server_addr, nodes), s.r, [f"s{site.index}" for site in s.sites]
    if spec.loss:
        add_loss(router, spec.loss)
    if spec.delay_ms:
        add_delay(router, spec.delay_ms, devs)
    return built
