"""CoterieApp: the dashboard's frame. Keys come from actions.py, management from management.py.

The App owns the current ServerState and hands it down to the widgets;
the server link (link.py) posts LinkUp/LinkDown/StateLoaded/Reply up to it.
Without an address the App shows fixed data and sends nothing (snapshot
tests, demos).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, TabbedContent, TabPane

from bus import errors
from bus.errors import BusError, RemoteError
from bus.messages import Message
from bus.messages.datastore import Mutated
from tui.app.actions import ACTIONS
from tui.app.link import ServerLink
from tui.app.management import ManagementActions
from tui.app.messages import LinkDown, LinkUp, Reply, StateLoaded
from tui.app.screens.help import HelpScreen
from tui.app.screens.node_detail import NodeDetailScreen
from tui.app.state import ServerState
from tui.app.widgets.acl_table import AclTable
from tui.app.widgets.event_log import EventLog
from tui.app.widgets.node_table import NodeTable
from tui.app.widgets.status_bar import StatusBar
from tui.app.widgets.vpn_pane import VpnPane
from tui.client import ServerAddress


class CoterieApp(ManagementActions, App[None]):
    TITLE = "Coterie"
    BINDINGS = [Binding(a.key, a.action, a.title, show=a.footer) for a in ACTIONS]
    CSS = "TabbedContent { height: 1fr; } TabPane { padding: 0; }"

    def __init__(self, address: ServerAddress | None = None, state: ServerState | None = None, label: str = "") -> None:
        super().__init__()
        self.state = state or ServerState()
        self.endpoint = address.endpoint if address else label or "fixed data"
        self.link = ServerLink(address, self.post_message) if address else None
        self.connected = self.link is None

    def compose(self) -> ComposeResult:
        yield StatusBar()
        with TabbedContent(initial="vpns"):
            with TabPane("VPNs [1]", id="vpns"):
                yield VpnPane()
            with TabPane("Nodes [2]", id="nodes"):
                yield NodeTable(id="node-table")
            with TabPane("ACL [3]", id="acl"):
                yield AclTable(id="acl-table")
            with TabPane("Events [4]", id="events"):
                yield EventLog()
        yield Footer()

    def on_mount(self) -> None:
        self._show(self.state)
        if self.link is not None:
            self.query_one(StatusBar).connecting(self.endpoint)
            self.link.start()

    def on_unmount(self) -> None:
        if self.link is not None:
            self.link.stop()

    # ------------------------------------------------------------------ from the link
    def on_link_up(self, message: LinkUp) -> None:
        if not self.connected:
            self.notify(f"connected to {message.endpoint}")
        self.connected = True
        self._status()

    def on_link_down(self, message: LinkDown) -> None:
        if self.connected:
            self.notify(f"lost the server: {message.reason}", severity="error")
        self.connected = False
        self.query_one(StatusBar).down(message.reason, message.retry_in)

    def on_state_loaded(self, message: StateLoaded) -> None:
        self._show(message.state)

    def on_reply(self, message: Reply) -> None:
        try:
            message.callback(message.result)
        except Exception as exc:  # a bug in a callback must not end the session with a traceback
            self.log.error(f"reply callback failed: {exc!r}")
            self.notify(f"internal error: {exc}", severity="error")

    def _show(self, state: ServerState) -> None:
        self.state = state
        self.query_one(VpnPane).show(state)
        self.query_one(NodeTable).show(state)
        self.query_one(AclTable).show(state)
        self.query_one(EventLog).show(state)
        self._status()
        for screen in self.screen_stack:
            if isinstance(screen, NodeDetailScreen):
                screen.show(state)

    def _status(self) -> None:
        if self.connected:
            online = sum(1 for n in self.state.nodes if n.online)
            self.query_one(StatusBar).up(self.endpoint, self.state.head, len(self.state.nodes), online)

    # ------------------------------------------------------------------ requests
    def send(self, message: Message, callback: Callable[[Any], None]) -> None:
        """Send an operator request; *callback* gets the reply or the BusError (on this thread)."""
        if self.link is None:
            callback(BusError("not connected to a server (showing fixed data)"))
        elif not self.connected:
            callback(BusError("the server is not answering; nothing was sent (the status bar shows when it is back)"))
        else:
            self.link.submit(message, callback)

    def report(self, result: object) -> bool:
        """Notify the outcome of a request; True if it succeeded."""
        if isinstance(result, BusError):
            self.notify(self.describe_error(result), severity="error", timeout=8)
            return False
        if isinstance(result, Mutated):
            self.notify(f"r{result.revision}: {result.summary}")
            if self.link is not None:
                self.link.refresh()
        return True

    @staticmethod
    def describe_error(exc: BusError) -> str:
        if isinstance(exc, RemoteError):
            if exc.code in (errors.INVALID, errors.NOT_FOUND, errors.CONFLICT):
                return exc.message
            if exc.code == errors.FORBIDDEN:
                return f"permission denied: {exc.message}"
            return f"{exc.code}: {exc.message}"
        return f"server unreachable: {exc}"

    # ------------------------------------------------------------------ selection
    def _tab(self) -> str:
        return self.query_one(TabbedContent).active

    def selected_vpn(self) -> str | None:
        return self.query_one(VpnPane).selected_vpn()

    def selected_node(self) -> str | None:
        if self._tab() == "vpns":
            return self.query_one(VpnPane).selected_member()
        return self.query_one(NodeTable).selected()

    def selected_rule(self) -> int | None:
        return self.query_one(AclTable).selected()

    # ------------------------------------------------------------------ navigation
    def on_data_table_row_selected(self, event: Any) -> None:
        if event.data_table.id in ("node-table", "member-table") and self.screen is self.screen_stack[0]:
            self.action_node_detail()

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        focus = {"vpns": "#vpn-table", "nodes": "#node-table", "acl": "#acl-table", "events": "#event-table"}[tab]
        self.query_one(focus).focus()

    def action_filter_events(self) -> None:
        self.action_tab("events")
        self.query_one("#event-filter").focus()

    def action_reload(self) -> None:
        if self.link is not None:
            self.link.refresh()

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for action in ACTIONS:
            yield SystemCommand(action.title, action.help, lambda a=action.action: self.run_action(a))
