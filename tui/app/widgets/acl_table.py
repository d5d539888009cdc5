"""ACL rules of every VPN (no rule in a VPN: its members talk freely)."""

from __future__ import annotations

from textual.widgets import DataTable

from tui.app.state import ServerState
from tui.app.widgets.cells import fill, selected_key, text


class AclTable(DataTable):
    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        self.add_columns("id", "VPN", "from", "to", "proto", "ports")

    def show(self, server: ServerState) -> None:
        rows = [(str(r.id), [str(r.id), r.vpn, r.src, r.dst, r.proto, text(r.ports)]) for r in server.acl]
        fill(self, rows)

    def selected(self) -> int | None:
        key = selected_key(self)
        return int(key) if key is not None else None
