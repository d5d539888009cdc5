"""The TCP/443 paths: ESP in TLS straight to a peer, or through the server's relay.

When UDP is blocked, a pair talks over a TLS stream on port 443 (RFC 9329
framing, see tlsstream.py): the node that can dial (``Route.address``) opens
the stream to the other's ``StreamServer``; the other answers on the stream
the packets arrived on. When neither can reach the other (both firewalled,
or both behind PAT with hole punching failed), both keep one authenticated
stream to the server's relay (services/relay), which forwards the sealed
ESP packets by node name without being able to read them.

How the data plane uses it (one ``TcpPaths`` per agent):
  control loop:  paths.set_routes({"b": Route(address=("198.51.100.2", 443)),
                                   "c": Route(relay=True), "d": Route()})
                 paths.set_relay(RelaySettings(host, port, node, identity_key))
  outbound:      paths.send(peer, esp_bytes) -> bool   (False: not sent, counted)
  inbound:       select() on paths.fileno(); paths.recv_batch(64) -> [(esp, stream_id)]
                 after an ESP packet authenticated: paths.bind(stream_id, peer)
Certificate checks are off by default: ESP authenticates every packet end to
end, and TLS is here to pass firewalls. Turn ``verify`` on to pin a CA.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from nodeagent.tlsstream import (
    AUTH,
    CHALLENGE,
    CHALLENGE_SIZE,
    HELLO,
    KEEPALIVE,
    PROTOCOL_VERSION,
    REFUSED,
    RELAY,
    WELCOME,
    FramingError,
    InboundQueue,
    Loop,
    Stream,
    auth_payload,
    client_context,
    control,
    ensure_certificate,
    is_esp,
    pack_named,
    parse_control,
    server_context,
    unpack_named,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 443
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0  # seconds a stream must stay open before the reconnect backoff resets


@dataclass(frozen=True)
class Route:
    """How to reach one peer over TCP: dial *address*, use the relay, or (neither) answer its stream."""

    address: tuple[str, int] | None = None
    relay: bool = False


@dataclass(frozen=True)
class RelaySettings:
    host: str
    port: int
    node: str
    identity: SigningKey  # the node's Ed25519 identity key (state dir identity.key)


class StreamServer:
    """A TLS listener for peers that dial us; a self-signed certificate is made if none is given."""

    def __init__(
        self,
        loop: Loop,
        handler_for: Callable[[], Any],
        *,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        cert: Path | None = None,
        key: Path | None = None,
        mark: int = 0,
    ) -> None:
        if cert is None or key is None:
            with tempfile.TemporaryDirectory() as tmp:
                cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
                ensure_certificate(cert, key)
                context = server_context(cert, key)
        else:
            context = server_context(cert, key)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
            self.sock.listen(128)
        except OSError:
            self.sock.close()
            raise
        self.port = int(self.sock.getsockname()[1])
        if mark:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        loop.call_soon(lambda: loop.listen(self.sock, context, handler_for, mark=mark))


class StreamClient:
    """One outbound TLS stream that is re-dialled with backoff (0.5 s doubling to 30 s) when it drops."""

    def __init__(
        self,
        loop: Loop,
        address: tuple[str, int],
        handler: Any,
        *,
        verify: bool = False,
        cafile: Path | None = None,
        hello: str = "",
        mark: int = 0,
    ) -> None:
        self.loop = loop
        self.address = address
        self.handler = handler
        self.context = client_context(verify, cafile)
        self.hello = hello
        self.mark = mark
        self.stream: Stream | None = None
        self.backoff = BACKOFF_FIRST
        self.retry_at: float | None = None
        self.connects = 0
        self.closed = False
        self.last_error = ""
        self._opened_at: float | None = None
        loop.add_ticker(self._tick)
        self._dial()  # Loop.connect may be called from any thread; the stream takes messages at once

    def send(self, message: bytes | memoryview) -> bool:
        """Queue one message (also while connecting); False when there is no stream or its buffer is full."""
        stream = self.stream
        return stream is not None and stream.enqueue(message)

    @property
    def ready(self) -> bool:
        return self.stream is not None and self.stream.open

    def close(self) -> None:
        self.closed = True
        self.loop.remove_ticker(self._tick)
        stream = self.stream
        if stream is not None:
            stream.close("client closed")

    # -- loop thread
    def _dial(self) -> None:
        if self.closed:
            return
        self.connects += 1
        self.retry_at = None
        self.stream = self.loop.connect(self.address, self.context, self, mark=self.mark)

    def _tick(self, now: float) -> None:
        if self.retry_at is not None and now >= self.retry_at:
            self._dial()

    def on_open(self, stream: Stream) -> None:
        self._opened_at = time.monotonic()
        stream.enqueue(control(HELLO, bytes((PROTOCOL_VERSION,)) + self.hello.encode()[:64]))
        self.handler.on_open(stream)

    def on_message(self, stream: Stream, message: bytes) -> None:
        self.handler.on_message(stream, message)

    def on_close(self, stream: Stream, reason: str) -> None:
        if stream is not self.stream:
            return
        self.stream = None
        self.last_error = reason
        self.handler.on_close(stream, reason)
        if self.closed:
            return
        up = time.monotonic() - self._opened_at if self._opened_at is not None else 0.0
        self._opened_at = None
        self.backoff = BACKOFF_FIRST if up >= STABLE_AFTER else min(self.backoff * 2, BACKOFF_MAX)
        delay = BACKOFF_FIRST if up >= STABLE_AFTER else self.backoff
        self.retry_at = time.monotonic() + delay
        log.info("stream to %s:%d closed (%s); redialling in %.1fs", *self.address, reason, delay)


class RelayClient:
    """This node's authenticated stream to the server's relay: ``send_to(peer, esp)``, ``receive()``.

    On connect the relay sends a challenge; we answer with our node name and
    an Ed25519 signature (identity key) over AUTH_CONTEXT || challenge ||
    name. Packets then go addressed by peer name and arrive with the source
    name the relay authenticated. Received packets go to *on_packet* if
    given, else to an InboundQueue read with ``receive`` (select on ``fileno``).
    """

    def __init__(
        self,
        settings: RelaySettings,
        *,
        loop: Loop | None = None,
        on_packet: Callable[[str, bytes, int], None] | None = None,
        verify: bool = False,
        cafile: Path | None = None,
        mark: int = 0,
    ) -> None:
        self.settings = settings
        self._own_loop = loop is None
        self.loop = loop or Loop("relay-client")
        self.queue = InboundQueue() if on_packet is None else None
        if self._own_loop:
            self.loop.hold = self.queue.behind if self.queue is not None else None
            self.loop.start()
        self.on_packet = on_packet or self._enqueue
        self.counters: Counter[str] = Counter()
        self.authenticated = False
        self.refused = ""
        address = (settings.host, settings.port)
        self.client = StreamClient(self.loop, address, self, verify=verify, cafile=cafile, mark=mark)

    @property
    def stream_id(self) -> int | None:
        stream = self.client.stream
        return stream.id if stream is not None and self.authenticated else None

    def send_to(self, peer: str, esp: bytes | memoryview) -> bool:
        if not self.authenticated:
            self.counters["dropped_not_ready"] += 1
            return False
        if self.client.send(control(RELAY, pack_named(peer, esp))):
            self.counters["sent"] += 1
            return True
        self.counters["dropped_full"] += 1
        return False

    def receive(self, limit: int = 64) -> list[tuple[str, bytes]]:
        assert self.queue is not None, "packets go to on_packet"
        return [(source, esp) for source, esp, _ in self.queue.pop(limit)]

    def fileno(self) -> int:
        assert self.queue is not None, "packets go to on_packet"
        return self.queue.fileno()

    def close(self) -> None:
        self.client.close()
        if self._own_loop:
            self.loop.stop()
        if self.queue is not None:
            self.queue.close()

    def _enqueue(self, source: str, esp: bytes, stream_id: int) -> None:
        assert self.queue is not None
        self.queue.put((source, esp, stream_id))

    # -- loop thread
    def on_open(self, stream: Stream) -> None:
        self.authenticated = False

    def on_close(self, stream: Stream, reason: str) -> None:
        self.authenticated = False

    def on_message(self, stream: Stream, message: bytes) -> None:
        if is_esp(message):
            self.counters["unexpected_esp"] += 1  # the relay always names the source
            return
        try:
            kind, body = parse_control(message)
            if kind == RELAY and self.authenticated:
                source, esp = unpack_named(body)
                self.counters["received"] += 1
                self.on_packet(source, esp, stream.id)
            elif kind == CHALLENGE and len(body) == CHALLENGE_SIZE:
                name = self.settings.node
                signature = self.settings.identity.sign(auth_payload(body, name)).signature
                stream.enqueue(control(AUTH, pack_named(name, signature)))
            elif kind == WELCOME:
                self.authenticated = True
                self.refused = ""
                log.info("relay %s:%d: authenticated as %s", self.settings.host, self.settings.port, self.settings.node)
            elif kind == REFUSED:
                self.refused = body.decode(errors="replace")
                log.warning("relay %s:%d refused us: %s", self.settings.host, self.settings.port, self.refused)
            elif kind != KEEPALIVE:
                self.counters["unexpected_control"] += 1
        except FramingError as exc:
            self.counters["malformed"] += 1
            log.debug("relay sent a malformed message: %s", exc)


class TcpPaths:
    """One agent's TCP/443 paths: streams peers opened to us, streams we dial, and the relay."""

    def __init__(
        self,
        *,
        node: str = "",
        listen: tuple[str, int] | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        verify: bool = False,
        cafile: Path | None = None,
        mark: int = 0,
    ) -> None:
        self.node = node
        self.verify, self.cafile, self.mark = verify, cafile, mark
        self.loop = Loop("tcp443")
        self.inbound = InboundQueue()
        self.loop.hold = self.inbound.behind
        self.counters: Counter[str] = Counter()
        self.routes: dict[str, Route] = {}
        self._clients: dict[tuple[str, int], StreamClient] = {}  # one outbound stream per peer address
        self._bound: dict[str, int] = {}  # peer -> id of the stream its authenticated packets arrived on
        # peer -> id of the newest accepted stream whose HELLO named it: where to send before anything
        # authenticated (a peer that dials us may have nothing to send yet). Only a hint: a liar gets
        # sealed packets it cannot read, until the real peer's first authenticated packet binds its stream.
        self._hinted: dict[str, int] = {}
        self.relay: RelayClient | None = None
        self.server: StreamServer | None = None
        self.loop.start()
        if listen is not None:
            host, port = listen
            try:
                self.server = StreamServer(self.loop, lambda: self, host=host, port=port, cert=cert, key=key, mark=mark)
            except OSError:
                self.close()  # the port is taken: nothing of this object stays behind
                raise

    @property
    def port(self) -> int | None:
        return self.server.port if self.server else None

    # ------------------------------------------------------------------ control loop
    def set_routes(self, routes: dict[str, Route]) -> None:
        """Replace the per-peer routes; streams to addresses no peer uses any more are closed."""
        wanted = {r.address for r in routes.values() if r.address is not None}
        clients = dict(self._clients)
        for address in list(clients):
            if address not in wanted:
                clients.pop(address).close()
        for address in wanted:
            if address not in clients:
                clients[address] = StreamClient(
                    self.loop, address, self, verify=self.verify, cafile=self.cafile, hello=self.node, mark=self.mark
                )
        self._clients = clients
        self.routes = dict(routes)
        self._bound = {peer: sid for peer, sid in self._bound.items() if peer in routes}

    def set_relay(self, settings: RelaySettings | None) -> None:
        old = self.relay
        if old is not None and settings == old.settings:
            return
        self.relay = None
        if old is not None:
            old.close()
        if settings is not None:
            self.relay = RelayClient(
                settings,
                loop=self.loop,
                on_packet=self._from_relay,
                verify=self.verify,
                cafile=self.cafile,
                mark=self.mark,
            )

    def close(self) -> None:
        self.loop.stop()
        self.inbound.close()

    # ------------------------------------------------------------------ data-plane thread: sending
    def send(self, peer: str, esp: bytes | memoryview) -> bool:
        """Send one ESP packet to *peer*: on the stream it last spoke on, else its route. False: dropped."""
        relay = self.relay
        sid = self._bound.get(peer)
        if sid is not None:
            if relay is not None and sid == relay.stream_id:
                return self._count(relay.send_to(peer, esp))
            stream = self.loop.streams.get(sid)
            if stream is not None and stream.open:
                return self._count(stream.enqueue(esp))
        route = self.routes.get(peer)
        if route is None:
            self.counters["out_no_route"] += 1
            return False
        if route.address is not None:
            client = self._clients.get(route.address)
            if client is not None and client.send(esp):
                return self._count(True)
        if route.relay and relay is not None:  # also the fallback while a direct stream is down
            return self._count(relay.send_to(peer, esp))
        hinted = self._hinted_stream(peer)
        if hinted is not None:
            return self._count(hinted.enqueue(esp))
        return self._count(False)

    def _hinted_stream(self, peer: str) -> Stream | None:
        sid = self._hinted.get(peer)
        stream = self.loop.streams.get(sid) if sid is not None else None
        return stream if stream is not None and stream.open else None

    def can_send(self, peer: str) -> bool:
        """Whether ``send`` has somewhere to put *peer*'s packets now (a stream open or connecting, the relay
        authenticated): the data plane holds packets briefly instead of sealing them for nothing."""
        relay = self.relay
        sid = self._bound.get(peer)
        if sid is not None:
            if relay is not None and sid == relay.stream_id:
                return True
            stream = self.loop.streams.get(sid)
            if stream is not None and stream.open:
                return True
        route = self.routes.get(peer)
        if route is None:
            return False
        if route.address is not None:
            client = self._clients.get(route.address)
            if client is not None and client.stream is not None:
                return True
        if route.relay and relay is not None and relay.authenticated:
            return True
        return self._hinted_stream(peer) is not None

    def peer_state(self, peer: str) -> str:
        """One line for `agent status`: which stream carries *peer*'s packets and in what state."""
        relay = self.relay
        sid = self._bound.get(peer)
        route = self.routes.get(peer)
        if sid is not None and relay is not None and sid == relay.stream_id:
            return f"via relay {relay.settings.host}:{relay.settings.port} (authenticated)"
        stream = self.loop.streams.get(sid) if sid is not None else None
        if stream is not None and stream.open:
            how = "dialled" if stream.initiator else "accepted"
            return f"stream {stream.id} {how} {stream.address[0]}:{stream.address[1]} ({stream.state})"
        if route is None:
            return "no route"
        if route.address is not None:
            client = self._clients.get(route.address)
            state = client.stream.state if client is not None and client.stream is not None else "down"
            error = f", last error: {client.last_error}" if client is not None and client.last_error else ""
            return f"dialling {route.address[0]}:{route.address[1]} ({state}{error})"
        hinted = self._hinted_stream(peer)
        if hinted is not None:
            return f"stream {hinted.id} accepted {hinted.address[0]}:{hinted.address[1]} (hello {peer}, unverified)"
        if route.relay:
            if relay is None:
                return "relay not announced yet"
            if relay.authenticated:
                return f"via relay {relay.settings.host}:{relay.settings.port} (authenticated)"
            refused = f", refused: {relay.refused}" if relay.refused else ""
            return f"relay {relay.settings.host}:{relay.settings.port} (not authenticated{refused})"
        return "waiting for the peer to dial us"

    def _count(self, sent: bool) -> bool:
        self.counters["out_packets" if sent else "out_dropped"] += 1
        return sent

    # ------------------------------------------------------------------ data-plane thread: receiving
    def fileno(self) -> int:
        """Readable when recv_batch may return packets; select() on it beside the UDP sockets."""
        return self.inbound.fileno()

    def recv_batch(self, limit: int) -> list[tuple[bytes, int]]:
        """Up to *limit* received ESP packets, each with the id of the stream it came on."""
        return self.inbound.pop(limit)

    def is_bound(self, peer: str) -> bool:
        """Whether an authenticated packet of *peer* arrived on a stream that is still open (or the relay)."""
        sid = self._bound.get(peer)
        if sid is None:
            return False
        relay = self.relay
        stream = self.loop.streams.get(sid)
        return (relay is not None and sid == relay.stream_id) or (stream is not None and stream.open)

    def bind(self, stream_id: int, peer: str) -> None:
        """An authenticated packet of *peer* came on *stream_id*: answer it there."""
        if self._bound.get(peer) != stream_id:
            self._bound[peer] = stream_id
            self.counters["bound"] += 1

    # ------------------------------------------------------------------ loop thread (stream handler)
    def on_open(self, stream: Stream) -> None:
        self.counters["streams_opened"] += 1

    def on_close(self, stream: Stream, reason: str) -> None:
        self.counters["streams_closed"] += 1
        if stream.tag is not None and self._hinted.get(stream.tag) == stream.id:
            del self._hinted[stream.tag]

    def on_message(self, stream: Stream, message: bytes) -> None:
        if is_esp(message):
            if not self.inbound.put((message, stream.id)):
                self.counters["in_queue_full"] += 1
            return
        try:
            kind, body = parse_control(message)
        except FramingError:
            self.counters["in_malformed_control"] += 1
            return
        if kind == HELLO and body:
            stream.tag = body[1:].decode(errors="replace")  # a hint for logs, status and first packets
            if not stream.initiator:
                self._hinted[stream.tag] = stream.id
        elif kind != KEEPALIVE:
            self.counters["in_unknown_control"] += 1

    def _from_relay(self, source: str, esp: bytes, stream_id: int) -> None:
        if not self.inbound.put((esp, stream_id)):
            self.counters["in_queue_full"] += 1

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        relay = self.relay
        return {
            "listen_port": self.port,
            "streams": [
                {
                    "id": s.id,
                    "address": f"{s.address[0]}:{s.address[1]}",
                    "state": s.state,
                    "dialled": s.initiator,
                    "hello": s.tag,
                    "queued": s.queued,
                    **dict(s.counters),
                }
                for s in list(self.loop.streams.values())
            ],
            "relay": None
            if relay is None
            else {
                "address": f"{relay.settings.host}:{relay.settings.port}",
                "authenticated": relay.authenticated,
                "refused": relay.refused,
                **dict(relay.counters),
            },
            "bound": dict(self._bound),
            "counters": dict(self.counters) | {"in_queue_dropped": self.inbound.dropped},
        }
