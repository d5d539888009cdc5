"""A lab to try Coterie by hand: a server and agents in network namespaces, until Ctrl-C.

    sudo python3 -m compose.demo                          # A - R - B, server in R, agents in A and B
    sudo python3 -m compose.demo --sites public,nat,pat   # R as the internet, one node per site kind
    sudo python3 -m compose.demo --file compose/labs/demo.toml   # a topology file (compose/spec.py)

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
import time
from pathlib import Path

from compose.coterie_lab import LabServer, coterie_argv, start_agent, start_server, wait_agent
from compose.netns import Host, Lab, LabError
from compose.spec import LabSpec, build, load
from compose.topologies import KINDS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 -m compose.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", help=f"comma-separated site kinds ({', '.join(KINDS)}); default: two hosts and R")
    ap.add_argument("--file", type=Path, help="a topology file (see compose/labs/ and compose/spec.py)")
    ap.add_argument("--agent-arg", action="append", default=[], help="extra argument for `agent up` (repeatable)")
    ap.add_argument("--workdir", type=Path, help="logs and state [default: a new temporary directory]")
    ap.add_argument("--no-wait", action="store_true", help="tear down as soon as everything is up (a smoke test)")
    return ap.parse_args(argv)


def spec_of(args: argparse.Namespace) -> LabSpec:
    if args.file:
        spec = load(args.file)
    elif args.sites:
        spec = LabSpec(shape="sites", kinds=tuple(k.strip() for k in args.sites.split(",") if k.strip()))
    else:
        spec = LabSpec()
    return LabSpec(**{**spec.__dict__, "agent_args": (*spec.agent_args, *args.agent_arg)})


def bring_up(lab: Lab, spec: LabSpec) -> tuple[LabServer, dict[str, Host]]:
    built = build(lab, spec)
    print(f"building lab {lab.tag}: server in {built.server_host.ns} on {built.listen}", flush=True)
    server = start_server(built.server_host, lab.workdir, listen=built.listen, port=spec.server_port)
    server.vpn_create(spec.vpn, spec.subnet)
    agents, started = {}, time.monotonic()
    for name, host in built.nodes.items():
        join = server.node_add(name, [spec.vpn])
        agents[name] = start_agent(host, join, lab.workdir / f"agent-{name}", spec.agent_args)
    vips: dict[str, str] = {}
    for name, host in built.nodes.items():
        others = [n for n in built.nodes if n != name]
        status = wait_agent(host, lab.workdir / f"agent-{name}", others, agent=agents[name])
        print(f"  node {name} in {host.ns}: {status['vpns'][spec.vpn]['vip']}, sees {', '.join(others)}", flush=True)
        vips[name] = status["vpns"][spec.vpn]["vip"]
    if "--control-only" not in spec.agent_args:
        ping_all(built.nodes, vips, started)
    return server, built.nodes


def ping_all(nodes: dict[str, Host], vips: dict[str, str], started: float, timeout: float = 30) -> None:
    """Ping every other node's virtual address from each node; print the time since the agents started."""
    for name, host in nodes.items():
        for other, vip in vips.items():
            if other == name:
                continue
            deadline = time.monotonic() + timeout
            while not (ok := host.ping(vip, timeout=1)) and time.monotonic() < deadline:
                pass
            when = (
                f"{time.monotonic() - started:.1f} s after the agents started" if ok else f"no reply in {timeout:g} s"
            )
            print(f"  ping {name} -> {other} ({vip}): {when}", flush=True)


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
        spec = spec_of(args)
        with Lab(workdir=args.workdir) as lab:
            server, nodes = bring_up(lab, spec)
            lab.publish(
                file=str(args.file.resolve()) if args.file else None,
                nodes={name: host.name for name, host in nodes.items()},
                server={"host": server.host.name, "dir": str(server.home), "endpoint": server.endpoint},
            )
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
