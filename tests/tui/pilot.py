"""Helpers for driving the real TUI with Textual's Pilot against a real server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from textual.pilot import Pilot

from tests.conftest import ROOT
from tests.helpers.server import CoterieServer


async def until(pilot: Pilot, predicate: Callable[[], object], timeout: float, step: float = 0.05) -> bool:
    """Let the app run until *predicate* holds or *timeout* passes (bounded: no key is pressed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await pilot.pause(step)
    return bool(predicate())


async def settle(pilot: Pilot) -> None:
    await pilot.pause()
    await asyncio.sleep(0)


def coterie(server: CoterieServer, *args: str) -> str:
    """Run the real `coterie` CLI against the server; its stdout (asserting exit 0)."""
    argv = [sys.executable, "-m", "tui.cli", *args, "--dir", str(server.home)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def release_operator(server: CoterieServer) -> None:
    """Close the test's own operator connection.

    The broker routes pushes by CURVE key to the newest connection of that
    key; the test's long-lived client shares the TUI's operator key and would
    take the TUI's notices.
    """
    if server._operator is not None:
        server._operator.close()
        server._operator = None


def home(server: CoterieServer) -> Path:
    return server.home
