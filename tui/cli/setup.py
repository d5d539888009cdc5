"""``coterie init``: a configuration directory with fresh keys for the server and a first operator."""

from __future__ import annotations

from typing import Annotated

import typer

from bus.identity import Identity, Role
from bus.keys import KeyPair, save_keypair
from bus.messages.services import SERVICE_NAMES
from bus.registry import write_registry_file
from bus.signing import generate_signing_key
from services.config import DEFAULT_LISTEN, DEFAULT_PORT, ServerConfig
from tui.cli.errors import fail
from tui.cli.options import DirOption, resolve_dir

OPERATOR = "admin"


def init(
    directory: DirOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing keys and config.")] = False,
    listen: Annotated[str, typer.Option(help="Address the broker listens on.")] = DEFAULT_LISTEN,
    port: Annotated[int, typer.Option(help="Port the broker listens on.", min=1, max=65535)] = DEFAULT_PORT,
) -> None:
    """Write a server config and fresh CURVE keys for the server, its services and an operator."""
    path = resolve_dir(directory)
    config = ServerConfig(directory=path, listen=listen, port=port)
    existing = [p for p in (config.key_path("server"), path / "config.toml") if p.exists()]
    if existing and not force:
        fail(f"{existing[0]} already exists; use --force to replace the keys and config")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    server_key = _new_key(config, "server", force)
    identities = [Identity(Role.OPERATOR, OPERATOR, _new_key(config, OPERATOR, force))]
    identities += [Identity(Role.SERVICE, name, _new_key(config, name, force)) for name in SERVICE_NAMES]
    write_registry_file(config.registry_path, identities)
    generate_signing_key(config.signing_key_path, force=force)
    (path / "config.toml").write_text(config.to_toml())
    typer.echo(f"initialised {path}")
    typer.echo(f"  server public key: {server_key}")
    typer.echo(f"  operator key:      {config.key_path(OPERATOR)}")
    typer.echo(f"next: coterie server up --dir {path}")


def _new_key(config: ServerConfig, name: str, force: bool) -> str:
    keypair = KeyPair.generate()
    save_keypair(keypair, config.keys_dir, name, force=force)
    return keypair.public_text
