"""The relay's protocol, one handler for every node stream on the relay's selector thread.

A stream's life, in order:
  1. TLS handshake, then the node's RFC 9329 prefix (tlsstream.Framer).
  2. We send CHALLENGE (32 random bytes). The node answers AUTH: its name and
     an Ed25519 signature over AUTH_CONTEXT || challenge || name, checked
     against the node's identity key in the datastore (trust.py). Anything
     else first (ESP, RELAY) is refused: the relay is never anonymous.
     No AUTH within AUTH_TIMEOUT: closed.
  3. WELCOME; the node's stream replaces any older one of the same node.
  4. RELAY frames (destination name + sealed ESP) are forwarded as RELAY
     frames (source name + the same bytes) to the destination's stream, only
     while the two are peers in the datastore's newest snapshot. The relay
     has no keys and never looks inside the ESP packet. Every packet not
     forwarded is counted under its reason; a full destination buffer drops
     (a stalled receiver costs only its own packets).
A snapshot that no longer lists a node, or lists another identity key for
it, closes that node's stream.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from nodeagent.tlsstream import (
    AUTH,
    CHALLENGE,
    CHALLENGE_SIZE,
    HELLO,
    KEEPALIVE,
    REFUSED,
    RELAY,
    SIGNATURE_SIZE,
    WELCOME,
    FramingError,
    Loop,
    Stream,
    auth_payload,
    control,
    is_esp,
    pack_named,
    parse_control,
    unpack_named,
)
from services.relay.trust import Trust

log = logging.getLogger(__name__)

AUTH_TIMEOUT = 10.0  # seconds from TLS handshake to a valid AUTH
MAX_PENDING = 1024  # streams not yet authenticated; more are refused "busy" (a connection flood costs little)


@dataclass
class Session:
    challenge: bytes
    name: str | None = None  # set once authenticated
    sign_key: str = ""
    refused: bool = False
    counted: bool = False  # in RelayServer.pending


class RelayServer:
    """Authenticates node streams and forwards sealed ESP between peers."""

    def __init__(self, loop: Loop, *, auth_timeout: float = AUTH_TIMEOUT, max_pending: int = MAX_PENDING) -> None:
        self.loop = loop
        self.auth_timeout = auth_timeout
        self.max_pending = max_pending
        self.pending = 0  # open streams that have not authenticated
        self.trust = Trust.empty()  # replaced whole by the service thread
        self.counters: Counter[str] = Counter()
        self.by_name: dict[str, Stream] = {}
        self._checked: Trust | None = None
        loop.add_ticker(self.tick)

    # ------------------------------------------------------------------ stream handler
    def on_open(self, stream: Stream) -> None:
        session = Session(challenge=os.urandom(CHALLENGE_SIZE))
        stream.tag = session
        if self.pending >= self.max_pending:
            self.counters["refused_busy"] += 1
            self._refuse(stream, session, "busy")
            return
        self.pending += 1
        session.counted = True
        stream.enqueue(control(CHALLENGE, session.challenge))

    def on_close(self, stream: Stream, reason: str) -> None:
        session: Session | None = stream.tag  # type: ignore[assignment]
        if session is not None and session.counted:
            session.counted = False
            self.pending -= 1
        if session is not None and session.name is not None and self.by_name.get(session.name) is stream:
            del self.by_name[session.name]
            log.info("node %s left the relay (%s)", session.name, reason)

    def on_message(self, stream: Stream, message: bytes) -> None:
        session: Session = stream.tag  # type: ignore[assignment]
        if session.refused:
            return
        if session.name is None:
            self._before_auth(stream, session, message)
            return
        if is_esp(message):
            self.counters["dropped_unaddressed"] += 1  # bare ESP names no destination
            return
        try:
            kind, body = parse_control(message)
            if kind == RELAY:
                destination, esp = unpack_named(body)
                self._forward(session.name, destination, esp)
            elif kind not in (KEEPALIVE, HELLO):
                self.counters["unexpected_control"] += 1
        except FramingError:
            self.counters["malformed"] += 1

    # ------------------------------------------------------------------ authentication
    def _before_auth(self, stream: Stream, session: Session, message: bytes) -> None:
        kind = -1
        if not is_esp(message):
            try:
                kind, body = parse_control(message)
            except FramingError:
                kind = -1
        if kind in (HELLO, KEEPALIVE):
            return
        if kind != AUTH:
            self.counters["refused_anonymous"] += 1
            self._refuse(stream, session, "authenticate first")
            return
        try:
            name, signature = unpack_named(body)
        except FramingError:
            name, signature = "", b""
        key = self.trust.sign_keys.get(name)
        if key is None or len(signature) != SIGNATURE_SIZE:
            self.counters["refused_unknown"] += 1
            self._refuse(stream, session, "unknown node")
            return
        try:
            VerifyKey(bytes.fromhex(key)).verify(auth_payload(session.challenge, name), signature)
        except (BadSignatureError, ValueError):
            self.counters["refused_bad_signature"] += 1
            log.warning("relay: bad signature for node %s from %s", name, stream.address)
            self._refuse(stream, session, "bad signature")
            return
        old = self.by_name.get(name)
        if old is not None:
            self.loop.close_stream(old, "replaced by a newer stream")
        session.name, session.sign_key = name, key
        if session.counted:
            session.counted = False
            self.pending -= 1
        self.by_name[name] = stream
        stream.enqueue(control(WELCOME))
        self.counters["authenticated"] += 1
        log.info("node %s joined the relay from %s:%d", name, *stream.address[:2])

    def _refuse(self, stream: Stream, session: Session, reason: str) -> None:
        session.refused = True
        stream.enqueue(control(REFUSED, reason.encode()))
        stream.finish()

    # ------------------------------------------------------------------ forwarding
    def _forward(self, source: str, destination: str, esp: bytes) -> None:
        if destination not in self.trust.peers(source):
            self.counters["dropped_not_peers"] += 1
            return
        target = self.by_name.get(destination)
        if target is None:
            self.counters["dropped_offline"] += 1
            return
        try:
            sent = target.enqueue(control(RELAY, pack_named(source, esp)))
        except ValueError:
            self.counters["dropped_too_large"] += 1
            return
        self.counters["relayed" if sent else "dropped_full"] += 1
        self.counters["relayed_bytes" if sent else "dropped_bytes"] += len(esp)

    # ------------------------------------------------------------------ housekeeping
    def tick(self, now: float) -> None:
        for stream in list(self.loop.streams.values()):
            session: Session | None = stream.tag  # type: ignore[assignment]
            waiting = session is None or session.name is None
            if waiting and stream.state != "closed" and now - stream.started > self.auth_timeout:
                self.counters["auth_timeout"] += 1
                self.loop.close_stream(stream, "no authentication in time")
        trust = self.trust
        if trust is not self._checked:
            self._checked = trust
            for name, stream in list(self.by_name.items()):
                session = stream.tag  # type: ignore[assignment]
                if trust.sign_keys.get(name) != session.sign_key:
                    self.counters["evicted"] += 1
                    self.loop.close_stream(stream, "node removed or its identity changed")

    def status(self) -> dict[str, object]:
        return {"nodes": sorted(self.by_name), "streams": len(self.loop.streams)}
