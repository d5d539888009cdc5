"""Keyboard first: every action has a key, the palette lists them all, and the keys do what help says.

Run on fixed data without a server (no request leaves the App), so these
check the TUI's own wiring; test_live.py checks the same keys against a server.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

from tests.conftest import ROOT
from tests.tui.fixed_state import FIXED
from tui.app.actions import ACTIONS
from tui.app.app import CoterieApp
from tui.app.management import NO_ROTATION
from tui.app.screens.confirm import ConfirmScreen
from tui.app.screens.form import FormScreen
from tui.app.screens.help import HelpScreen
from tui.app.screens.node_detail import NodeDetailScreen


def test_every_action_has_a_distinct_key_and_a_handler() -> None:
    keys = [a.key for a in ACTIONS]
    assert len(keys) == len(set(keys))
    app = CoterieApp(state=FIXED)
    for action in ACTIONS:
        name = action.action.split("(")[0]
        assert callable(getattr(app, f"action_{name}", None)), action


def test_palette_help_and_keys() -> None:
    async def scenario() -> None:
        app = CoterieApp(state=FIXED)
        async with app.run_test(size=(80, 24)) as pilot:
            titles = {c.title for c in app.get_system_commands(app.screen)}
            assert {a.title for a in ACTIONS} <= titles
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape", "2", "down", "x")
            assert isinstance(app.screen, ConfirmScreen) and "laptop-ann" in app.screen.question
            await pilot.press("n")
            assert not isinstance(app.screen, ConfirmScreen)
            await pilot.press("enter")
            assert isinstance(app.screen, NodeDetailScreen) and app.screen.node_name == "laptop-ann"
            await pilot.press("escape", "1", "m")
            assert isinstance(app.screen, FormScreen)
            assert app.screen.values() == {"node": "gw-berlin", "vpn": "office", "role": "member"}
            await pilot.press("escape", "k")
            await pilot.pause()
            assert any(NO_ROTATION in n.message for n in app._notifications)
            await pilot.press("c", *"lab2", "tab", *"10.30.0.0/24", "enter")  # no server: a notice, no crash
            await pilot.pause()
            assert isinstance(app.screen, FormScreen)
            assert "not connected" in str(app.screen.query_one("#error-form").render())

    asyncio.run(scenario())


def test_tui_command_fails_in_one_line_without_a_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "tui.cli", "tui", "--dir", str(tmp_path / "nowhere")]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("coterie: error:") and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
