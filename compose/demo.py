"""A lab to try Coterie by hand: a server and agents in network namespaces, until Ctrl-C.

    sudo python3 -m compose.demo                          # A - R - B, server in R, agents in A and B
    sudo python3 -m compose.demo --sites public,nat,pat   # R as the internet, one node per site kind

It prints the namespaces and commands to look around (``ip netns exec NS ...``),
then waits. Ctrl-C (or SIGTERM) stops every process it started and deletes
its namespaces. If it was killed with SIGKILL, ``python3 -m compose --cleanup-stale``
removes what it left.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from compose.coterie_lab import LabServer, coterie_argv, start_agent, start_server, wait_agent
from compose.netns import Host, Lab, LabError
from compose.topologies import KINDS, sites_behind, two_hosts

VPN, SUBNET = "demo", "100.64.0.0/24"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 -m compose.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", help=f"comma-separated site kinds ({', '.join(KINDS)}); default: two hosts and R")
    ap.add_argument("--agent-arg", action="append", default=[], help="extra argument for `agent up` (repeatable)")
    ap.add_argument("--workdir", type=Path, help="logs and state [default: a new temporary directory]")
    ap.add_argument("--no-wait", action="store_true", help="tear down as soon as everything is up (a smoke test)")
    return ap.parse_args(argv)


def build(lab: Lab, sites: str | None) -> tuple[Host, str, dict[str, Host]]:
    """The topology; returns the server's host, its listen address and {node name: host}."""
    if not sites:
        t = two_hosts(lab)
        return t.r, t.ra_addr, {"a": t.a, "b": t.b}
    s = sites_behind(lab, [k.strip() for k in sites.split(",") if k.strip()])
    return s.r, s.server_addr, {f"{site.kind.replace('-', '')}{site.index}": site.hosts[0] for site in s.sites}


def bring_up(lab: Lab, sites: str | None, agent_args: list[str]) -> tuple[LabServer, dict[str, Host]]:
    server_host, listen, nodes = build(lab, sites)
    print(f"building lab {lab.tag}: server in {server_host.ns} on {listen}", flush=True)
    server = start_server(server_host, lab.workdir, listen=listen)
    server.vpn_create(VPN, SUBNET)
    agents = {}
    for name, host in nodes.items():
        agents[name] = start_agent(host, server.node_add(name, [VPN]), lab.workdir / f"agent-{name}", agent_args)
    for name, host in nodes.items():
        others = [n for n in nodes if n != name]
        status = wait_agent(host, lab.workdir / f"agent-{name}", others, agent=agents[name])
        print(f"  node {name} in {host.ns}: {status['vpns'][VPN]['vip']}, sees {', '.join(others)}", flush=True)
    return server, nodes


def explain(lab: Lab, server: LabServer, nodes: dict[str, Host]) -> None:
    cli = " ".join(coterie_argv())
    first = next(iter(nodes))
    print(
        f"""
lab {lab.tag} is up; logs in {lab.workdir}
  operator:  ip netns exec {server.host.ns} env PYTHONPATH={os.environ.get("PYTHONPATH", ".")} \\
               {cli} node list --dir {server.home}
  agent:     ip netns exec {nodes[first].ns} {cli} agent status --state-dir {lab.workdir / f"agent-{first}"}
  a shell:   ip netns exec {nodes[first].ns} bash
Ctrl-C stops everything and deletes the namespaces.""",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("compose.demo: must run as root (network namespaces)", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: stop.set())
    try:
        with Lab(workdir=args.workdir) as lab:
            server, nodes = bring_up(lab, args.sites, args.agent_arg)
            explain(lab, server, nodes)
            while not args.no_wait and not stop.wait(1.0):
                pass
            print("stopping", flush=True)
    except KeyboardInterrupt:
        print("\nstopped; namespaces deleted", flush=True)
    except (LabError, ValueError) as exc:
        print(f"compose.demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
