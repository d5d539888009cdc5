"""``coterie token ...``: enrollment tokens (pre-auth keys) for one VPN (requests to the auth service)."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from bus.messages.auth import Done, TokenCreate, TokenCreated, TokenList, TokenListRequest, TokenRevoke
from tui.cli.options import DirOption, JsonOption, KeyOption, ServerKeyOption, ServerOption
from tui.cli.remote import call, print_json, table

token_app = typer.Typer(help="Enrollment tokens: join strings for one VPN, reusable or limited.", no_args_is_help=True)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([mhd]?)$")


def parse_hours(text: str) -> float:
    """``90m``, ``24h``, ``7d`` or a plain number of hours."""
    match = _DURATION.match(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise typer.BadParameter(f"--expires {text!r}: use e.g. 90m, 24h or 7d")
    value, unit = float(match.group(1)), match.group(2) or "h"
    return value / 60 if unit == "m" else value * 24 if unit == "d" else value


def _auth(directory, server, server_key, key, message):  # type: ignore[no-untyped-def]
    return call(directory, message, service="auth", server=server, server_key=server_key, key=key)


@token_app.command("create")
def token_create(
    vpn: Annotated[str, typer.Option("--vpn", help="The VPN a node enrolling with it joins.")],
    reusable: Annotated[
        bool, typer.Option("--reusable", help="Many nodes may use it (until --uses or expiry).")
    ] = False,
    expires: Annotated[str, typer.Option("--expires", help="Validity: e.g. 90m, 24h, 7d.")] = "24h",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="A tag for the nodes (repeatable).")] = None,
    uses: Annotated[int | None, typer.Option("--uses", help="At most this many enrollments.", min=1)] = None,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Create a token and print its join string (for `coterie agent up --join ... --node-name N`)."""
    message = TokenCreate(vpn=vpn, reusable=reusable, uses=uses, expires_hours=parse_hours(expires), tags=tag or [])
    reply = _auth(directory, server, server_key, key, message)
    assert isinstance(reply, TokenCreated)
    if as_json:
        print_json(reply)
        return
    typer.echo(reply.summary)
    typer.echo(f"join string:\n{reply.join}")


@token_app.command("list")
def token_list(
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """List tokens with their state (valid, expired, revoked, used up)."""
    reply = _auth(directory, server, server_key, key, TokenListRequest())
    assert isinstance(reply, TokenList)
    if as_json:
        print_json([t.model_dump(mode="json") for t in reply.tokens])
        return
    rows = [
        [
            t.id,
            t.vpn,
            t.state,
            f"{t.uses}/{t.max_uses if t.max_uses is not None else 'unlimited'}",
            t.expires_at.strftime("%Y-%m-%d %H:%M:%S"),
            ", ".join(t.tags),
        ]
        for t in reply.tokens
    ]
    table("tokens", ["id", "vpn", "state", "uses", "expires (UTC)", "tags"], rows)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[int, typer.Argument(help="The token's id (see `token list`).")],
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Revoke a token: nodes that enrolled with it stay; no new one may."""
    reply = _auth(directory, server, server_key, key, TokenRevoke(id=token_id))
    assert isinstance(reply, Done)
    print_json(reply) if as_json else typer.echo(reply.summary)
