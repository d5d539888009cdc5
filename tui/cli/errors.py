"""How the CLI fails: one line on stderr, a non-zero exit code, never a traceback."""

from __future__ import annotations

from typing import NoReturn

import typer

EXIT_ERROR = 1
EXIT_DEGRADED = 3


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    typer.echo(f"coterie: error: {message}", err=True)
    raise typer.Exit(code)
