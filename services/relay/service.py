"""The relay service: a TLS listener (port 443 by default) that forwards sealed ESP between peer nodes.

Two threads: the worker's (the bus: ping, health; every RELOAD_INTERVAL a
look at the datastore's head revision, and a new Trust snapshot when it
moved) and the relay loop's (every node stream, relay.py). They share only
``RelayServer.trust``, replaced whole. A port that cannot be bound (443 needs
root or CAP_NET_BIND_SERVICE; another server may hold it) is logged and
retried, so the rest of the server runs meanwhile and health shows it.
The TLS certificate is self-signed and made at first start if absent: nodes
do not need to verify it, since ESP authenticates end to end and the relay
authenticates nodes by their identity keys.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from pathlib import Path

from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.messages.common import Health, HealthRequest
from bus.worker import Worker
from nodeagent.tlsstream import Loop, ensure_certificate, server_context
from services.datastore.db import make_engine, migrate
from services.relay.relay import RelayServer
from services.relay.trust import load_trust

log = logging.getLogger(__name__)

RELOAD_INTERVAL = 0.5  # seconds between looks at the head revision
BIND_RETRY = 5.0


class RelayService(Worker):
    service = "relay"
    allow = (Role.OPERATOR, Role.SERVICE)

    def __init__(
        self,
        endpoint: str,
        keypair: KeyPair,
        server_key: bytes,
        *,
        database_url: str,
        host: str,
        port: int,
        cert: Path,
        key: Path,
    ) -> None:
        super().__init__(endpoint, keypair, server_key)
        self.engine = make_engine(database_url)
        migrate(self.engine)
        ensure_certificate(cert, key, common_name="coterie-relay")
        self.tls = server_context(cert, key)  # not self.context: that is the worker's ZeroMQ context
        self.host, self.port = host, port
        self.loop = Loop("relay")
        self.relay = RelayServer(self.loop)
        self.listening: int | None = None
        self._next_reload = 0.0
        self._next_bind = 0.0

    def run(self) -> None:
        self.loop.start()
        try:
            super().run()
        finally:
            self.loop.stop()

    def tick(self, now: float) -> None:
        if self.listening is None and now >= self._next_bind:
            self._next_bind = now + BIND_RETRY
            self._listen()
        if now >= self._next_reload:
            self._next_reload = now + RELOAD_INTERVAL
            self.relay.trust = load_trust(self.engine, self.relay.trust)

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(512)
        except OSError as exc:
            sock.close()
            self.counters["listen_failed"] += 1
            log.error("relay cannot listen on %s:%d: %s; retrying in %.0fs", self.host, self.port, exc, BIND_RETRY)
            return
        self.listening = self.port
        self.loop.call_soon(lambda: self.loop.listen(sock, self.tls, lambda: self.relay))
        log.info("relay listening on %s:%d (TLS)", self.host, self.port)

    def on_health(self, request: HealthRequest, caller: Identity) -> Health:
        health = super().on_health(request, caller)
        counters = dict(health.counters)
        counters.update(_snapshot(self.relay.counters))
        counters.update({f"loop_{k}": v for k, v in _snapshot(self.loop.counters).items()})
        counters["nodes_connected"] = len(self.relay.by_name)
        counters["listening"] = int(self.listening is not None)
        return health.model_copy(update={"counters": counters})


def _snapshot(counter: Counter[str]) -> dict[str, int]:
    """A copy of a counter another thread is updating (a resize mid-copy is retried)."""
    for _ in range(5):
        try:
            return dict(counter)
        except RuntimeError:
            continue
    return {}
