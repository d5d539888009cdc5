"""Snapshot tests of the main screens at 80x24 and 160x48, rendered from fixed data (no server).

Why: the layout must work in the smallest usual terminal and use a large
one; snapshots pin both. The data is fixed (tests/tui/fixed_state.py) and
the App has no server link, so no clock, key or port reaches the screen.
Update after an intended change: pytest tests/tui --snapshot-update.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from textual.pilot import Pilot

from tests.tui.fixed_state import FIXED, JOIN
from tui.app.app import CoterieApp
from tui.app.screens.join import JoinScreen
from tui.app.widgets.status_bar import StatusBar

SIZES = [(80, 24), (160, 48)]


async def _join(pilot: Pilot) -> None:
    pilot.app.push_screen(JoinScreen("laptop-ann", JOIN))
    await pilot.pause()


async def _down(pilot: Pilot) -> None:
    pilot.app.query_one(StatusBar).down("no reply from service 'fanout' after 1 attempts", 4.0)
    await pilot.pause()


SCREENS: dict[str, tuple[list[str], Callable[[Pilot], Awaitable[None]] | None]] = {
    "vpns": ([], None),
    "nodes": (["2"], None),
    "acl": (["3"], None),
    "events": (["4"], None),
    "events_filtered": (["slash", *"offline"], None),
    "node_detail": (["2", "enter"], None),
    "acl_form_error": (["r", *"ann", "tab", *"any", "tab", "tab", *"22"], None),
    "help": (["question_mark"], None),
    "join": ([], _join),
    "server_lost": ([], _down),
    "light_theme": (["t", "2"], None),
}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen(snap_compare, screen: str, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    press, before = SCREENS[screen]
    assert snap_compare(CoterieApp(state=FIXED), press=press, run_before=before, terminal_size=size)
