"""The live change log (every mutation and presence change, with its actor and receipts), filterable."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Input

from bus.messages.datastore import EventInfo
from tui.app.state import ServerState
from tui.app.widgets.cells import fill, when


def matches(event: EventInfo, needle: str) -> bool:
    """Every word of the filter appears in the kind, actor or summary (case-insensitive)."""
    haystack = f"{event.kind} {event.actor} {event.summary}".lower()
    return all(word in haystack for word in needle.lower().split())


def receipt(event: EventInfo) -> str:
    if not event.reached:
        return "-"
    pending = f" ({len(event.pending)} pending)" if event.pending else ""
    return f"{event.applied}/{event.reached}{pending}"


class EventLog(Vertical):
    BINDINGS = [Binding("escape", "leave_filter", "Leave filter", show=False)]
    DEFAULT_CSS = """
    EventLog #event-filter { height: 1; margin-bottom: 1; }
    EventLog #event-table { height: 1fr; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[EventInfo] = []

    def compose(self) -> ComposeResult:
        yield Input(
            placeholder="/ filter: words in kind, actor or text (esc: back to the list)",
            id="event-filter",
            compact=True,
        )
        table = DataTable(id="event-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("rev", "what", "kind", "actor", "applied", "time (UTC)")
        yield table

    def show(self, state: ServerState) -> None:
        self.events = state.events
        self._fill_rows()

    def on_input_changed(self, event: Input.Changed) -> None:
        self._fill_rows()

    def _fill_rows(self) -> None:
        needle = self.query_one("#event-filter", Input).value
        shown = [e for e in reversed(self.events) if matches(e, needle)]  # newest first
        rows = [(str(e.revision), [str(e.revision), e.summary, e.kind, e.actor, receipt(e), when(e.at)]) for e in shown]
        fill(self.query_one("#event-table", DataTable), rows)

    def action_leave_filter(self) -> None:
        self.query_one("#event-table", DataTable).focus()
