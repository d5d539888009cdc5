"""A ZAP handler (RFC 27) that admits only CURVE clients the key registry knows.

It runs inside its owner's poll loop (the broker's), not on a thread of its
own: a set lookup per handshake costs ~0.05 ms there, where pyzmq's threaded
authenticator costs several times that in GIL-holding Python
(../shared/PERFORMANCE.md). The User-Id it returns is the client's public key
in Z85, so that the broker can look the key up again on every message.

Unknown keys are refused (status 400) unless the server admits anonymous
callers for its login and enrollment services; then they are admitted with
no role beyond ``anonymous``, and the broker decides per service.
"""

from __future__ import annotations

import logging
from collections import Counter

import zmq
from zmq.utils import z85

from bus.constants import ZAP_DOMAIN, ZAP_ENDPOINT, ZAP_VERSION
from bus.frames import NOBLOCK, recv_frames, send_frames
from bus.registry import KeyRegistry

log = logging.getLogger(__name__)


class ZapHandler:
    """Answers libzmq's ZAP requests for every CURVE server socket of one context."""

    def __init__(self, context: zmq.Context, registry: KeyRegistry, *, allow_anonymous: bool) -> None:
        self.context = context
        self.registry = registry
        self.allow_anonymous = allow_anonymous
        self.counters: Counter[str] = Counter()
        self.socket = context.socket(zmq.ROUTER)
        self.socket.linger = 0
        # Binding fails if another handler already serves this context: exactly one may.
        self.socket.bind(ZAP_ENDPOINT)

    def close(self) -> None:
        self.socket.close(linger=0)

    def handle_pending(self) -> None:
        """Answer the ZAP requests waiting on the socket, without blocking; at most 500 per call, so that
        under a storm of 10,000 handshakes the owner's loop still serves messages and heartbeats between."""
        for _ in range(500):
            try:
                frames = recv_frames(self.socket, NOBLOCK)
            except zmq.Again:
                return
            self._answer(frames)

    def _answer(self, frames: list[bytes]) -> None:
        # ROUTER envelope: [peer, b"", version, request_id, domain, address,
        #                   identity, mechanism, *credentials]
        if len(frames) < 8 or frames[1] != b"":
            log.error("zap: malformed request of %d frames dropped", len(frames))
            return
        envelope, version, request_id = frames[0], frames[2], frames[3]
        domain, address, mechanism = frames[4], frames[5].decode(errors="replace"), frames[7]
        status, user_id, text = self._decide(version, domain, mechanism, frames[8:], address)
        reply = [envelope, b"", ZAP_VERSION, request_id, status, text.encode(), user_id, b""]
        send_frames(self.socket, reply)

    def _decide(
        self, version: bytes, domain: bytes, mechanism: bytes, credentials: list[bytes], address: str
    ) -> tuple[bytes, bytes, str]:
        if version != ZAP_VERSION:
            return self._refuse(b"500", "unsupported ZAP version", address)
        if domain != ZAP_DOMAIN:
            return self._refuse(b"400", f"unknown ZAP domain {domain!r}", address)
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return self._refuse(b"400", f"mechanism {mechanism!r} is not allowed", address)
        key = z85.encode(credentials[0])
        identity = self.registry.lookup(key.decode("ascii"))
        if identity is not None:
            self.counters["admitted"] += 1
            return b"200", key, "OK"
        if self.allow_anonymous:
            self.counters["admitted_anonymous"] += 1
            return b"200", key, "OK (anonymous)"
        return self._refuse(b"400", f"unknown client key {key.decode()}", address)

    def _refuse(self, status: bytes, reason: str, address: str) -> tuple[bytes, bytes, str]:
        self.counters["refused"] += 1
        log.warning("zap: refused connection from %s: %s", address or "?", reason)
        return status, b"", reason
