"""How operator commands talk to the server and print what comes back.

One place for: connecting with the operator key, turning server errors into
one-line failures, and printing a reply as a table (people) or JSON (scripts).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from bus.errors import BusError, RemoteError
from bus.messages import Message
from bus.messages.datastore import Mutated
from tui.cli.errors import fail
from tui.cli.options import resolve_dir
from tui.client import connect, resolve_address


def call(
    directory: Path | None,
    message: Message,
    *,
    service: str = "datastore",
    server: str | None = None,
    server_key: str | None = None,
    key: Path | None = None,
) -> Message:
    """Send one request as the operator; exit with a one-line error if it fails."""
    address = resolve_address(resolve_dir(directory), server, server_key, key)
    with connect(address, timeout=5.0, retries=2) as client:
        try:
            return client.request(service, message)
        except RemoteError as exc:
            fail(exc.message if exc.code in ("invalid", "not_found", "conflict") else f"{exc.code}: {exc.message}")
        except BusError as exc:
            fail(f"cannot reach the server at {address.endpoint}: {exc}")


def new_idempotency_key() -> str:
    """Each command invocation is one operation: retries inside it are applied once."""
    return uuid.uuid4().hex


def print_json(message: Message | list[Any] | dict[str, Any]) -> None:
    if isinstance(message, Message):
        typer.echo(message.model_dump_json())
    else:
        typer.echo(json.dumps(message, default=str))


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    grid = Table(title=title, title_justify="left")
    for column in columns:
        grid.add_column(column)
    for row in rows:
        grid.add_row(*("-" if v is None or v == "" else str(v) for v in row))
    Console().print(grid)


def report_mutation(result: Mutated, as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    if result.dry_run:
        typer.echo(f"dry run: {result.summary}")
        typer.echo(f"would reach {len(result.reached)} node(s): {', '.join(result.reached) or 'none'}")
        for diff in result.preview:
            typer.echo(f"  {diff.node}:")
            for line in describe_delta(diff.delta):
                typer.echo(f"    {line}")
        return
    again = " (already applied: nothing new)" if result.replayed else ""
    typer.echo(f"r{result.revision}: {result.summary}{again}")


def describe_delta(delta: Any) -> list[str]:
    lines = []
    if delta.node:
        lines.append(f"~ renamed to {delta.node}")
    lines += [f"+ vpn {name} ({v.vip}, {v.role})" for name, v in delta.set_vpns.items()]
    lines += [f"- vpn {name}" for name in delta.del_vpns]
    for name, peer in delta.set_peers.items():
        addresses = ", ".join(f"{vpn} {ip}" for vpn, ip in peer.vips.items())
        routes = "".join(f", route {r.cidr}" for r in peer.routes)
        lines.append(f"+ peer {name} ({addresses}{routes}{'' if peer.online else ', offline'})")
    lines += [f"- peer {name}" for name in delta.del_peers]
    if delta.acl is not None:
        lines.append(f"~ acl: {len(delta.acl)} rule(s)")
        lines += [f"    #{r.id} {r.src} -> {r.dst} {r.proto} {r.ports}".rstrip() for r in delta.acl]
    return lines
