"""``coterie status``: ask the running server, as the operator, how each of its processes is."""

from __future__ import annotations

import dataclasses
import json

import typer
from rich.console import Console
from rich.table import Table

from bus.errors import BusError
from tui.cli.errors import EXIT_DEGRADED, fail
from tui.cli.options import DirOption, JsonOption, KeyOption, ServerKeyOption, ServerOption, resolve_dir
from tui.client import ProcessStatus, connect, resolve_address, server_status


def status(
    directory: DirOption = None,
    as_json: JsonOption = False,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Health of the broker and every service. Exit 0 if all are up, 3 if some are down, 1 if unreachable."""
    address = resolve_address(resolve_dir(directory), server, server_key, key)
    with connect(address) as client:
        try:
            rows = server_status(client)
        except BusError as exc:
            fail(f"cannot reach the server at {address.endpoint}: {exc}")
    if as_json:
        typer.echo(json.dumps({"server": address.endpoint, "processes": [dataclasses.asdict(r) for r in rows]}))
    else:
        _print_table(address.endpoint, rows)
    if not all(r.up for r in rows):
        raise typer.Exit(EXIT_DEGRADED)


def _print_table(endpoint: str, rows: list[ProcessStatus]) -> None:
    table = Table(title=f"Coterie server {endpoint}", title_justify="left")
    for column in ("process", "state", "pid", "uptime", "version", "workers"):
        table.add_column(column)
    for row in rows:
        state = "[green]up[/]" if row.up else f"[red]down[/] {row.error or ''}"
        table.add_row(
            row.name,
            state,
            str(row.pid or "-"),
            _duration(row.uptime),
            row.version or "-",
            str(row.workers),
        )
    Console().print(table)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
