"""The App's management actions: each opens a form or a confirmation and sends one operator request.

Every change goes through the same datastore requests as the CLI
(bus/messages/datastore.py); the TUI has no other path to the truth. The
dashboard is not updated here: the change comes back as a pushed notice and
a re-read, like every other operator's changes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from bus.messages import Message
from bus.messages.datastore import AclRemove, Mutated, NodeAdd, NodeRemove, VpnDelete
from tui.app import forms
from tui.app.forms import FormSpec
from tui.app.screens.confirm import ConfirmScreen
from tui.app.screens.form import FormScreen
from tui.app.screens.join import JoinScreen
from tui.app.screens.node_detail import NodeDetailScreen

NO_ROTATION = "key rotation: the server has no request for it yet, so nothing was changed"


class ManagementActions:
    """Mixed into CoterieApp; relies on its send(), notify(), push_screen() and selection helpers."""

    # provided by CoterieApp
    send: Callable[[Message, Callable[[Any], None]], None]
    notify: Callable[..., None]
    push_screen: Callable[..., Any]
    selected_vpn: Callable[[], str | None]
    selected_node: Callable[[], str | None]
    selected_rule: Callable[[], int | None]
    report: Callable[[object], bool]
    state: Any

    def _form(self, spec: FormSpec, initial: dict[str, str], done: Callable[[Any, Any], None] | None = None) -> None:
        def closed(answer: tuple[Message, object] | None) -> None:
            if answer is not None and self.report(answer[1]) and done is not None:
                done(*answer)

        self.push_screen(FormScreen(spec, initial), closed)

    def _confirm(self, question: str, message: Message) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.send(message, self.report)

        self.push_screen(ConfirmScreen(question), answered)

    def _here(self) -> dict[str, str]:
        return {"node": self.selected_node() or "", "vpn": self.selected_vpn() or ""}

    def action_create_vpn(self) -> None:
        self._form(forms.VPN_CREATE, {})

    def action_delete_vpn(self) -> None:
        vpn = self.selected_vpn()
        if vpn is None:
            self.notify("select a VPN first (tab 1)", severity="warning")
            return
        question = f"Delete VPN {vpn} with its memberships, routes and rules?"
        self._confirm(question, VpnDelete(name=vpn, idempotency_key=uuid.uuid4().hex))

    def action_add_node(self) -> None:
        def show_join(request: NodeAdd, result: Mutated) -> None:
            if result.join:
                self.push_screen(JoinScreen(request.name, result.join))

        vpn = self.selected_vpn() or ""
        self._form(forms.NODE_ADD, {"vpns": vpn}, show_join)

    def action_remove_node(self) -> None:
        node = self.selected_node()
        if node is None:
            self.notify("select a node first (tab 2, or a member in tab 1)", severity="warning")
            return
        question = f"Remove node {node}? Its key is revoked at once and its peers forget it."
        self._confirm(question, NodeRemove(name=node, idempotency_key=uuid.uuid4().hex))

    def action_add_member(self) -> None:
        self._form(forms.MEMBER_ADD, self._here())

    def action_remove_member(self) -> None:
        self._form(forms.MEMBER_REMOVE, self._here())

    def action_add_route(self) -> None:
        self._form(forms.ROUTE_ADD, self._here())

    def action_remove_route(self) -> None:
        self._form(forms.ROUTE_REMOVE, self._here())

    def action_add_rule(self) -> None:
        self._form(forms.RULE_ADD, {"vpn": self.selected_vpn() or ""})

    def action_remove_rule(self) -> None:
        rule = self.selected_rule()
        if rule is None:
            self.notify("select a rule first (tab 3)", severity="warning")
            return
        self._confirm(f"Remove ACL rule #{rule}?", AclRemove(id=rule, idempotency_key=uuid.uuid4().hex))

    def action_node_detail(self) -> None:
        node = self.selected_node()
        if node is None:
            self.notify("select a node first (tab 2, or a member in tab 1)", severity="warning")
            return
        self.push_screen(NodeDetailScreen(node, self.state))

    def action_rotate_keys(self) -> None:
        self.notify(NO_ROTATION, severity="warning")
