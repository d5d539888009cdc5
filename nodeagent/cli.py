"""``coterie agent up``, ``agent passwd`` and ``agent status``: the node agent's commands."""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from bus.errors import KeyFileError
from bus.heap import freeze_long_lived
from bus.messages.auth import JoinString
from nodeagent.agent import Agent, EnrollmentError, enroll
from nodeagent.dataplane import EXIT_MARK, PATHS, DataPlane
from nodeagent.keys import REKEY_INTERVAL
from nodeagent.login import change_password, login, server_key_from
from nodeagent.state import StateDir, StateError, default_state_dir
from nodeagent.tcp443 import DEFAULT_PORT as TCP_PORT
from nodeagent.tcp443 import TcpPaths
from nodeagent.transport import DEFAULT_UDP_PORT, Wire
from nodeagent.tun import Tun, TunError
from nodeagent.tunnels import Tunnels, timing_for
from services.logsetup import setup_logging

log = logging.getLogger(__name__)

agent_app = typer.Typer(help="Run the node agent and inspect it.", no_args_is_help=True)

StateDirOption = Annotated[
    Path | None,
    typer.Option("--state-dir", help="Agent state [default: $COTERIE_AGENT_HOME or ~/.coterie/agent]."),
]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"coterie: error: {message}", err=True)
    raise typer.Exit(code)


@agent_app.command("up")
def up(
    join: Annotated[str | None, typer.Option("--join", help="The join string from `coterie node add`.")] = None,
    server_endpoint: Annotated[
        str | None, typer.Option("--server", help="With --user: the server, tcp://HOST:PORT.")
    ] = None,
    server_key: Annotated[
        str | None, typer.Option("--server-key", help="With --user: the server's public key (Z85) or .pub file.")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="Log in with this user's password (first run).")] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
    ] = False,
    node_name: Annotated[
        str | None, typer.Option("--node-name", help="Name of this node [default: USER-HOSTNAME, or the hostname].")
    ] = None,
    state_dir: StateDirOption = None,
    heartbeat: Annotated[float, typer.Option(help="Seconds between heartbeats.", min=0.2)] = 2.0,
    tun: Annotated[str, typer.Option("--tun", help="Name of the TUN device the agent creates.")] = "cot0",
    port: Annotated[int, typer.Option("--port", help="UDP port for ESP (0: any free port).", min=0, max=65535)] = (
        DEFAULT_UDP_PORT
    ),
    path: Annotated[
        str, typer.Option("--path", help="auto (the server's choice per peer), udp (masquerade) or esp (raw).")
    ] = "auto",
    exit_node: Annotated[
        str | None, typer.Option("--exit-node", help="Send all traffic through this gateway (its 0.0.0.0/0 route).")
    ] = None,
    rekey_interval: Annotated[
        float, typer.Option("--rekey-interval", help="Seconds between new ESP keys (make-before-break).", min=4.0)
    ] = REKEY_INTERVAL,
    tcp_port: Annotated[
        int,
        typer.Option(
            "--tcp-port",
            help="Port of the TLS listener firewalled peers dial (path tcp443). Peers always dial 443: another "
            "port only behind a forward from 443; 0: no listener.",
            min=0,
            max=65535,
        ),
    ] = TCP_PORT,
    control_only: Annotated[
        bool, typer.Option("--control-only", help="Keep the view current but move no traffic (no TUN, no root).")
    ] = False,
    offload: Annotated[
        bool,
        typer.Option(
            "--offload/--no-offload",
            help="TUN offloads (super-packets, checksum offload). Off: one packet per read and write, and peers "
            "complete inner checksums for this node.",
        ),
    ] = True,
) -> None:
    """Enroll (join string or token) or log in (user and password) on first run, then keep the view current
    and carry this node's traffic."""
    if path not in PATHS:
        _fail(f"--path must be one of: {', '.join(PATHS)}", code=2)
    setup_logging("agent")
    state = StateDir(state_dir or default_state_dir())
    if join is not None and user is not None:
        _fail("give either --join or --user, not both", code=2)
    if (join is not None or user is not None) and state.enrolled:
        typer.echo(f"already enrolled as {state.server().node}; ignoring --join/--user", err=True)
    elif join is not None:
        try:
            info = enroll(state, JoinString.decode(join), node_name=node_name or "")
        except ValueError as exc:
            _fail(str(exc))
        except EnrollmentError as exc:
            _fail(f"enrollment refused: {exc}")
        typer.echo(f"enrolled as node {info.node}")
    elif user is not None:
        _login(state, server_endpoint, server_key, user, password_stdin, node_name or "")
    tunnels = None
    try:
        server = state.server()
        if not control_only:
            exempt = [urlsplit(e).hostname or "" for e in server.endpoints]
            tunnels = _start_tunnels(
                state,
                server.node,
                tun,
                port,
                path,
                exit_node,
                rekey_interval,
                exempt,
                tcp_port=tcp_port,
                offload=offload,
            )
        agent = Agent(state, heartbeat=heartbeat, tunnels=tunnels)
    except (StateError, TunError, OSError) as exc:
        if tunnels is not None:
            tunnels.close()
        _fail(str(exc))
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    freeze_long_lived()  # before the packet thread starts: a full collection would stall it (bus/heap.py)
    if tunnels is not None:
        tunnels.start()
    try:
        agent.run()
    finally:
        if tunnels is not None:
            tunnels.close()


def _start_tunnels(
    state: StateDir,
    node: str,
    tun: str,
    port: int,
    path: str,
    exit_node: str | None,
    rekey_interval: float,
    exempt: list[str],
    tcp_port: int = TCP_PORT,
    offload: bool = True,
) -> Tunnels:
    from bus.signing import load_signing_key

    try:
        wire = Wire(port, raw_esp=True, mark=EXIT_MARK)
    except OSError as exc:
        raise TunError(f"cannot open the data plane's sockets (UDP port {port}): {exc.strerror}") from None
    try:
        device = Tun(tun, 1400, offload=offload)
        plane = DataPlane(wire, device, path=path, exit_node=exit_node, exempt=_ipv4_only(exempt))
    except TunError:
        wire.close()
        raise
    identity = load_signing_key(state.path / "identity.key")
    return Tunnels.create(plane, node, identity, timing_for(rekey_interval), paths=_tcp_paths(node, tcp_port))


def _tcp_paths(node: str, port: int) -> TcpPaths:
    """The TCP/443 streams, with a TLS listener on *port* (peers that only get TCP/443 out dial it).

    A port already taken (another server on 443) costs only the listener: this node still dials
    reachable peers and the relay, and says so in the log.
    """
    if port:
        try:
            return TcpPaths(node=node, listen=("0.0.0.0", port), mark=EXIT_MARK)
        except OSError as exc:
            log.warning("no TLS listener on TCP port %d (%s): firewalled peers cannot dial this node", port, exc)
    return TcpPaths(node=node, mark=EXIT_MARK)


def _login(
    state: StateDir, server: str | None, server_key: str | None, user: str, from_stdin: bool, node_name: str
) -> None:
    if not server or not server_key:
        _fail("--user needs --server and --server-key")
    try:
        key = server_key_from(server_key)
    except KeyFileError as exc:
        _fail(f"--server-key: {exc}")
    password = _read_secret("password", from_stdin)
    try:
        info = login(state, server, key, user, password, node_name=node_name)
    except EnrollmentError as exc:
        _fail(str(exc))
    typer.echo(f"logged in as {user}: node {info.node}")


def _read_secret(what: str, from_stdin: bool, *, twice: bool = False) -> str:
    """One secret from stdin's next line (--password-stdin) or a prompt on a TTY; never from argv."""
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            _fail(f"no {what} on stdin")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        _fail(f"no TTY to ask for the {what}: use --password-stdin")
    secret = getpass.getpass(f"{what}: ")
    if twice and getpass.getpass(f"{what} again: ") != secret:
        _fail(f"the two {what}s differ")
    return secret


@agent_app.command("passwd")
def passwd(
    user: Annotated[
        str | None, typer.Option("--user", help="The user [default: the one that logged this node in].")
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the old, then the new password from stdin's first lines.")
    ] = False,
    state_dir: StateDirOption = None,
) -> None:
    """Change the VPN password of this node's user: the server checks the old one, applies, confirms."""
    state = StateDir(state_dir or default_state_dir())
    old = _read_secret("old password", password_stdin)
    new = _read_secret("new password", password_stdin, twice=True)
    try:
        changed = change_password(state, old, new, user=user or "")
    except (StateError, EnrollmentError) as exc:
        _fail(f"password not changed: {exc}")
    typer.echo(f"password of {changed.user} changed (confirmed by the server, change #{changed.change_id})")


@agent_app.command("status")
def status(
    state_dir: StateDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """This node's view: its VPNs and addresses, its peers and their state."""
    state = StateDir(state_dir or default_state_dir())
    try:
        doc = status_doc(state)
    except StateError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(doc))
        return
    age = f", {time.time() - doc['updated']:.0f}s ago" if doc["updated"] else ""
    typer.echo(
        f"node {doc['node']}: {doc['state']}{age}, revision {doc['revision']}, server {', '.join(doc['server'])}"
    )
    for name, vpn in doc["vpns"].items():
        if vpn["addressing"] == "native":  # real addresses: the subnet is not used
            address = vpn["vip"] or "address not reported yet"
            typer.echo(f"  vpn {name}: {address} ({vpn['role']}), native addressing, {vpn['topology']}")
            continue
        typer.echo(f"  vpn {name}: {vpn['vip']} ({vpn['role']}) in {vpn['subnet']}, {vpn['topology']}")
    tunnels = (doc["dataplane"] or {}).get("peers", {})
    nat = (doc["dataplane"] or {}).get("nat")
    if nat and nat.get("filtering"):  # what the server classes this node from (peers show their class)
        typer.echo(f"  nat: seen as {nat['mapped'] or '-'}, UDP {nat['filtering']}")
    if doc["dataplane"]:  # what this node reports to the server; peers' paths and checksums follow it
        typer.echo(f"  offloads: {', '.join(doc['dataplane'].get('caps', [])) or 'none'}")
    for name, peer in doc["peers"].items():
        addresses = ", ".join(f"{v} {ip}" for v, ip in peer["vips"].items())
        tunnel = tunnels.get(name)
        path = ""
        if tunnel:
            keys = "keys ready" if tunnel["spi_out"] else "waiting for keys"
            where = tunnel.get("stream") or f"to {tunnel['endpoint'] or 'no endpoint yet'}"
            why = f" (peer {tunnel['peer_class']})" if tunnel.get("peer_class") else ""
            checksums = f", {tunnel['inner_checksums']} checksums" if tunnel.get("inner_checksums") else ""
            path = f"; {tunnel['path']}{why} {where}, {keys}{checksums}"
        typer.echo(f"  peer {name}: {addresses}, {'online' if peer['online'] else 'offline'}{path}")
    if not doc["peers"]:
        typer.echo("  no peers")
    overloaded = (doc["dataplane"] or {}).get("portmap", [])
    if overloaded:  # flows of peers that share one address (behind one PAT), told apart by port
        typer.echo(f"  {len(overloaded)} flows of peers sharing an address, by overloaded port:")
        for m in overloaded[:20]:
            typer.echo(f"    {m['peer']} proto {m['proto']}: port {m['original']} seen here as {m['public']}")


def status_doc(state: StateDir) -> dict[str, Any]:
    """What `agent status --json` prints: the stored view and the running agent's last report."""
    server = state.server()
    stored = state.load_view()
    running = state.load_status()
    return {
        "node": stored.view.node if stored else server.node,
        "server": server.endpoints,
        "state": running.get("state", "unknown"),
        "revision": stored.revision if stored else 0,
        "vpns": {n: v.model_dump(mode="json") for n, v in stored.view.vpns.items()} if stored else {},
        "peers": {n: p.model_dump(mode="json") for n, p in stored.view.peers.items()} if stored else {},
        "acl": [a.model_dump(mode="json") for a in stored.view.acl] if stored else [],
        "updated": running.get("at"),
        "dataplane": running.get("dataplane"),
    }


def _ipv4_only(hosts: list[str]) -> list[str]:
    """Server hosts given as IPv4 literals (a name would need resolving; exit-node users give addresses)."""
    import ipaddress

    found = []
    for host in hosts:
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).version == 4:
                found.append(host)
    return found
