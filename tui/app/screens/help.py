"""`?`: every key and what it does, from the one action table."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable

from tui.app.actions import ACTIONS, key_label


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "close", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical {
        width: 90; max-width: 100%; height: auto; max-height: 100%; border: thick $primary; background: $surface;
    }
    HelpScreen DataTable { height: auto; max-height: 100%; }
    """

    def compose(self) -> ComposeResult:
        with Vertical() as frame:
            frame.border_title = "Keys"
            frame.border_subtitle = "ctrl+p: command palette · enter on a node: detail · esc: close"
            table: DataTable = DataTable(cursor_type="none", show_cursor=False)
            table.add_columns("key", "action", "what it does")
            for action in ACTIONS:
                table.add_row(key_label(action.key), action.title, action.help)
            yield table

    def action_close(self) -> None:
        self.dismiss(None)
