"""The fanout's second connection: heartbeats and receipts, answered beside the snapshots and batches.

Ten thousand agents heartbeating every 2 s are 5,000 requests a second, and a
change to all brings 10,000 Applied receipts. In the fanout's one worker
they queued behind snapshots and batches (which take seconds at that scale)
and expired in the broker as `service_unavailable`; agents then took the
server for lost and reconnected in storms. This worker registers for those
two kinds only (its own lane in the broker, bus.broker), takes many at once
(capacity) and runs in a thread of the fanout process, so its answers come
from the same streams. The handlers stay the fanout's (they take its lock);
while this worker is away the broker sends the same kinds to the fanout's
main worker, which serves them too.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from bus.identity import Role
from bus.keys import KeyPair
from bus.messages.sync import Applied, SyncHeartbeat
from bus.worker import Handler, Worker

if TYPE_CHECKING:
    from services.fanout.service import FanoutService


class BeatWorker(Worker):
    service = "fanout"
    allow = (Role.NODE, Role.OPERATOR, Role.SERVICE)
    kinds = (SyncHeartbeat.KIND, Applied.KIND)
    capacity = 128  # pipelined: a heartbeat costs tens of microseconds here, a broker round trip more
    drain = 256

    def __init__(self, fanout: FanoutService, endpoint: str, keypair: KeyPair, server_key: bytes) -> None:
        self.fanout = fanout
        super().__init__(endpoint, keypair, server_key)
        self.thread: threading.Thread | None = None

    def handlers(self) -> dict[type, Handler]:
        return {SyncHeartbeat: self.fanout.on_heartbeat, Applied: self.fanout.on_applied}

    def start(self) -> BeatWorker:
        self.thread = threading.Thread(target=self.run, name="fanout-beats", daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)
