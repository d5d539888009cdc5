"""Every node: name, VPNs and virtual IPs, NAT class, online state, agent version, last seen."""

from __future__ import annotations

from textual.widgets import DataTable

from tui.app.state import ServerState
from tui.app.widgets.cells import fill, selected_key, state, text, when


class NodeTable(DataTable):
    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        self.add_columns("node", "VPNs", "virtual IPs", "NAT", "state", "agent", "last seen")

    def show(self, server: ServerState) -> None:
        rows = [
            (
                n.name,
                [
                    n.name,
                    text(", ".join(n.vips)),
                    text(", ".join(n.vips.values())),
                    n.nat_class,
                    state(n.online, n.enrolled),
                    text(n.agent_version),
                    when(n.last_seen),
                ],
            )
            for n in server.nodes
        ]
        fill(self, rows)

    def selected(self) -> str | None:
        return selected_key(self)
