"""``coterie user ...``: local users and who may log nodes in where (requests to the auth service)."""

from __future__ import annotations

import getpass
import sys
from typing import Annotated

import typer

from bus.messages.auth import Done, UserAdd, UserAllow, UserList, UserListRequest, UserLock, UserRemove
from tui.cli.errors import fail
from tui.cli.options import DirOption, JsonOption, KeyOption, ServerKeyOption, ServerOption
from tui.cli.remote import call, print_json, table

user_app = typer.Typer(
    help="Users whose nodes log in with a password, and the VPNs they may join.", no_args_is_help=True
)


def _auth(directory, server, server_key, key, message):  # type: ignore[no-untyped-def]
    return call(directory, message, service="auth", server=server, server_key=server_key, key=key)


def _report(reply: object, as_json: bool) -> None:
    assert isinstance(reply, Done)
    if as_json:
        print_json(reply)
    else:
        typer.echo(reply.summary)


def read_new_password(from_stdin: bool) -> str:
    """From stdin's first line, or asked twice on a TTY; never from the command line."""
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            fail("no password on stdin")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        fail("no TTY to ask for the password: use --password-stdin")
    first = getpass.getpass("password: ")
    if getpass.getpass("password again: ") != first:
        fail("the two passwords differ")
    return first


@user_app.command("add")
def user_add(
    name: str,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")] = False,
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Add a local user (the password is stored only as an argon2id hash)."""
    password = read_new_password(password_stdin)
    _report(_auth(directory, server, server_key, key, UserAdd(name=name, password=password)), as_json)


@user_app.command("list")
def user_list(
    as_json: JsonOption = False,
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """List users, the VPNs their nodes may join and their nodes."""
    reply = _auth(directory, server, server_key, key, UserListRequest())
    assert isinstance(reply, UserList)
    if as_json:
        print_json([u.model_dump(mode="json") for u in reply.users])
        return
    rows = [
        [u.name, u.kind, "locked" if u.locked else "active", ", ".join(u.vpns), ", ".join(u.nodes)] for u in reply.users
    ]
    table("users", ["name", "kind", "state", "vpns", "nodes"], rows)


def _simple(message_factory, help_text: str):  # type: ignore[no-untyped-def]
    def command(
        name: str,
        as_json: JsonOption = False,
        directory: DirOption = None,
        server: ServerOption = None,
        server_key: ServerKeyOption = None,
        key: KeyOption = None,
    ) -> None:
        _report(_auth(directory, server, server_key, key, message_factory(name)), as_json)

    command.__doc__ = help_text
    return command


user_app.command("remove")(_simple(lambda n: UserRemove(name=n), "Remove a user (its nodes stay)."))
user_app.command("lock")(_simple(lambda n: UserLock(name=n, locked=True), "Lock a user: its logins are refused."))
user_app.command("unlock")(_simple(lambda n: UserLock(name=n, locked=False), "Unlock a user."))


def _membership(allow: bool, help_text: str):  # type: ignore[no-untyped-def]
    def command(
        name: str,
        vpn: str,
        as_json: JsonOption = False,
        directory: DirOption = None,
        server: ServerOption = None,
        server_key: ServerKeyOption = None,
        key: KeyOption = None,
    ) -> None:
        _report(_auth(directory, server, server_key, key, UserAllow(name=name, vpn=vpn, allow=allow)), as_json)

    command.__doc__ = help_text
    return command


user_app.command("allow")(_membership(True, "Let NAME's nodes join VPN when they log in (user@realm too)."))
user_app.command("disallow")(_membership(False, "Stop NAME's future logins from joining VPN."))
