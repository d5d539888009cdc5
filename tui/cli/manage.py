"""Operator commands that manage the truth: vpn, node, member, route, acl, events.

Every mutating command takes --dry-run (commit nothing; list the nodes the
change would reach and each one's view diff) and --json.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from bus.messages.datastore import (
    AclAdd,
    AclList,
    AclListRequest,
    AclRemove,
    Events,
    EventsRequest,
    MemberAdd,
    MemberRemove,
    Mutated,
    NodeAdd,
    NodeDetail,
    NodeList,
    NodeListRequest,
    NodeRemove,
    NodeRename,
    NodeSet,
    NodeShowRequest,
    RouteAdd,
    RouteRemove,
    VpnCreate,
    VpnDelete,
    VpnDetail,
    VpnList,
    VpnListRequest,
    VpnSet,
    VpnShowRequest,
)
from tui.cli.options import DirOption, JsonOption, KeyOption, ServerKeyOption, ServerOption
from tui.cli.remote import call, new_idempotency_key, print_json, report_mutation, table

DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Commit nothing; show the nodes it would reach and their diffs.")
]

vpn_app = typer.Typer(help="Create, list, show and delete VPNs.", no_args_is_help=True)
node_app = typer.Typer(help="Add, list, show, rename and remove nodes.", no_args_is_help=True)
member_app = typer.Typer(help="Add nodes to VPNs and remove them.", no_args_is_help=True)
route_app = typer.Typer(help="Subnets behind gateway nodes.", no_args_is_help=True)
acl_app = typer.Typer(help="Allow rules per VPN (no rules: members talk freely).", no_args_is_help=True)


class Remote:
    """The connection options every operator command takes, gathered once."""

    def __init__(self, directory, server, server_key, key) -> None:  # type: ignore[no-untyped-def]
        self.options = {"server": server, "server_key": server_key, "key": key}
        self.directory = directory

    def __call__(self, message, **kw):  # type: ignore[no-untyped-def]
        return call(self.directory, message, **self.options, **kw)


def _mutate(remote: Remote, message_type, as_json: bool, dry_run: bool, **fields) -> Mutated:  # type: ignore[no-untyped-def]
    message = message_type(dry_run=dry_run, idempotency_key=new_idempotency_key(), **fields)
    result = remote(message)
    assert isinstance(result, Mutated)
    report_mutation(result, as_json)
    return result


# ---------------------------------------------------------------------- vpn
@vpn_app.command("create")
def vpn_create(
    name: str,
    subnet: Annotated[str, typer.Option("--subnet", help="Overlay subnet, e.g. 10.10.0.0/24.")],
    addressing: Annotated[str, typer.Option(help="overlay or native.")] = "overlay",
    topology: Annotated[str, typer.Option(help="mesh or hub-spoke.")] = "mesh",
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Create a VPN."""
    if addressing not in ("overlay", "native"):
        raise typer.BadParameter("--addressing must be overlay or native")
    if topology not in ("mesh", "hub-spoke"):
        raise typer.BadParameter("--topology must be mesh or hub-spoke")
    remote = Remote(directory, server, server_key, key)
    _mutate(remote, VpnCreate, as_json, dry_run, name=name, subnet=subnet, addressing=addressing, topology=topology)


@vpn_app.command("set")
def vpn_set(
    name: str,
    keepalive: Annotated[
        int | None, typer.Option("--keepalive", help="Seconds between keepalives on UDP paths (1..3600).")
    ] = None,
    mtu: Annotated[int | None, typer.Option("--mtu", help="Inner MTU of the VPN's tunnels (1280..9000).")] = None,
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Change a VPN's tunnel settings (keepalive below the NAT's UDP timeout keeps PAT mappings open)."""
    if keepalive is None and mtu is None:
        raise typer.BadParameter("give --keepalive and/or --mtu")
    if keepalive is not None and not 1 <= keepalive <= 3600:
        raise typer.BadParameter("--keepalive must be 1..3600 seconds")
    if mtu is not None and not 1280 <= mtu <= 9000:
        raise typer.BadParameter("--mtu must be 1280..9000")
    remote = Remote(directory, server, server_key, key)
    _mutate(remote, VpnSet, as_json, dry_run, name=name, keepalive=keepalive, mtu=mtu)


@vpn_app.command("list")
def vpn_list(
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """List VPNs with member counts."""
    reply = Remote(directory, server, server_key, key)(VpnListRequest())
    assert isinstance(reply, VpnList)
    if as_json:
        print_json([v.model_dump(mode="json") for v in reply.vpns])
        return
    rows = [[v.name, v.subnet, v.addressing, v.topology, v.mtu, v.keepalive, v.members, v.online] for v in reply.vpns]
    table("VPNs", ["name", "subnet", "addressing", "topology", "mtu", "keepalive", "members", "online"], rows)


@vpn_app.command("show")
def vpn_show(
    name: str,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Show a VPN: its members, their addresses and routes, and its ACL."""
    reply = Remote(directory, server, server_key, key)(VpnShowRequest(name=name))
    assert isinstance(reply, VpnDetail)
    if as_json:
        print_json(reply)
        return
    v = reply.vpn
    typer.echo(f"VPN {v.name}: {v.subnet}, {v.addressing}, {v.topology}, {v.members} members, {v.online} online")
    rows = [[m.node, m.vip, m.role, "yes" if m.online else "no", ", ".join(m.routes)] for m in reply.members]
    table("members", ["node", "address", "role", "online", "routes"], rows)
    if reply.acl:
        table(
            "ACL", ["id", "from", "to", "proto", "ports"], [[r.id, r.src, r.dst, r.proto, r.ports] for r in reply.acl]
        )


@vpn_app.command("delete")
def vpn_delete(
    name: str,
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Delete a VPN and its memberships, routes and rules."""
    _mutate(Remote(directory, server, server_key, key), VpnDelete, as_json, dry_run, name=name)


# ---------------------------------------------------------------------- node
@node_app.command("add")
def node_add(
    name: str,
    vpn: Annotated[list[str] | None, typer.Option("--vpn", help="A VPN to join (repeatable).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="A tag for ACL rules (repeatable).")] = None,
    expires: Annotated[float, typer.Option("--expires", help="Hours the join string stays valid.")] = 24.0,
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Create a node and print its one-time join string (for `coterie agent up --join`)."""
    remote = Remote(directory, server, server_key, key)
    result = _mutate(
        remote, NodeAdd, as_json, dry_run, name=name, vpns=vpn or [], tags=tag or [], expires_hours=expires
    )
    if result.join and not as_json:
        typer.echo(f"join string (valid {expires:g} h, once):\n{result.join}")


@node_app.command("list")
def node_list(
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """List nodes with their VPNs, addresses and state."""
    reply = Remote(directory, server, server_key, key)(NodeListRequest())
    assert isinstance(reply, NodeList)
    if as_json:
        print_json([n.model_dump(mode="json") for n in reply.nodes])
        return
    rows = [
        [
            n.name,
            ", ".join(f"{vpn} {ip}" for vpn, ip in n.vips.items()),
            "online" if n.online else ("offline" if n.enrolled else "not enrolled"),
            n.nat_class,
            n.agent_version,
            n.last_seen.strftime("%Y-%m-%d %H:%M:%S") if n.last_seen else None,
        ]
        for n in reply.nodes
    ]
    table("nodes", ["name", "addresses", "state", "nat", "agent", "last seen"], rows)


@node_app.command("show")
def node_show(
    name: str,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Show one node."""
    reply = Remote(directory, server, server_key, key)(NodeShowRequest(name=name))
    assert isinstance(reply, NodeDetail)
    if as_json:
        print_json(reply.node)
        return
    n = reply.node
    for label, value in [
        ("node", n.name),
        ("state", "online" if n.online else ("offline" if n.enrolled else "not enrolled")),
        ("addresses", ", ".join(f"{vpn} {ip} ({n.roles[vpn]})" for vpn, ip in n.vips.items())),
        ("tags", ", ".join(n.tags)),
        ("nat class", n.nat_class),
        ("path pin", n.path_pin or "none (the server decides per pair)"),
        ("endpoints", ", ".join(n.endpoints)),
        ("offloads", ", ".join(n.caps) or "none reported"),
        ("agent", n.agent_version),
        ("last seen", n.last_seen),
    ]:
        typer.echo(f"{label:>10}: {value if value not in (None, '') else '-'}")


@node_app.command("remove")
def node_remove(
    name: str,
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Remove a node: its key is revoked at once and its peers forget it."""
    _mutate(Remote(directory, server, server_key, key), NodeRemove, as_json, dry_run, name=name)


@node_app.command("set")
def node_set(
    name: str,
    path: Annotated[str, typer.Option("--path", help="auto (the server decides per pair), esp, udp, tcp443 or relay.")],
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Pin the path of every pair with NAME (say, tcp443 where UDP is throttled); auto removes the pin."""
    if path not in ("auto", "esp", "udp", "tcp443", "relay"):
        raise typer.BadParameter("--path must be auto, esp, udp, tcp443 or relay")
    _mutate(Remote(directory, server, server_key, key), NodeSet, as_json, dry_run, name=name, path=path)


@node_app.command("rename")
def node_rename(
    name: str,
    new_name: str,
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Rename a node (its ACL rules follow)."""
    _mutate(Remote(directory, server, server_key, key), NodeRename, as_json, dry_run, name=name, new_name=new_name)


# ---------------------------------------------------------------------- member
@member_app.command("add")
def member_add(
    node: str,
    vpn: str,
    role: Annotated[str, typer.Option(help="member, gateway or hub.")] = "member",
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Add NODE to VPN (an address is allocated from the VPN's subnet)."""
    if role not in ("member", "gateway", "hub"):
        raise typer.BadParameter("--role must be member, gateway or hub")
    _mutate(Remote(directory, server, server_key, key), MemberAdd, as_json, dry_run, node=node, vpn=vpn, role=role)


@member_app.command("remove")
def member_remove(
    node: str,
    vpn: str,
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Remove NODE from VPN (its address is freed)."""
    _mutate(Remote(directory, server, server_key, key), MemberRemove, as_json, dry_run, node=node, vpn=vpn)


# ---------------------------------------------------------------------- route
@route_app.command("add")
def route_add(
    node: str,
    vpn: str,
    cidr: str,
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Route CIDR in VPN through gateway NODE."""
    _mutate(Remote(directory, server, server_key, key), RouteAdd, as_json, dry_run, node=node, vpn=vpn, cidr=cidr)


@route_app.command("remove")
def route_remove(
    node: str,
    vpn: str,
    cidr: str,
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Remove a gateway route."""
    _mutate(Remote(directory, server, server_key, key), RouteRemove, as_json, dry_run, node=node, vpn=vpn, cidr=cidr)


# ---------------------------------------------------------------------- acl
@acl_app.command("add")
def acl_add(
    vpn: str,
    src: Annotated[str, typer.Option("--from", help="any, a node name, or tag:TAG.")],
    dst: Annotated[str, typer.Option("--to", help="any, a node name, or tag:TAG.")],
    proto: Annotated[str, typer.Option(help="any, tcp, udp or icmp.")] = "any",
    ports: Annotated[str, typer.Option(help="For tcp/udp: e.g. 22,80,8000-8100.")] = "",
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Allow traffic in VPN from --from to --to."""
    if proto not in ("any", "tcp", "udp", "icmp"):
        raise typer.BadParameter("--proto must be any, tcp, udp or icmp")
    remote = Remote(directory, server, server_key, key)
    _mutate(remote, AclAdd, as_json, dry_run, vpn=vpn, src=src, dst=dst, proto=proto, ports=ports)


@acl_app.command("list")
def acl_list(
    vpn: Annotated[str | None, typer.Argument(help="Only this VPN's rules.")] = None,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """List ACL rules."""
    reply = Remote(directory, server, server_key, key)(AclListRequest(vpn=vpn))
    assert isinstance(reply, AclList)
    if as_json:
        print_json([r.model_dump(mode="json") for r in reply.rules])
        return
    table(
        "ACL",
        ["id", "vpn", "from", "to", "proto", "ports"],
        [[r.id, r.vpn, r.src, r.dst, r.proto, r.ports] for r in reply.rules],
    )


@acl_app.command("remove")
def acl_remove(
    rule_id: Annotated[int, typer.Argument(help="The rule's id (see `acl list`).")],
    dry_run: DryRun = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Remove an ACL rule."""
    _mutate(Remote(directory, server, server_key, key), AclRemove, as_json, dry_run, id=rule_id)


# ---------------------------------------------------------------------- events
def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new changes as they happen.")] = False,
    since: Annotated[int, typer.Option(help="Start after this revision.")] = 0,
    limit: Annotated[int, typer.Option(help="At most this many changes (newest).", min=1, max=1000)] = 50,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """The change log with receipts: how many affected nodes applied each change, and who is pending."""
    remote = Remote(directory, server, server_key, key)
    if not since and not follow:
        head = remote(EventsRequest(since=0, limit=1))
        assert isinstance(head, Events)
        since = max(0, head.head - limit)
    while True:
        reply = remote(EventsRequest(since=since, limit=min(limit, 1000)))
        assert isinstance(reply, Events)
        for event in reply.events:
            _print_event(event, as_json)
            since = event.revision
        if not follow:
            return
        time.sleep(0.5)


def _print_event(event, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    if as_json:
        print_json(event)
        return
    receipt = ""
    if event.reached:
        receipt = f"  [applied on {event.applied}/{event.reached} nodes"
        if event.pending:
            since = event.pending_since.strftime("%H:%M:%S") if event.pending_since else "?"
            receipt += f", pending: {', '.join(event.pending)} since {since}"
        receipt += "]"
    typer.echo(f"r{event.revision} {event.at:%Y-%m-%d %H:%M:%S} {event.actor}: {event.summary}{receipt}")
