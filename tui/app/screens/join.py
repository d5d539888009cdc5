"""A new node's one-time join string, with a copy action (OSC 52: works over SSH too)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static


class JoinScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("c", "copy", "Copy join string"),
        Binding("escape,enter", "close", "Close"),
    ]
    DEFAULT_CSS = """
    JoinScreen { align: center middle; }
    JoinScreen > Vertical {
        width: 76; max-width: 100%; height: auto; border: thick $success; background: $surface; padding: 0 1;
    }
    JoinScreen #join { background: $boost; padding: 0 1; margin: 1 0; }
    """

    def __init__(self, node: str, join: str) -> None:
        super().__init__()
        self.node = node
        self.join = join

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(f"Node {self.node} created. Its join string (valid once):", style="bold"))
            yield Static(Text(self.join, overflow="fold"), id="join")
            yield Label("On the node: coterie agent up --join <string>\nc: copy   esc: close")

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.join)
        self.notify("join string copied to the clipboard")

    def action_close(self) -> None:
        self.dismiss(None)
