"""The ``coterie`` command: the root typer app, mounting one module per command group."""

from __future__ import annotations

from tui.cli.app import app, main

__all__ = ["app", "main"]
