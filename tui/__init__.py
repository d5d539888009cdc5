"""The operator's terminal surfaces: the typer CLI (tui.cli) and, later, the Textual TUI.

Both talk to the server only through bus/, via tui.client.
"""
