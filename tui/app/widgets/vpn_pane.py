"""VPNs (with member and online counts) above the members of the selected VPN."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable

from tui.app.state import ServerState
from tui.app.widgets.cells import fill, selected_key, state, text


class VpnPane(Vertical):
    DEFAULT_CSS = """
    VpnPane #vpn-table { height: 1fr; }
    VpnPane #member-table { height: 1fr; border-top: solid $primary-muted; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.state = ServerState()

    def compose(self) -> ComposeResult:
        vpns = DataTable(id="vpn-table", cursor_type="row", zebra_stripes=True)
        vpns.add_columns("VPN", "subnet", "addressing", "topology", "members", "online")
        members = DataTable(id="member-table", cursor_type="row", zebra_stripes=True)
        members.add_columns("node", "address", "role", "state", "routes")
        yield vpns
        yield members

    def show(self, state: ServerState) -> None:
        self.state = state
        rows = [
            (v.name, [v.name, v.subnet, v.addressing, v.topology, str(v.members), str(v.online)]) for v in state.vpns
        ]
        fill(self.query_one("#vpn-table", DataTable), rows)
        self._show_members()

    def _show_members(self) -> None:
        members = self.state.members.get(self.selected_vpn() or "", [])
        rows = [(m.node, [m.node, m.vip, m.role, state(m.online), text(", ".join(m.routes))]) for m in members]
        fill(self.query_one("#member-table", DataTable), rows)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "vpn-table":
            self._show_members()

    def selected_vpn(self) -> str | None:
        return selected_key(self.query_one("#vpn-table", DataTable))

    def selected_member(self) -> str | None:
        return selected_key(self.query_one("#member-table", DataTable))
