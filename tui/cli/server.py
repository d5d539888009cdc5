"""``coterie server up`` and ``coterie service run``: running the server's processes."""

from __future__ import annotations

from typing import Annotated

import typer

from bus.messages.services import SERVICE_NAMES
from services.config import load_config
from services.logsetup import setup_logging
from tui.cli.options import DirOption, resolve_dir

PROCESS_NAMES = ("broker", *SERVICE_NAMES)

server_app = typer.Typer(help="Run the control server.", no_args_is_help=True)
service_app = typer.Typer(help="Run one server process alone (multi-machine deployments).", no_args_is_help=True)

ListenOption = Annotated[str | None, typer.Option("--listen", help="Override the listen address of config.toml.")]
PortOption = Annotated[
    int | None, typer.Option("--port", help="Override the broker port of config.toml.", min=1, max=65535)
]


@server_app.command("up")
def server_up(directory: DirOption = None, listen: ListenOption = None, port: PortOption = None) -> None:
    """Run the broker and the services in the foreground; restart any that dies; Ctrl-C stops all."""
    # Imported here, not at the top: only the server needs every service's modules (the CLI starts faster),
    # and before logging is set up, so that importing them says nothing on the console.
    from services.supervisor.supervisor import Supervisor

    config = load_config(resolve_dir(directory)).with_overrides(listen=listen, port=port)
    setup_logging("supervisor")

    supervisor = Supervisor(config)
    supervisor.install_signal_handlers()
    supervisor.run()


@service_app.command("run")
def service_run(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(PROCESS_NAMES)}.")],
    directory: DirOption = None,
    broker: Annotated[str | None, typer.Option("--broker", help="Broker endpoint [default: from config.toml].")] = None,
    listen: ListenOption = None,
    port: PortOption = None,
) -> None:
    """Run one process (the broker or a service) in the foreground."""
    if name not in PROCESS_NAMES:
        raise typer.BadParameter(f"unknown process {name!r}; choose one of {', '.join(PROCESS_NAMES)}")
    from services.processes import run_process  # see server_up

    config = load_config(resolve_dir(directory)).with_overrides(listen=listen, port=port)
    run_process(name, config, broker)
