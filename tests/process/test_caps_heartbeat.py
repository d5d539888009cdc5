"""Data-plane capabilities from a heartbeat to the peers' views (issue 8).

Real server processes on loopback. Nodes n1 and n2 speak for themselves
over real CURVE connections: heartbeats saying they are public (the
reflector saw their local address) with the capabilities a data plane
reports. A third node runs the real agent (in a thread, without a data
plane) and receives the changes as pushed updates. Checked: the caps are
stored (node show) and appear in every peer's entry, two public nodes
that both report "gso" get path udp and raw esp once one of them stops
reporting it, and a heartbeat without caps (an older agent) is accepted
and counts as reporting none.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from bus.client import Client
from bus.messages.datastore import NodeDetail, NodeShowRequest, VpnCreate
from bus.messages.sync import CAP_CSUM, CAP_GSO, PeerView, Snapshot, SnapshotRequest, SyncHeartbeat, SyncStatus
from tests.conftest import wait_until
from tests.helpers.server import AgentThread, CoterieServer

BOTH = [CAP_CSUM, CAP_GSO]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoterieServer]:
    srv = CoterieServer(tmp_path).start(timeout=120)  # a shared, busy machine
    yield srv
    srv.stop()


class Speaker:
    """A node that sends its own heartbeats and reads its own snapshots."""

    def __init__(self, server: CoterieServer, tmp_path: Path, name: str, address: str) -> None:
        node = AgentThread(tmp_path / name, server.add_node(name, ["a"]))  # enrolled, not started
        info = node.state.server()
        self.client = Client(info.endpoints[0], node.state.keypair(), info.server_key.encode(), timeout=5.0)
        self.address = address

    def beat(self, caps: list[str] | None) -> None:
        fields = {"endpoints": [self.address], "mapped": self.address, "filtering": "open", "mapping": "independent"}
        beat = SyncHeartbeat(revision=0, digest="", **fields, **({} if caps is None else {"caps": caps}))
        assert isinstance(self.client.request("fanout", beat, expect=SyncStatus), SyncStatus)

    def peer(self, name: str) -> PeerView | None:
        snapshot = self.client.request("fanout", SnapshotRequest(), expect=Snapshot)
        assert isinstance(snapshot, Snapshot)
        return snapshot.view.peers.get(name)

    def close(self) -> None:
        self.client.close()


def test_caps_reach_the_peers_views_and_choose_the_path(server: CoterieServer, tmp_path: Path) -> None:
    server.mutate(VpnCreate, name="a", subnet="10.1.0.0/24")
    n1 = Speaker(server, tmp_path, "n1", "198.18.0.2:7871")
    n2 = Speaker(server, tmp_path, "n2", "198.18.0.3:7871")
    n3 = AgentThread(tmp_path / "n3", server.add_node("n3", ["a"])).start()
    try:

        def seen(viewer: Speaker, name: str, caps: list[str], path: str) -> bool:
            entry = viewer.peer(name)
            return entry is not None and entry.caps == caps and entry.path == path

        def pushed(caps: list[str]) -> bool:
            entry = n3.view.peers.get("n1") if n3.view is not None else None
            return entry is not None and entry.caps == caps

        n1.beat(BOTH)
        n2.beat(BOTH)
        assert wait_until(lambda: seen(n2, "n1", BOTH, "udp"), 20), n2.peer("n1")
        assert wait_until(lambda: seen(n1, "n2", BOTH, "udp"), 10), n1.peer("n2")
        assert wait_until(lambda: pushed(BOTH), 20), "n3's agent did not get n1's caps in an update"
        shown = server.request(NodeShowRequest(name="n1"))
        assert isinstance(shown, NodeDetail) and shown.node.caps == BOTH and shown.node.nat_class == "public"

        n1.beat([CAP_CSUM])  # e.g. the kernel refused a GSO send: the next heartbeat says so
        assert wait_until(lambda: seen(n2, "n1", [CAP_CSUM], "esp"), 20), n2.peer("n1")
        assert wait_until(lambda: seen(n1, "n2", BOTH, "esp"), 10), n1.peer("n2")
        assert wait_until(lambda: pushed([CAP_CSUM]), 20)

        n1.beat(None)  # an agent from before capabilities: its heartbeat has no such field
        assert wait_until(lambda: seen(n2, "n1", [], "esp"), 20), n2.peer("n1")
        assert wait_until(lambda: pushed([]), 20)
        assert wait_until(lambda: n3.digest == server.server_views()[n3.key], 10)  # the agent's view is the server's
    finally:
        n3.stop()
        n1.close()
        n2.close()


@pytest.mark.parametrize("caps", [["GSO"], ["gso csum"], [""], ["x" * 17], ["gso"] * 17])
def test_a_heartbeat_with_malformed_caps_is_refused(caps: list[str]) -> None:
    with pytest.raises(ValidationError):
        SyncHeartbeat(revision=0, digest="", caps=caps)
