"""`coterie tui`: the operator's live dashboard (Textual), on this machine's server or a remote one."""

from __future__ import annotations

from tui.cli.options import DirOption, KeyOption, ServerKeyOption, ServerOption, resolve_dir
from tui.client import resolve_address


def tui(
    directory: DirOption = None,
    server: ServerOption = None,
    server_key: ServerKeyOption = None,
    key: KeyOption = None,
) -> None:
    """Open the live dashboard: VPNs, nodes, ACLs and events; every action has a key (? for help)."""
    address = resolve_address(resolve_dir(directory), server, server_key, key)  # bad keys fail here, in one line
    from tui.app.app import CoterieApp  # Textual loads only for this command

    CoterieApp(address).run()
