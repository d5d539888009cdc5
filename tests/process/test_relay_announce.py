"""The server announces its relay in every heartbeat answer, and a node can use what it was told (issue 6).

Real server processes on loopback (the relay on a free port, never 443), a
real enrolled node: its heartbeat's SyncStatus names the relay as
"host:port" (the join host and `[relay] port`), and a RelayClient built from
that announcement and the node's identity key is authenticated by the relay.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bus.client import Client
from bus.messages.datastore import VpnCreate
from bus.messages.sync import SyncHeartbeat, SyncStatus
from bus.signing import load_signing_key
from nodeagent.tcp443 import RelayClient, RelaySettings
from nodeagent.tunnels import Tunnels
from tests.conftest import wait_until
from tests.helpers.server import AgentThread, CoterieServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoterieServer]:
    srv = CoterieServer(tmp_path).start(timeout=120)  # a shared, busy machine
    yield srv
    srv.stop()


def test_heartbeat_answer_names_the_relay_and_the_node_can_use_it(server: CoterieServer, tmp_path: Path) -> None:
    server.mutate(VpnCreate, name="a", subnet="10.1.0.0/24")
    node = AgentThread(tmp_path / "n1", server.add_node("n1", ["a"]))  # enrolled, not started
    info = node.state.server()
    with Client(info.endpoints[0], node.state.keypair(), info.server_key.encode(), timeout=5.0) as client:
        status = client.request("fanout", SyncHeartbeat(revision=0, digest=""), expect=SyncStatus)
    assert isinstance(status, SyncStatus)
    host = urlsplit(info.endpoints[0]).hostname
    assert status.relay == f"{host}:{server.relay_port}", status

    relay_host, _, port = status.relay.rpartition(":")
    identity = load_signing_key(node.state.path / "identity.key")
    client = RelayClient(RelaySettings(relay_host, int(port), "n1", identity))
    try:
        assert wait_until(lambda: client.authenticated, 15), (client.refused, dict(client.counters))
    finally:
        client.close()


def test_tunnels_parse_the_announcement() -> None:
    """What Tunnels.set_relay keeps of an announcement: (host, port), or None for "" and junk."""
    tunnels = Tunnels.__new__(Tunnels)  # only the parsing: no data plane, no key ring
    tunnels.relay, tunnels.paths, tunnels._view = None, None, None
    for text, expected in (
        ("203.0.113.1:443", ("203.0.113.1", 443)),
        ("[2001:db8::1]:8443", ("2001:db8::1", 8443)),
        ("", None),
        ("no-port", None),
        ("host:http", None),
    ):
        tunnels.set_relay(text)
        assert tunnels.relay == expected, text
