"""Options shared by many commands, defined once so every command spells them alike."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services.config import default_dir

DirOption = Annotated[
    Path | None,
    typer.Option("--dir", help="Configuration directory [default: $COTERIE_HOME or ~/.coterie]."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
ServerOption = Annotated[
    str | None, typer.Option("--server", help="Broker endpoint of a remote server, e.g. tcp://host:7870.")
]
ServerKeyOption = Annotated[
    str | None, typer.Option("--server-key", help="The server's public key (Z85) or its .pub file.")
]
KeyOption = Annotated[Path | None, typer.Option("--key", help="Operator key file [default: DIR/keys/admin.key].")]


def resolve_dir(directory: Path | None) -> Path:
    return (directory or default_dir()).expanduser()
