"""The UDP reflector: tells a node the address and port its data-plane socket is seen from.

It runs beside the fanout (a thread of that process: it keeps no state and
needs no bus) and answers every probe twice, from its port and from the next
one; nodeagent/natprobe.py explains what the node learns from the two
answers. It never answers anything but a well-formed probe, and answers are
no larger than probes' owners could send themselves, so it cannot be used to
amplify traffic toward a third party.
"""

from __future__ import annotations

import logging
import select
import socket
import threading

from nodeagent.natprobe import answer, parse_probe

log = logging.getLogger(__name__)

DEFAULT_REFLECTOR_PORT = 7872


class Reflector:
    def __init__(self, host: str, port: int = DEFAULT_REFLECTOR_PORT) -> None:
        self.main = self._bind(host, port)
        self.port = self.main.getsockname()[1]
        self.other = self._bind(host, self.port + 1)  # answers from here test filtering: never probed
        self.mapping = self._bind(host, self.port + 2)  # probed too: the mapping it sees tests the NAT's mapping
        self.answered = 0
        self.ignored = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reflector", daemon=True)

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, port))
        return sock

    def start(self) -> Reflector:
        self._thread.start()
        log.info(
            "UDP reflector on %s (answers also from port %d; mapping probes on %d)",
            self.main.getsockname(),
            self.port + 1,
            self.port + 2,
        )
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for sock in (self.main, self.other, self.mapping):
            sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.main, self.mapping], [], [], 0.5)
            for sock in ready:
                try:
                    datagram, source = sock.recvfrom(64)
                except OSError:
                    continue
                nonce = parse_probe(datagram)
                if nonce is None:
                    self.ignored += 1
                    continue
                # A probe at the main port: answered from it and from the other one (filtering: the node
                # never sends to the other port, so only a NAT that lets anyone in passes that answer).
                # A probe at the mapping port: answered from there only, with the mapping it saw.
                replies = ((0, self.main), (1, self.other)) if sock is self.main else ((2, self.mapping),)
                for kind, via in replies:
                    try:
                        via.sendto(answer(nonce, kind, source), source)
                    except OSError as exc:
                        log.debug("reflector answer to %s: %s", source, exc)
                self.answered += 1
