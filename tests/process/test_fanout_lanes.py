"""The fanout's heartbeat and receipt lanes: receipts wait while a batch is sent, heartbeats never do.

Real broker, real CURVE sockets on loopback, the fanout's real BeatWorker and
AppliedWorker in threads. Their handlers belong to a stand-in for the fanout
that records what it was asked and lets the test say when a batch is being
sent (the fanout's ``quiet`` event). Nothing is timed: the test asserts
what was answered while what else was still held.
"""

from __future__ import annotations

import threading

import pytest

from bus.identity import Identity
from bus.messages.sync import Applied, SyncHeartbeat, SyncStatus
from services.fanout import beats
from services.fanout.beats import AppliedWorker, BeatWorker
from tests.conftest import BusHarness, wait_until


class FanoutStandIn:
    """What the two workers use of the fanout: its handlers and its ``quiet`` event."""

    def __init__(self) -> None:
        self.quiet = threading.Event()
        self.quiet.set()
        self.heartbeats: list[int] = []
        self.receipts: list[int] = []

    def on_heartbeat(self, request: SyncHeartbeat, caller: Identity) -> SyncStatus:
        self.heartbeats.append(request.revision)
        return SyncStatus(in_sync=True, revision=request.revision)

    def on_applied(self, request: Applied, caller: Identity) -> SyncStatus:
        self.receipts.append(request.revision)
        return SyncStatus(in_sync=True, revision=request.revision)


def test_receipts_wait_for_the_batch_while_heartbeats_are_answered(
    bus: BusHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(beats, "BATCH_HOLD", 5.0)  # longer than the test needs; the broker's liveness is 10 s
    fanout = FanoutStandIn()
    for cls in (BeatWorker, AppliedWorker):
        bus._spawn(cls(fanout, bus.endpoint, bus.service_key("fanout"), bus.server.public))  # type: ignore[arg-type]
    assert bus.wait_workers("fanout", 2)
    client = bus.client(timeout=10.0, retries=0)
    assert isinstance(client.request("fanout", Applied(revision=1, digest="d")), SyncStatus)
    assert fanout.receipts == [1], "no batch: a receipt is answered at once"

    fanout.quiet.clear()  # the fanout's main thread is sending a batch
    assert client.notify("fanout", Applied(revision=2, digest="d"))
    status = client.request("fanout", SyncHeartbeat(revision=2, digest="d"), expect=SyncStatus)
    assert isinstance(status, SyncStatus) and status.revision == 2
    assert fanout.heartbeats == [2], "the heartbeat was answered during the batch"
    assert fanout.receipts == [1], "the receipt waited for the batch to end"

    fanout.quiet.set()  # the batch is sent
    assert wait_until(lambda: fanout.receipts == [1, 2], 10), "the held receipt was never served"
