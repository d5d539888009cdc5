"""``coterie agent up`` and ``coterie agent status``: the node agent's commands."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from bus.messages.auth import JoinString
from nodeagent.agent import Agent, EnrollmentError, enroll
from nodeagent.state import StateDir, StateError, default_state_dir
from services.logsetup import setup_logging

agent_app = typer.Typer(help="Run the node agent and inspect it.", no_args_is_help=True)

StateDirOption = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Agent state [default: $COTERIE_AGENT_HOME or ~/.coterie/agent]."),
]


def _fail(message: str) -> None:
    typer.echo(f"coterie: error: {message}", err=True)
    raise typer.Exit(1)


@agent_app.command("up")
def up(
    join: Annotated[str | None, typer.Option("--join", help="The join string from `coterie node add`.")] = None,
    state_dir: StateDirOption = None,
    heartbeat: Annotated[float, typer.Option(help="Seconds between heartbeats.", min=0.2)] = 2.0,
) -> None:
    """Enroll with a join string (first run), then keep this node's view current until stopped."""
    setup_logging("agent")
    state = StateDir(state_dir or default_state_dir())
    if join is not None:
        if state.enrolled:
            typer.echo(f"already enrolled as {state.server().node}; ignoring --join", err=True)
        else:
            try:
                info = enroll(state, JoinString.decode(join))
            except ValueError as exc:
                _fail(str(exc))
            except EnrollmentError as exc:
                _fail(f"enrollment refused: {exc}")
            typer.echo(f"enrolled as node {info.node}")
    try:
        agent = Agent(state, heartbeat=heartbeat)
    except StateError as exc:
        _fail(str(exc))
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    agent.run()


@agent_app.command("status")
def status(
    state_dir: StateDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """This node's view: its VPNs and addresses, its peers and their state."""
    state = StateDir(state_dir or default_state_dir())
    try:
        server = state.server()
        stored = state.load_view()
    except StateError as exc:
        _fail(str(exc))
    running = state.load_status()
    doc: dict[str, Any] = {
        "node": stored.view.node if stored else server.node,
        "server": server.endpoints,
        "state": running.get("state", "unknown"),
        "revision": stored.revision if stored else 0,
        "vpns": {n: v.model_dump(mode="json") for n, v in stored.view.vpns.items()} if stored else {},
        "peers": {n: p.model_dump(mode="json") for n, p in stored.view.peers.items()} if stored else {},
        "acl": [a.model_dump(mode="json") for a in stored.view.acl] if stored else [],
        "updated": running.get("at"),
    }
    if as_json:
        typer.echo(json.dumps(doc))
        return
    age = f", {time.time() - doc['updated']:.0f}s ago" if doc["updated"] else ""
    typer.echo(
        f"node {doc['node']}: {doc['state']}{age}, revision {doc['revision']}, server {', '.join(server.endpoints)}"
    )
    for name, vpn in doc["vpns"].items():
        typer.echo(f"  vpn {name}: {vpn['vip']} ({vpn['role']}) in {vpn['subnet']}, {vpn['topology']}")
    for name, peer in doc["peers"].items():
        addresses = ", ".join(f"{v} {ip}" for v, ip in peer["vips"].items())
        typer.echo(f"  peer {name}: {addresses}, {'online' if peer['online'] else 'offline'}")
    if not doc["peers"]:
        typer.echo("  no peers")
