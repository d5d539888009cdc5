"""When to probe the NAT again at once: a peer that carried data lately went quiet while we keep sending (D17)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nodeagent.dataplane import DataPlane
from nodeagent.transport import Wire
from nodeagent.tunnels import SILENCE, SILENCE_AFTER_DATA, Tunnels
from tests.helpers.netviews import peer, view, vpn
from tests.helpers.planes import outbound_sa

NOW = 1000.0


@pytest.fixture
def tunnels() -> Iterator[Tunnels]:
    plane = DataPlane(Wire(0, raw_esp=False))
    b = peer("b", {"corp": "10.1.0.2"}, endpoints=("1.2.3.4:7871",))
    plane.apply_view(view("a", [vpn("corp", "10.1.0.1")], [b]))
    plane.tunnels["b"].outbound = outbound_sa("a", "b")
    made = Tunnels.__new__(Tunnels)  # only the decision: no key ring, no server
    made.dataplane = plane
    try:
        yield made
    finally:
        plane.close()


def _set(tunnels: Tunnels, *, data: float, received: float, sent: float, path: str = "udp") -> None:
    tunnel = tunnels.dataplane.tunnels["b"]
    tunnel.path, tunnel.last_data, tunnel.last_received, tunnel.last_sent = path, data, received, sent


def test_a_busy_pair_gone_quiet_is_a_reason_to_probe(tunnels: Tunnels) -> None:
    quiet = NOW - SILENCE - 1
    _set(tunnels, data=quiet, received=quiet, sent=NOW - 0.1)
    assert tunnels._silent_peer(NOW) == "b"
    _set(tunnels, data=quiet, received=quiet, sent=NOW - 0.1, path="esp")
    assert tunnels._silent_peer(NOW) == "b"


@pytest.mark.parametrize(
    "data, received, sent, path",
    [
        (NOW - SILENCE_AFTER_DATA - 5, NOW - 20, NOW - 0.1, "udp"),  # an idle pair: only keepalives
        (NOW - 1, NOW - 1, NOW - 0.1, "udp"),  # the peer answers
        (NOW - SILENCE - 1, NOW - SILENCE - 1, NOW - 5, "udp"),  # we stopped sending too
        (NOW - SILENCE - 1, NOW - SILENCE - 1, NOW - 0.1, "tcp443"),  # not a UDP path
        (0.0, 0.0, NOW - 0.1, "udp"),  # never heard from: introduction, not silence
    ],
)
def test_no_reason_to_probe(tunnels: Tunnels, data: float, received: float, sent: float, path: str) -> None:
    _set(tunnels, data=data, received=received, sent=sent, path=path)
    assert tunnels._silent_peer(NOW) is None
