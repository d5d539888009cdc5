"""A worker for tests, runnable in a thread or as its own process.

As a process: ``python -m tests.helpers.workers SERVICE ENDPOINT SERVER_KEY KEYFILE [ANON]``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from bus.identity import Identity, Role
from bus.keys import load_keypair
from bus.worker import Handler, Worker
from services.logsetup import setup_logging
from tests.helpers.messages import Ack, Note, PushTo, Sleep, Slept


class TestWorker(Worker):
    service = "echo"
    handled: int = 0

    def handlers(self) -> dict[type, Handler]:
        return {**super().handlers(), Sleep: self.on_sleep, PushTo: self.on_push_to}

    def on_sleep(self, request: Sleep, caller: Identity) -> Slept:
        if request.marker:
            Path(request.marker).write_text(str(os.getpid()))
        time.sleep(request.seconds)
        return Slept(pid=os.getpid())

    def on_push_to(self, request: PushTo, caller: Identity) -> Ack:
        self.push(request.key, Note(text=request.text))
        return Ack()


def worker_class(service: str, anonymous: bool = False) -> type[TestWorker]:
    allow = (Role.OPERATOR, Role.SERVICE, Role.NODE) + ((Role.ANONYMOUS,) if anonymous else ())
    return type(f"TestWorker_{service}", (TestWorker,), {"service": service, "allow": allow})


def main() -> None:
    service, endpoint, server_key, key_file = sys.argv[1:5]
    anonymous = len(sys.argv) > 5 and sys.argv[5] == "anon"
    setup_logging(f"test-{service}")
    worker = worker_class(service, anonymous)(endpoint, load_keypair(Path(key_file)), server_key.encode())
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    worker.run()


if __name__ == "__main__":
    main()
