"""The operator TUI (Textual): a live dashboard of VPNs, nodes, ACLs and events, and the actions that change them.

Layout: link.py is the only module that holds a bus connection (through
tui/client.py); it runs in its own thread and posts Textual messages
(messages.py) to the App. state.py is the dashboard's data; widgets/ render
it, screens/ hold the modal forms, the node detail and the help; app.py
wires them together and maps keys to actions (actions.py).
"""
