"""The operator's event stream: a leased watch on the fanout, answered by pushed ChangeNotices.

Why: the TUI follows the server live without polling it; the server must push
every committed change to a watching operator, stop when the lease lapses or
is ended (a vanished TUI costs nothing), and refuse nodes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.client import Client
from bus.errors import RemoteError
from bus.messages.datastore import VpnCreate
from bus.messages.events import ChangeNotice, WatchLease, WatchRequest
from tests.helpers.server import AgentThread, CoterieServer
from tui.client import connect, resolve_address


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoterieServer]:
    srv = CoterieServer(tmp_path, presence_timeout=3.0).start()
    yield srv
    srv.stop()


def notices(client: Client, within: float) -> list[ChangeNotice]:
    """Every ChangeNotice pushed to *client* within *within* seconds."""
    found, deadline = [], time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        push = client.next_push(left)
        if push is not None and isinstance(push[1], ChangeNotice):
            found.append(push[1])
    return found


def test_watcher_gets_each_change_until_its_lease_lapses(server: CoterieServer) -> None:
    with connect(resolve_address(server.home), timeout=5.0, retries=2) as client:
        lease = client.request("fanout", WatchRequest(lease=2.0), expect=WatchLease)
        assert isinstance(lease, WatchLease) and lease.lease == 2.0
        client.request("datastore", VpnCreate(name="office", subnet="10.10.0.0/24"))
        got = notices(client, 3.0)
        changes = [c for n in got for c in n.changes]
        assert [c.kind for c in changes] == ["vpn.create"]
        assert "office" in changes[0].summary and changes[0].actor.startswith("operator:")
        assert got[0].revision == changes[0].revision > got[0].prev_revision
        time.sleep(0.5)  # the lease (2 s) has lapsed: 3 s of waiting above, plus this
        client.request("datastore", VpnCreate(name="lab", subnet="10.20.0.0/24"))
        assert notices(client, 2.0) == []


def test_stopped_watch_gets_nothing_and_renewal_reports_the_head(server: CoterieServer) -> None:
    with connect(resolve_address(server.home), timeout=5.0, retries=2) as client:
        client.request("fanout", WatchRequest())
        client.request("datastore", VpnCreate(name="office", subnet="10.10.0.0/24"))
        assert notices(client, 2.0)
        stopped = client.request("fanout", WatchRequest(stop=True), expect=WatchLease)
        assert isinstance(stopped, WatchLease) and stopped.lease == 0
        client.request("datastore", VpnCreate(name="lab", subnet="10.20.0.0/24"))
        assert notices(client, 1.5) == []
        renewed = client.request("fanout", WatchRequest(), expect=WatchLease)
        assert isinstance(renewed, WatchLease) and renewed.head >= 2  # the client can see what it missed


def test_nodes_may_not_watch(server: CoterieServer, tmp_path: Path) -> None:
    server.mutate(VpnCreate, name="office", subnet="10.10.0.0/24")
    agent = AgentThread(tmp_path / "alpha", server.add_node("alpha", ["office"]))
    address = resolve_address(server.home)
    keypair = agent.state.keypair()
    with Client(address.endpoint, keypair, address.server_key, timeout=3.0, retries=1) as client, pytest.raises(
        RemoteError
    ) as caught:
        client.request("fanout", WatchRequest())
    assert caught.value.code == "forbidden"
