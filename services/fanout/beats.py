"""The fanout's second and third connections: heartbeats, and Applied receipts, beside the batches.

Ten thousand agents heartbeating every 2 s are 5,000 requests a second, and a
change to all brings 10,000 Applied receipts. In the fanout's one worker
they queued behind snapshots and batches (which take seconds at that scale)
and expired in the broker as `service_unavailable`; agents then took the
server for lost and reconnected in storms. Each worker here registers for
one kind only (its own lane in the broker, bus.broker), takes many at once
(capacity) and runs in a thread of the fanout process, so its answers come
from the same streams. The handlers stay the fanout's (they take its lock);
while one is away the broker sends its kind to the fanout's main worker,
which serves it too.

Receipts have a lane of their own so that they can wait: while the main
thread sends a batch, AppliedWorker holds back (for at most BATCH_HOLD at a
time). The receipts of the nodes served first arrive while the rest are
still being sent, and answering them there took the GIL from the batch (a
third of its time at 1,000 nodes). They wait in the broker meanwhile, and
nobody waits for their answers (Client.notify; the next heartbeat repeats
an acknowledgement). Heartbeats are never held: in one lane with the
receipts they waited behind 10,000 of them at 10,000 nodes, expired, and
agents reconnected.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, ClassVar

from bus.identity import Role
from bus.keys import KeyPair
from bus.messages.sync import Applied, SyncHeartbeat
from bus.worker import Handler, Worker

if TYPE_CHECKING:
    from services.fanout.service import FanoutService

BATCH_HOLD = 0.25  # seconds AppliedWorker waits at most for a batch to end before it reads again


class BeatWorker(Worker):
    """Heartbeats, answered at once whatever the main thread is doing."""

    service = "fanout"
    allow = (Role.NODE, Role.OPERATOR, Role.SERVICE)
    kinds: ClassVar[tuple[str, ...]] = (SyncHeartbeat.KIND,)
    capacity = 128  # pipelined: a heartbeat costs tens of microseconds here, a broker round trip more
    drain = 256
    thread_name: ClassVar[str] = "fanout-beats"

    def __init__(self, fanout: FanoutService, endpoint: str, keypair: KeyPair, server_key: bytes) -> None:
        self.fanout = fanout
        super().__init__(endpoint, keypair, server_key)
        self.thread: threading.Thread | None = None

    def handlers(self) -> dict[type, Handler]:
        return {SyncHeartbeat: self.fanout.on_heartbeat, Applied: self.fanout.on_applied}

    def start(self) -> BeatWorker:
        self.thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


class AppliedWorker(BeatWorker):
    """Applied receipts, held back while a batch is being sent."""

    kinds: ClassVar[tuple[str, ...]] = (Applied.KIND,)
    thread_name: ClassVar[str] = "fanout-applied"

    def before_read(self) -> None:
        if not self.fanout.quiet.wait(BATCH_HOLD):
            self.counters["held_for_batch"] += 1
