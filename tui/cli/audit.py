"""``coterie audit``: the authentication and operator audit log, oldest first (``--follow`` keeps reading)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from bus.messages.auth import AuditInfo, AuditLog, AuditRequest
from tui.cli.options import DirOption, JsonOption, KeyOption, ServerKeyOption, ServerOption
from tui.cli.remote import call, print_json

FOLLOW_INTERVAL = 0.5


def audit(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new entries as they come.")] = False,
    since: Annotated[int, typer.Option(help="Start after this entry id.")] = 0,
    limit: Annotated[int, typer.Option(help="At most this many entries (newest).", min=1, max=1000)] = 50,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Logins, failures, lockouts, token uses, password changes and operator actions, with source addresses."""

    def fetch(after: int, count: int) -> AuditLog:
        reply = call(
            directory,
            AuditRequest(since=after, limit=count),
            service="auth",
            server=server,
            server_key=server_key,
            key=key,
        )
        assert isinstance(reply, AuditLog)
        return reply

    if not since and not follow:
        since = max(0, fetch(0, 1).head - limit)
    while True:
        reply = fetch(since, min(limit, 1000))
        for entry in reply.entries:
            _print(entry, as_json)
            since = entry.id
        if not follow:
            return
        time.sleep(FOLLOW_INTERVAL)


def _print(entry: AuditInfo, as_json: bool) -> None:
    if as_json:
        print_json(entry.model_dump(mode="json"))
        return
    outcome = "ok" if entry.ok else "FAILED"
    source = f" from {entry.source}" if entry.source else ""
    typer.echo(
        f"#{entry.id} {entry.at:%Y-%m-%d %H:%M:%S} {entry.event} {outcome} {entry.identity}{source}: {entry.detail}"
    )
