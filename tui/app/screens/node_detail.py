"""One node: its state, endpoints and NAT class, its peers, and the change-log rows about it.

Per-peer path, key epoch and traffic counters are data-plane state that no
agent reports yet and the server does not hold, so this screen says so
instead of showing empty columns.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Static

from tui.app.state import ServerState
from tui.app.widgets.cells import fill, state, text, when
from tui.app.widgets.event_log import receipt

NO_DATA_PLANE = "per-peer path, key epoch, traffic: not reported by agents yet (no data-plane state on the server)"


class NodeDetailScreen(Screen[None]):
    BINDINGS = [Binding("escape,q", "close", "Back")]
    DEFAULT_CSS = """
    NodeDetailScreen #facts { height: auto; padding: 0 1; }
    NodeDetailScreen .heading { text-style: bold; padding: 0 1; margin-top: 1; }
    NodeDetailScreen #note { color: $text-muted; padding: 0 1; }
    NodeDetailScreen DataTable { height: 1fr; }
    """

    def __init__(self, name: str, server: ServerState) -> None:
        super().__init__()
        self.node_name = name
        self.server = server

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(id="facts")
            yield Label("Peers", classes="heading")
            peers: DataTable = DataTable(id="peer-table", cursor_type="row", zebra_stripes=True)
            peers.add_columns("peer", "VPN", "address", "role", "state", "NAT", "endpoints")
            yield peers
            yield Label(NO_DATA_PLANE, id="note")
            yield Label("Events", classes="heading")
            events: DataTable = DataTable(id="node-events", cursor_type="row", zebra_stripes=True)
            events.add_columns("rev", "what", "kind", "applied", "time (UTC)")
            yield events
        yield Footer()

    def on_mount(self) -> None:
        self.show(self.server)

    def show(self, server: ServerState) -> None:
        self.server = server
        node = server.node(self.node_name)
        facts = self.query_one("#facts", Static)
        if node is None:
            facts.update(Text(f"node {self.node_name} no longer exists", style="bold red"))
            return
        addresses = ", ".join(f"{vpn} {ip} ({node.roles.get(vpn, '?')})" for vpn, ip in node.vips.items())
        lines = [
            ("node", Text(node.name, style="bold")),
            ("state", state(node.online, node.enrolled)),
            ("addresses", text(addresses)),
            ("tags", text(", ".join(node.tags))),
            ("NAT class", node.nat_class),
            ("endpoints", text(", ".join(node.endpoints))),
            ("public", text(node.public_endpoint)),
            ("agent", text(node.agent_version)),
            ("last seen", when(node.last_seen)),
        ]
        facts.update(Text("\n").join(Text.assemble((f"{k:>10}: ", "dim"), v) for k, v in lines))
        fill(self.query_one("#peer-table", DataTable), self._peer_rows(server))
        rows = [
            (str(e.revision), [str(e.revision), e.summary, e.kind, receipt(e), when(e.at)])
            for e in reversed(server.events_about(self.node_name))
        ]
        fill(self.query_one("#node-events", DataTable), rows)

    def _peer_rows(self, server: ServerState) -> list[tuple[str, list[str | Text]]]:
        rows: list[tuple[str, list[str | Text]]] = []
        for vpn, member in server.peers_of(self.node_name):
            peer = server.node(member.node)
            nat = peer.nat_class if peer else "-"
            endpoints = text(", ".join(peer.endpoints)) if peer else "-"
            cells: list[str | Text] = [member.node, vpn, member.vip, member.role, state(member.online), nat, endpoints]
            rows.append((f"{vpn}/{member.node}", cells))
        return rows

    def action_close(self) -> None:
        self.dismiss(None)
