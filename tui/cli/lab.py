"""`coterie lab`: network labs from compose/ topology files (namespaces, NAT boxes, a server, agents).

The work is compose's (compose/__main__.py and compose/demo.py); this module
gives it the operator's command line: one-line errors, `--json`, and a
`--detach` mode that returns once the lab is up instead of holding the
terminal. A lab belongs to the process that built it; `down` asks that
process to stop, so the cleanup is always the one that knows what it made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from tui.cli.errors import fail
from tui.cli.options import JsonOption

lab_app = typer.Typer(
    help="Network labs: build a topology file's namespaces, NAT boxes, server and agents; run commands in them.",
    no_args_is_help=True,
)

LABS_DIR = Path(__file__).resolve().parents[2] / "compose" / "labs"
UP_TIMEOUT = 300.0  # seconds `up --detach` waits for the lab to publish itself

FileArgument = Annotated[
    Path,
    typer.Argument(help="A topology file (compose/labs/*.toml), or the name of a shipped one, e.g. demo."),
]


def _need_root() -> None:
    if os.geteuid() != 0:
        fail("labs need root (network namespaces and nftables); run with sudo")


def resolve_file(file: Path) -> Path:
    """A path as given, else a shipped topology by name (``demo`` -> compose/labs/demo.toml)."""
    if file.is_file():
        return file.resolve()
    shipped = LABS_DIR / (file.name if file.suffix == ".toml" else f"{file.name}.toml")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in LABS_DIR.glob("*.toml")))
    raise typer.BadParameter(f"no topology file {str(file)!r}; shipped ones: {names}")


@lab_app.command("up")
def up(
    file: FileArgument,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Return once the lab is up; `down` stops it.")] = False,
    agent_arg: Annotated[
        list[str] | None, typer.Option("--agent-arg", help="Extra argument for every `agent up` (repeatable).")
    ] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Logs and state [default: a new temp dir].")] = None,
) -> None:
    """Build the lab and start the server and agents; in the foreground until Ctrl-C unless --detach."""
    path = resolve_file(file)
    _need_root()
    from compose.__main__ import labs_of

    if labs_of(path):
        fail(f"a lab of {path.name} is already running; `coterie lab down {file}` first")
    argv = ["up", str(path), *[f"--agent-arg={a}" for a in agent_arg or []]]
    if workdir is not None:
        argv.append(f"--workdir={workdir}")
    if not detach:
        from compose.__main__ import main as compose_main

        raise typer.Exit(compose_main(argv))
    log = Path(workdir or "/tmp") / f"coterie-lab-{path.stem}-{os.getpid()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "compose", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the lab outlives this command; `down` stops it by its PID
            env={**os.environ, "PYTHONPATH": _project_path()},
        )
    print(f"building lab {path.name} (pid {proc.pid}); log: {log}", flush=True)
    doc = _wait_published(path, proc, log)
    _print_lab(doc)
    print(f"stop it with: coterie lab down {file}")


def _wait_published(path: Path, proc: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    from compose.__main__ import labs_of

    deadline = time.monotonic() + UP_TIMEOUT
    shown = 0
    while time.monotonic() < deadline:
        found = [d for d in labs_of(path) if d.get("pid") == proc.pid]
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        for line in lines[shown:]:
            print(f"  {line}", flush=True)  # progress: what the lab is building, node by node
        shown = len(lines)
        if found:
            return found[0]
        if proc.poll() is not None:
            fail(f"the lab failed (exit {proc.returncode}); see {log}")
        time.sleep(0.5)
    proc.terminate()
    fail(f"the lab was not up after {UP_TIMEOUT:.0f} s; stopped it; see {log}")


def _project_path() -> str:
    root = str(Path(__file__).resolve().parents[2])
    current = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{current}" if current else root


def _print_lab(doc: dict[str, Any]) -> None:
    nodes = doc.get("nodes", {})
    hosts = doc.get("hosts", {})
    print(f"lab {doc['tag']} up (owner pid {doc['pid']}), work directory {doc['workdir']}")
    for node, host in nodes.items():
        print(f"  node {node:<12} host {host:<10} namespace {hosts.get(host, '?')}")


@lab_app.command("down")
def down(file: FileArgument) -> None:
    """Stop the lab of this file: its server and agents end, its namespaces are deleted."""
    path = resolve_file(file)
    _need_root()
    from compose.__main__ import cmd_down, labs_of

    if not labs_of(path):
        fail(f"no running lab of {path.name}")
    raise typer.Exit(cmd_down(path))


@lab_app.command(
    "exec",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def exec_(
    ctx: typer.Context,
    file: FileArgument,
    host: Annotated[str, typer.Argument(help="A host (r, box1, h0a) or node (pat2a) of the lab.")],
) -> None:
    """Run a command in a host's namespace: coterie lab exec demo pat2a -- ping -c1 100.64.0.1"""
    path = resolve_file(file)
    _need_root()
    command = [a for a in ctx.args if a != "--"] if ctx.args[:1] == ["--"] else list(ctx.args)
    if not command:
        raise typer.BadParameter("exec needs a command after --, e.g. -- ping -c1 100.64.0.1")
    from compose.__main__ import labs_of, namespace

    labs = labs_of(path)
    if not labs:
        fail(f"no running lab of {path.name}; start one with `coterie lab up {file} --detach`")
    ns = namespace(labs[0], host)
    if ns is None:
        known = ", ".join(sorted({*labs[0].get("hosts", {}), *labs[0].get("nodes", {})}))
        raise typer.BadParameter(f"no host or node {host!r} in that lab; known: {known}")
    raise typer.Exit(subprocess.call(["ip", "netns", "exec", ns, *command]))


@lab_app.command("list")
def list_(
    as_json: JsonOption = False,
    files: Annotated[bool, typer.Option("--files", help="List the shipped topology files instead.")] = False,
) -> None:
    """Running labs (owner PID, file, nodes), or with --files the shipped topologies."""
    if files:
        rows = [{"name": p.stem, "file": str(p), "about": _first_comment(p)} for p in sorted(LABS_DIR.glob("*.toml"))]
        if as_json:
            print(json.dumps(rows, indent=1))
        for row in [] if as_json else rows:
            print(f"{row['name']:<16} {row['about']}")
        return
    from compose.__main__ import running_labs

    labs = running_labs()
    if as_json:
        print(json.dumps(labs, indent=1))
        return
    if not labs:
        print("no running labs")
    for doc in labs:
        print(f"{doc['tag']}  pid {doc['pid']}  {Path(doc.get('file') or '-').name}  {doc['workdir']}")
        for node, host in doc.get("nodes", {}).items():
            print(f"  node {node} on {host}")


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
