"""``coterie bench dataplane|control``: run the project's benchmarks (bench/dataplane.py, bench/control.py).

The benchmarks are scripts beside the package, run as a child process with
this interpreter: they start servers, namespaces and hundreds of simulated
agents, none of which the CLI should import (it must start in under a
second). The options are checked here first, so a wrong one is a one-line
error before anything starts; the scripts check them again when run alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"

bench_app = typer.Typer(
    help="Benchmarks: the data plane beside the peer VPNs, and the control plane with simulated agents.",
    no_args_is_help=True,
)


class Database(StrEnum):
    sqlite = "sqlite"
    postgres = "postgres"


class DataPath(StrEnum):
    auto = "auto"
    udp = "udp"
    esp = "esp"


def _run(script: str, args: list[str]) -> int:
    path = BENCH_DIR / script
    if not path.is_file():
        raise typer.BadParameter(f"{path} is missing (the benchmarks ship with the source tree, not the package)")
    paths = [str(BENCH_DIR.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run([sys.executable, str(path), *args], env=env, check=False).returncode


@bench_app.command("control")
def control(
    agents: Annotated[int, typer.Option(help="Simulated agents.", min=1, max=15_000)] = 1000,
    per_process: Annotated[int, typer.Option(help="Agents per worker process.", min=100, max=5000)] = 2500,
    changes: Annotated[int, typer.Option(help="Changes timed per measurement (even).", min=2, max=1000)] = 10,
    burst: Annotated[int, typer.Option(help="Changes in the one-second burst (0: skip).", min=0, max=10_000)] = 1000,
    restart: Annotated[bool, typer.Option("--restart/--no-restart", help="Time a full server restart.")] = True,
    db: Annotated[Database, typer.Option(help="The datastore.")] = Database.sqlite,
    dsn: Annotated[str, typer.Option(help="An existing PostgreSQL database URL (with --db postgres).")] = "",
    heartbeat: Annotated[float, typer.Option(help="Agents' heartbeat interval, s.", min=0.2, max=60)] = 2.0,
    timeout: Annotated[float, typer.Option(help="Seconds any one phase may take.", min=10, max=3600)] = 300.0,
    idle_window: Annotated[
        float, typer.Option(help="Seconds over which the idle server's CPU is measured.", min=1, max=120)
    ] = 10.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON here.")] = None,
) -> None:
    """The control plane: time for a change to reach 1 or N agents, server memory and idle CPU, burst, restart."""
    if changes % 2:
        raise typer.BadParameter("must be even (each route is added, then removed)", param_hint="--changes")
    if dsn and db is not Database.postgres:
        raise typer.BadParameter("needs --db postgres", param_hint="--dsn")
    args = [f"--agents={agents}", f"--per-process={per_process}", f"--changes={changes}", f"--burst={burst}"]
    args += [f"--db={db.value}", f"--heartbeat={heartbeat}", f"--timeout={timeout}", f"--idle-window={idle_window}"]
    args += [f"--dsn={dsn}"] if dsn else []
    args += [] if restart else ["--no-restart"]
    args += [f"--json={json_path}"] if json_path else []
    raise typer.Exit(_run("control.py", args))


@bench_app.command("dataplane")
def dataplane(
    seconds: Annotated[int, typer.Option(help="iperf3 seconds per test.", min=1, max=600)] = 5,
    peers: Annotated[str | None, typer.Option(help="Comma-separated peer VPNs [default: every installed one].")] = None,
    path: Annotated[DataPath, typer.Option(help="The agents' path (auto: the server's choice).")] = DataPath.auto,
    wire: Annotated[bool, typer.Option("--wire", help="Wire-like wan (the router segments GSO).")] = False,
    no_udp: Annotated[bool, typer.Option("--no-udp", help="Skip the UDP packet-rate test.")] = False,
    repeat: Annotated[int, typer.Option(help="Run everything N times and print medians.", min=1, max=20)] = 1,
    mtu: Annotated[int, typer.Option(help="Overlay MTU for every VPN.", min=576, max=9000)] = 1400,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the rows and vpnbench's JSON here.")
    ] = None,
) -> None:
    """The data plane beside the installed peer VPNs on the same namespaces (needs root)."""
    if os.geteuid() != 0:
        raise typer.BadParameter("needs root: it builds network namespaces (run it with sudo)")
    args = [f"--seconds={seconds}", f"--path={path.value}", f"--repeat={repeat}", f"--mtu={mtu}"]
    args += [f"--peers={peers}"] if peers is not None else []
    args += ["--wire"] if wire else []
    args += ["--no-udp"] if no_udp else []
    args += [f"--json={json_path}"] if json_path else []
    raise typer.Exit(_run("dataplane.py", args))
