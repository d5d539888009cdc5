"""How values look in the tables: one place for times, states and empty cells."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from datetime import datetime

from rich.text import Text
from textual.coordinate import Coordinate
from textual.widgets import DataTable
from textual.widgets.data_table import RowDoesNotExist

Cell = str | Text


def when(value: datetime | None) -> str:
    """An absolute UTC time (no 'x seconds ago': the screen must not change by itself)."""
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def state(online: bool, enrolled: bool = True) -> Text:
    if online:
        return Text("● online", style="bold green")
    if enrolled:
        return Text("○ offline", style="bold red")
    return Text("◌ not enrolled", style="dim")


def text(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def fill(table: DataTable, rows: Iterable[tuple[str, Sequence[Cell]]]) -> None:
    """Replace the rows, keeping the cursor on the same key when it still exists."""
    selected = selected_key(table)
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    if selected is not None:
        with contextlib.suppress(RowDoesNotExist):  # the row is gone: the cursor stays where clear() left it
            table.move_cursor(row=table.get_row_index(selected), animate=False)


def selected_key(table: DataTable) -> str | None:
    if not table.row_count:
        return None
    row = min(table.cursor_row, table.row_count - 1)
    key = table.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value
    return str(key) if key is not None else None
