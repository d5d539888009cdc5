#!/usr/bin/env python3
"""Per pair of node classes: the path chosen, time from agent start to first ping, and TCP throughput.

Each pair gets a fresh compose/ lab (sites_behind: R is the internet and
runs the server; each node sits at a site behind a box of its kind), the
real server and two real agents. The clock starts when both agents are
started (enrolment, sync, key exchange, NAT discovery and the first ping
all count), then iperf3 runs x -> y through the tunnel. Needs root, iperf3.

    sudo python3 bench/paths.py [--pairs public-public,pat-pat] [--seconds 5] [--json]

Kinds: public, nat (1:1 NAT), pat (masquerade, keeps ports), pat-random
(masquerade with random ports), firewall (only TCP/443 and the relay port out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compose.coterie_lab import DEFAULT_PORT, agent_status, start_agent, start_server  # noqa: E402
from compose.netns import Lab, LabError  # noqa: E402
from compose.topologies import KINDS, sites_behind  # noqa: E402

DEFAULT_PAIRS = (
    "public-public",
    "public-nat",
    "public-pat",
    "nat-pat",
    "pat-pat",
    "public-firewall",
    "pat-firewall",
    "firewall-firewall",
)
SUBNET = "100.64.0.0/24"
FIRST_PING_LIMIT = 120.0


def measure(kinds: list[str], seconds: int) -> dict[str, Any]:
    """One pair: build, start, time to first ping, path, classes, throughput; the lab is gone after."""
    row: dict[str, Any] = {"pair": "-".join(kinds)}
    with Lab() as lab:
        sites = sites_behind(lab, kinds, firewall_ports=(443, DEFAULT_PORT))  # the relay and the bus
        hosts = {"x": sites[0].hosts[0], "y": sites[1].hosts[0]}
        server = start_server(sites.r, lab.workdir, listen=sites.server_addr)
        server.vpn_create("bench", SUBNET)
        joins = {name: server.node_add(name, ["bench"]) for name in hosts}
        started = time.monotonic()
        for name, host in hosts.items():
            start_agent(host, joins[name], lab.workdir / f"agent-{name}", ["--heartbeat", "0.5"], name=name)
        vip_y = _wait_vip(hosts["y"], lab.workdir / "agent-y", started)
        while not hosts["x"].ping(vip_y, timeout=0.5):
            if time.monotonic() - started > FIRST_PING_LIMIT:
                row["error"] = f"no ping within {FIRST_PING_LIMIT:.0f} s"
                return row
        row["first_ping_s"] = round(time.monotonic() - started, 2)
        status = agent_status(hosts["x"], lab.workdir / "agent-x") or {}
        row["path"] = ((status.get("dataplane") or {}).get("peers", {}).get("y", {})).get("path", "?")
        row["classes"] = {n["name"]: n["nat_class"] for n in server.nodes()}
        row["mbit_s"] = _iperf(hosts["x"], hosts["y"], vip_y, seconds)
    return row


def _wait_vip(host: Any, state_dir: Path, started: float) -> str:
    while time.monotonic() - started < FIRST_PING_LIMIT:
        status = agent_status(host, state_dir)
        vip = (status or {}).get("vpns", {}).get("bench", {}).get("vip")
        if vip:
            return str(vip)
        time.sleep(0.2)
    raise LabError("agent y never got its address")


def _iperf(client: Any, server: Any, address: str, seconds: int) -> float | None:
    listener = server.spawn(["iperf3", "-s", "-1", "-B", address], "iperf3-server")
    time.sleep(0.5)
    try:
        proc = client.run(["iperf3", "-c", address, "-t", str(seconds), "-J"], check=False, timeout=seconds + 30)
        doc = json.loads(proc.stdout or "{}")
        bits = doc.get("end", {}).get("sum_received", {}).get("bits_per_second")
        return round(bits / 1e6, 1) if bits else None
    finally:
        if listener.poll() is None:  # -1 ends it after one test; the lab stops it by PID otherwise
            listener.terminate()


def split_pair(pair: str) -> list[str]:
    """``pat-random-public`` -> ["pat-random", "public"]: the one split whose halves are both kinds."""
    for at in [i for i, c in enumerate(pair) if c == "-"]:
        if pair[:at] in KINDS and pair[at + 1 :] in KINDS:
            return [pair[:at], pair[at + 1 :]]
    raise ValueError(f"{pair!r} is not KIND-KIND with kinds {', '.join(KINDS)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=",".join(DEFAULT_PAIRS), help="comma-separated KIND-KIND pairs")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 seconds per pair (default 5)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    if shutil.which("iperf3") is None:
        print("bench/paths.py: needs iperf3 (Debian package iperf3)", file=sys.stderr)
        return 1
    rows = []
    for pair in [p.strip() for p in args.pairs.split(",") if p.strip()]:
        kinds = split_pair(pair)
        print(f"pair {pair} ...", file=sys.stderr, flush=True)
        try:
            rows.append(measure(kinds, args.seconds))
        except (LabError, ValueError) as exc:
            rows.append({"pair": pair, "error": str(exc).splitlines()[0]})
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'pair':<20} {'classes':<22} {'path':<8} {'first ping':>11} {'TCP Mbit/s':>11}")
    for row in rows:
        if "error" in row:
            print(f"{row['pair']:<20} error: {row['error']}")
            continue
        classes = "/".join(row["classes"].get(n, "?") for n in ("x", "y"))
        mbit = f"{row['mbit_s']:.1f}" if row.get("mbit_s") else "-"
        print(f"{row['pair']:<20} {classes:<22} {row['path']:<8} {row['first_ping_s']:>9.1f} s {mbit:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
