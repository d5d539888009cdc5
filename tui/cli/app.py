"""The root ``coterie`` typer app.

Command groups live one module each and are mounted here; expected failures
(a missing config, a bad key file, an unreachable server) become a one-line
error and exit code 1, never a traceback.
"""

from __future__ import annotations

import sys

import typer
from typer.exceptions import TyperException

from bus.errors import BusError
from nodeagent.cli import agent_app
from services.config import ConfigError
from services.supervisor.errors import PortInUseError
from tui.cli import audit, bench, lab, manage, server, setup, status, tokens, tui_cmd, users

app = typer.Typer(
    name="coterie",
    help="Coterie: a self-hosted, centrally managed VPN for workgroups.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(setup.init)
app.command()(status.status)
app.add_typer(server.server_app, name="server")
app.add_typer(server.service_app, name="service")
app.add_typer(manage.vpn_app, name="vpn")
app.add_typer(manage.node_app, name="node")
app.add_typer(manage.member_app, name="member")
app.add_typer(manage.route_app, name="route")
app.add_typer(manage.acl_app, name="acl")
app.command()(manage.events)
app.add_typer(agent_app, name="agent")
app.add_typer(users.user_app, name="user")
app.add_typer(tokens.token_app, name="token")
app.command()(audit.audit)
app.command("tui")(tui_cmd.tui)
app.add_typer(lab.lab_app, name="lab")
app.add_typer(bench.bench_app, name="bench")


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        print("coterie: aborted", file=sys.stderr)
        sys.exit(130)
    except TyperException as exc:  # usage errors: one line, exit 2, as click would
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(2)  # the help text has been printed already
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"coterie: error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except (ConfigError, BusError, PortInUseError) as exc:
        print(f"coterie: error: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
