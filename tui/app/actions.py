"""Every action of the TUI with its key, written down once.

The App's key bindings, the command palette and the `?` help are all built
from this table, so that a key is never listed in one and missing in another.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    key: str
    action: str  # the App's action_<name>
    title: str
    help: str
    footer: bool = False  # shown in the footer (the rest: palette and help)


ACTIONS: tuple[Action, ...] = (
    Action("c", "create_vpn", "Create VPN", "Create a VPN (name, subnet, mode, topology).", True),
    Action("D", "delete_vpn", "Delete VPN", "Delete the selected VPN (asks first)."),
    Action("a", "add_node", "Add node", "Create a node; shows its one-time join string.", True),
    Action("x", "remove_node", "Remove node", "Remove the selected node (revokes its key)."),
    Action("m", "add_member", "Add membership", "Put a node in a VPN as member, gateway or hub.", True),
    Action("u", "remove_member", "Remove membership", "Take a node out of a VPN."),
    Action("g", "add_route", "Add gateway route", "Route a subnet in a VPN through a gateway node."),
    Action("G", "remove_route", "Remove gateway route", "Remove a gateway route."),
    Action("r", "add_rule", "Add ACL rule", "Allow traffic in a VPN from a node/tag to one.", True),
    Action("R", "remove_rule", "Remove ACL rule", "Remove the selected ACL rule (asks first)."),
    Action("i", "node_detail", "Node detail", "Endpoints, NAT, peers, events of a node."),
    Action("k", "rotate_keys", "Rotate keys", "Not offered by the server yet (says so)."),
    Action("1", "tab('vpns')", "VPNs tab", "VPNs, and the members of the selected one."),
    Action("2", "tab('nodes')", "Nodes tab", "Show every node with its state."),
    Action("3", "tab('acl')", "ACL tab", "Show the ACL rules of every VPN."),
    Action("4", "tab('events')", "Events tab", "Show the live change log."),
    Action("slash", "filter_events", "Filter events", "Filter the event log by kind, actor or text."),
    Action("f5", "reload", "Reload", "Re-read the whole state from the server."),
    Action("t", "toggle_theme", "Light/dark theme", "Switch between dark and light themes."),
    Action("question_mark", "help", "Help", "Show every key.", True),
    Action("q", "quit", "Quit", "Leave the TUI.", True),
)


def key_label(key: str) -> str:
    return {"slash": "/", "question_mark": "?", "f5": "F5"}.get(key, key)
