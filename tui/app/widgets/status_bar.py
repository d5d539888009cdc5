"""The top line: is the server there, and which revision is on screen."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: 1; padding: 0 1; background: $panel; }
    StatusBar.-down { background: $error; color: $text; }
    """

    def connecting(self, endpoint: str) -> None:
        self.remove_class("-down")
        self.update(Text.assemble(("◌ connecting", "bold"), f" to {endpoint} ..."))

    def up(self, endpoint: str, head: int, nodes: int, online: int) -> None:
        self.remove_class("-down")
        self.update(
            Text.assemble(("● connected", "bold green"), f"  {endpoint}  r{head}  {online}/{nodes} nodes online")
        )

    def down(self, reason: str, retry_in: float) -> None:
        self.add_class("-down")
        self.update(Text.assemble(("✖ server unreachable", "bold"), f"  retrying in {retry_in:g}s  ({reason})"))
