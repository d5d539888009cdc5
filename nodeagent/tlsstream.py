"""ESP in a TLS stream, framed as RFC 9329 does, and one selector thread that runs many such streams.

Pieces, from the bytes up:
  1. RFC 9329 framing (section 3): the initiator first writes the 6-byte
     prefix "IKETCP"; then each message is a 16-bit big-endian length that
     counts the length field itself, followed by the message. A message that
     starts with a non-zero SPI is ESP; one that starts with four zero bytes
     (the non-ESP marker) is a control message, here Coterie's own (hello,
     keepalive, the relay's challenge and addressed frames), never IKE.
  2. ``Framer``: pure; fed any byte chunks, it returns whole messages. A bad
     prefix or a length that is too small or over the limit is a
     ``FramingError`` and closes that one stream.
  3. ``Stream``: one TLS connection with a bounded send buffer. ``enqueue``
     may be called from any thread; when the buffer is full the message is
     dropped and counted, so a stalled peer costs only its own packets
     (the idea of DERP's TestSendFreeze).
  4. ``Loop``: one thread, one selector, every stream non-blocking: connect,
     TLS handshake, reads, writes, timers. Users give each stream a
     ``Handler`` (on_open, on_message, on_close) and get ``tick`` calls.
  5. ``InboundQueue``: a bounded queue a packet thread can select() on (its
     ``fileno``), how received ESP reaches the data plane's packet thread.

TLS here is a disguise and a firewall passport, not the security boundary:
ESP authenticates and encrypts every packet end to end, so certificate
verification is optional (off by default) and a self-signed certificate,
made with ``cryptography`` on first use, is the normal case.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import itertools
import logging
import os
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

PREFIX = b"IKETCP"  # RFC 9329 section 3.1: the stream prefix the initiator sends first
NON_ESP_MARKER = b"\x00\x00\x00\x00"  # RFC 9329 section 3: a message that is not ESP
LENGTH_SIZE = 2
MAX_MESSAGE = 0xFFFF - LENGTH_SIZE  # the 16-bit length counts itself
MIN_MESSAGE = 4  # an SPI or the non-ESP marker

# Coterie's control messages: NON_ESP_MARKER, one type byte, a body.
HELLO = 1  # initiator -> responder: version byte + the sender's node name (a hint for logs, not trusted)
KEEPALIVE = 2  # either way, when a stream has been quiet
CHALLENGE = 3  # relay -> node: 32 random bytes
AUTH = 4  # node -> relay: name length, name, Ed25519 signature over AUTH_CONTEXT || challenge || name
WELCOME = 5  # relay -> node: authenticated
REFUSED = 6  # relay -> node: a reason in UTF-8, then the relay closes
RELAY = 7  # node -> relay: destination name + ESP; relay -> node: source name + ESP
PROTOCOL_VERSION = 1
AUTH_CONTEXT = b"coterie relay auth v1\x00"  # domain separation: the identity key also signs epoch keys
CHALLENGE_SIZE = 32
SIGNATURE_SIZE = 64
MAX_NAME = 64

# Tuning.
SEND_LIMIT = 512 * 1024  # bytes queued per stream before new messages are dropped
READS_PER_EVENT = 16  # 64 KiB reads per readiness event, so one busy stream cannot starve the others
WRITE_CHUNK = 256 * 1024
HANDSHAKE_TIMEOUT = 10.0  # seconds for TCP connect + TLS handshake
KEEPALIVE_INTERVAL = 15.0  # a stream with nothing sent for this long sends a keepalive
IDLE_TIMEOUT = 60.0  # a stream with nothing received for this long is closed (peer gone)
TICK = 0.25


class FramingError(Exception):
    """The peer broke RFC 9329 framing; the stream carrying it is closed."""


def frame(message: bytes | memoryview) -> bytes:
    """One message as it goes on the stream: length (counting itself) + message."""
    if not MIN_MESSAGE <= len(message) <= MAX_MESSAGE:
        raise ValueError(f"a framed message is {MIN_MESSAGE}..{MAX_MESSAGE} bytes, got {len(message)}")
    return struct.pack("!H", len(message) + LENGTH_SIZE) + bytes(message)


class Framer:
    """Turns a byte stream into messages; holds at most one partial message (bounded by the limit)."""

    def __init__(self, *, expect_prefix: bool = False, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = min(max_message, MAX_MESSAGE)
        self._prefix_left = len(PREFIX) if expect_prefix else 0
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        if self._prefix_left:
            seen = len(PREFIX) - self._prefix_left
            take = min(self._prefix_left, len(buffer))
            if bytes(buffer[:take]) != PREFIX[seen : seen + take]:
                raise FramingError("stream does not start with the RFC 9329 prefix")
            del buffer[:take]
            self._prefix_left -= take
            if self._prefix_left:
                return []
        messages = []
        start = 0
        while len(buffer) - start >= LENGTH_SIZE:
            (length,) = struct.unpack_from("!H", buffer, start)
            size = length - LENGTH_SIZE
            if not MIN_MESSAGE <= size <= self.max_message:
                raise FramingError(f"message length {length} out of range")
            if len(buffer) - start < length:
                break
            messages.append(bytes(buffer[start + LENGTH_SIZE : start + length]))
            start += length
        del buffer[:start]
        return messages


# ---------------------------------------------------------------------- control messages
def control(kind: int, body: bytes = b"") -> bytes:
    return NON_ESP_MARKER + bytes((kind,)) + body


def is_esp(message: bytes) -> bool:
    return message[:4] != NON_ESP_MARKER


def parse_control(message: bytes) -> tuple[int, bytes]:
    if len(message) < 5 or message[:4] != NON_ESP_MARKER:
        raise FramingError("control message too short")
    return message[4], message[5:]


def pack_named(name: str, payload: bytes | memoryview) -> bytes:
    """A name (1-byte length, UTF-8) then a payload: the relay's address header, and AUTH."""
    raw = name.encode()
    if not 0 < len(raw) <= MAX_NAME:
        raise ValueError(f"node name must be 1..{MAX_NAME} bytes")
    return bytes((len(raw),)) + raw + bytes(payload)


def unpack_named(body: bytes) -> tuple[str, bytes]:
    if not body or not 0 < body[0] <= MAX_NAME or len(body) < 1 + body[0]:
        raise FramingError("bad name header")
    try:
        name = body[1 : 1 + body[0]].decode()
    except UnicodeDecodeError:
        raise FramingError("name is not UTF-8") from None
    return name, body[1 + body[0] :]


def auth_payload(challenge: bytes, name: str) -> bytes:
    """What a node signs to prove its identity to the relay."""
    return AUTH_CONTEXT + challenge + name.encode()


# ---------------------------------------------------------------------- TLS material
def ensure_certificate(cert_path: Path, key_path: Path, common_name: str = "coterie") -> None:
    """Write a self-signed certificate and its key (0600) unless both exist."""
    if cert_path.exists() and key_path.exists():
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
    finally:
        os.close(fd)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("made a self-signed TLS certificate %s", cert_path)


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    return context


def client_context(verify: bool = False, cafile: Path | None = None) -> ssl.SSLContext:
    """A TLS client context; without *verify* any certificate is accepted (ESP authenticates inside)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        if cafile is not None:
            context.load_verify_locations(cafile)
        else:
            context.load_default_certs()
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# ---------------------------------------------------------------------- streams
class Handler(Protocol):
    def on_open(self, stream: Stream) -> None: ...
    def on_message(self, stream: Stream, message: bytes) -> None: ...
    def on_close(self, stream: Stream, reason: str) -> None: ...


_ids = itertools.count(1)


class Stream:
    """One TLS connection on a Loop. Only ``enqueue`` and ``close`` may be called from other threads."""

    def __init__(self, loop: Loop, sock: socket.socket, handler: Handler, *, initiator: bool, address: tuple) -> None:
        self.id = next(_ids)
        self.loop = loop
        self.sock: socket.socket = sock
        self.handler = handler
        self.initiator = initiator
        self.address = address
        self.state = "connecting" if initiator else "handshake"
        self.framer = Framer(expect_prefix=not initiator)
        self.started = self.last_rx = self.last_tx = time.monotonic()
        self.counters: Counter[str] = Counter()
        self.close_after_flush = False
        self.tag: object = None  # what the owner knows of the peer (a node name once authenticated)
        self._lock = threading.Lock()
        self._queue: deque[bytes] = deque()
        self._queued = 0  # bytes in _queue and _chunk
        self._chunk = memoryview(b"")
        self._writing = False  # wants EVENT_WRITE: the socket was full
        self.paused = False  # reads held back while the consumer is behind (Loop.hold)
        self.limit = SEND_LIMIT
        self.context: ssl.SSLContext | None = None  # the client context, until the handshake starts

    @property
    def open(self) -> bool:
        return self.state == "open"

    def enqueue(self, message: bytes | memoryview) -> bool:
        """Queue one message for sending; False (and counted) if the buffer is full or the stream is closed."""
        data = frame(message)
        with self._lock:
            if self.state == "closed":
                self.counters["dropped_closed"] += 1
                return False
            if self._queued + len(data) > self.limit:
                self.counters["dropped_full"] += 1
                return False
            self._queue.append(data)
            self._queued += len(data)
        self.loop.want_flush(self)
        return True

    @property
    def queued(self) -> int:
        return self._queued

    def close(self, reason: str = "closed") -> None:
        self.loop.call_soon(lambda: self.loop.close_stream(self, reason))

    def finish(self) -> None:
        """Close once everything queued is written (loop thread)."""
        self.close_after_flush = True
        self.loop.want_flush(self)

    # -- loop thread only
    def _next_chunk(self) -> memoryview:
        if not self._chunk:
            with self._lock:
                parts: list[bytes] = []
                size = 0
                while self._queue and size < WRITE_CHUNK:
                    part = self._queue.popleft()
                    parts.append(part)
                    size += len(part)
            self._chunk = memoryview(b"".join(parts))
        return self._chunk

    def _sent(self, count: int) -> None:
        self._chunk = self._chunk[count:]
        with self._lock:
            self._queued -= count
        self.counters["bytes_out"] += count

    def _discard(self) -> None:
        with self._lock:
            self.state = "closed"
            self.counters["dropped_closed"] += len(self._queue)
            self._queue.clear()
            self._queued = 0
            self._chunk = memoryview(b"")


class Loop:
    """One selector thread for many TLS streams, listeners and timers."""

    def __init__(self, name: str = "tls-streams") -> None:
        self.name = name
        self.selector = selectors.DefaultSelector()
        self.streams: dict[int, Stream] = {}
        self.counters: Counter[str] = Counter()
        self._tickers: list[Callable[[float], None]] = []
        self._calls: deque[Callable[[], None]] = deque()
        self._dirty: deque[Stream] = deque()  # appended by any thread (atomic); drained by the loop
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._woken = False
        self._again: set[Stream] = set()
        self._paused: set[Stream] = set()
        #: True while whoever consumes received messages is behind: streams stop being read, so TCP
        #: flow control slows the sender instead of this side dropping what TLS already carried.
        self.hold: Callable[[], bool] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.keepalive_interval = KEEPALIVE_INTERVAL
        self.idle_timeout = IDLE_TIMEOUT
        self.handshake_timeout = HANDSHAKE_TIMEOUT

    # -- any thread
    def start(self) -> Loop:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._thread = None

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        self._wake()

    def want_flush(self, stream: Stream) -> None:
        self._dirty.append(stream)
        if not self._woken:
            self._woken = True
            self._wake()

    def add_ticker(self, fn: Callable[[float], None]) -> None:
        self.call_soon(lambda: self._tickers.append(fn))

    def remove_ticker(self, fn: Callable[[float], None]) -> None:
        self.call_soon(lambda: self._tickers.remove(fn) if fn in self._tickers else None)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    # -- loop thread
    def listen(
        self, sock: socket.socket, context: ssl.SSLContext, handler_for: Callable[[], Handler], *, mark: int = 0
    ) -> None:
        """Accept TLS streams on *sock* (bound, listening); each gets the handler *handler_for* returns.

        *mark* is set on every accepted socket, so that answers leave outside the tunnel (policy routing).
        """
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, ("listener", context, handler_for, mark))

    def connect(self, address: tuple[str, int], context: ssl.SSLContext, handler: Handler, *, mark: int = 0) -> Stream:
        """A stream to *address*, usable (``enqueue``) at once; it is dialled on the loop thread (any thread)."""
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark:  # keep the agent's own encapsulated traffic out of its tunnel (policy routing)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        stream = Stream(self, sock, handler, initiator=True, address=address)
        stream.context = context
        self.streams[stream.id] = stream
        self.call_soon(lambda: self._dial(stream))
        return stream

    def _dial(self, stream: Stream) -> None:
        if stream.state == "closed":
            return
        code = stream.sock.connect_ex(stream.address)
        if code not in (0, errno.EINPROGRESS):
            self.close_stream(stream, f"connect: {os.strerror(code)}")
            return
        self.selector.register(stream.sock, selectors.EVENT_WRITE, stream)

    def close_stream(self, stream: Stream, reason: str) -> None:
        if stream.state == "closed":
            return
        was = stream.state
        stream._discard()
        self.streams.pop(stream.id, None)
        self._again.discard(stream)
        self._paused.discard(stream)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(stream.sock)
        with contextlib.suppress(OSError):
            stream.sock.close()
        log.debug("stream %d to %s closed (%s, was %s)", stream.id, stream.address, reason, was)
        try:
            stream.handler.on_close(stream, reason)
        except Exception:
            log.exception("stream %d: close handler failed", stream.id)

    def _run(self) -> None:
        log.info("%s started", self.name)
        next_tick = time.monotonic()
        try:
            while not self._stop.is_set():
                timeout = 0.0 if self._again or self._calls else max(0.0, next_tick - time.monotonic())
                if self._paused:
                    if self.hold is None or not self.hold():
                        self._resume_all()
                    else:
                        timeout = min(timeout, 0.002)
                for key, events in self.selector.select(timeout):
                    try:
                        self._dispatch(key, events)
                    except Exception:  # a bug for one stream must not stop every other stream
                        self.counters["internal_errors"] += 1
                        log.exception("%s: stream event failed", self.name)
                        if isinstance(key.data, Stream):
                            self.close_stream(key.data, "internal error")
                for stream in list(self._again):
                    self._again.discard(stream)
                    try:
                        self._read(stream)
                    except Exception:
                        self.counters["internal_errors"] += 1
                        log.exception("%s: read failed", self.name)
                        self.close_stream(stream, "internal error")
                while self._calls:
                    try:
                        self._calls.popleft()()
                    except Exception:
                        self.counters["internal_errors"] += 1
                        log.exception("%s: call failed", self.name)
                self._flush_dirty()
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK
                    self._tick(now)
        finally:
            for stream in list(self.streams.values()):
                self.close_stream(stream, "loop stopped")
            for key in list(self.selector.get_map().values()):
                if key.data is not None and key.data[0] == "listener":
                    key.fileobj.close()  # type: ignore[union-attr]
            self.selector.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            log.info("%s stopped", self.name)

    def _dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        data = key.data
        if data is None:
            self._woken = False
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass
            return
        if isinstance(data, tuple):
            self._accept(key.fileobj, data[1], data[2], data[3])  # type: ignore[arg-type]
            return
        stream: Stream = data
        if stream.state == "connecting":
            self._connected(stream)
        elif stream.state == "handshake":
            self._handshake(stream)
        elif stream.state == "open":
            if events & selectors.EVENT_WRITE:
                self._flush(stream)
            if events & selectors.EVENT_READ and stream.state == "open":
                self._read(stream)

    def _accept(
        self, listener: socket.socket, context: ssl.SSLContext, handler_for: Callable[[], Handler], mark: int
    ) -> None:
        for _ in range(64):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            stream = Stream(self, tls, handler_for(), initiator=False, address=address)
            self.streams[stream.id] = stream
            self.selector.register(tls, selectors.EVENT_READ, stream)
            self.counters["accepted"] += 1

    def _connected(self, stream: Stream) -> None:
        code = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.close_stream(stream, f"connect: {os.strerror(code)}")
            return
        self.selector.unregister(stream.sock)
        context = stream.context
        assert context is not None
        stream.sock = context.wrap_socket(
            stream.sock, server_side=False, do_handshake_on_connect=False, server_hostname=stream.address[0]
        )
        stream.state = "handshake"
        stream.context = None
        self.selector.register(stream.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, stream)
        self._handshake(stream)

    def _handshake(self, stream: Stream) -> None:
        sock: ssl.SSLSocket = stream.sock  # type: ignore[assignment]
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.selector.modify(sock, selectors.EVENT_READ, stream)
            return
        except ssl.SSLWantWriteError:
            self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, stream)
            return
        except (ssl.SSLError, OSError) as exc:
            self.counters["handshake_failed"] += 1
            self.close_stream(stream, f"TLS handshake: {exc}")
            return
        stream.state = "open"
        stream.last_rx = time.monotonic()
        stream._writing = False
        self._interest(stream)
        if stream.initiator:
            with stream._lock:
                stream._queue.appendleft(PREFIX)
                stream._queued += len(PREFIX)
        try:
            stream.handler.on_open(stream)
        except Exception:
            log.exception("stream %d: open handler failed", stream.id)
        self._flush(stream)
        self._read(stream)  # TLS 1.3 may already hold application data

    def _read(self, stream: Stream) -> None:
        sock: ssl.SSLSocket = stream.sock  # type: ignore[assignment]
        hold = self.hold
        for _ in range(READS_PER_EVENT):
            if stream.state != "open":
                return
            if hold is not None and hold():
                stream.paused = True
                self._paused.add(stream)
                self.counters["reads_paused"] += 1
                self._interest(stream)
                return
            try:
                data = sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            except ssl.SSLWantWriteError:
                return
            except (ssl.SSLError, OSError) as exc:
                self.close_stream(stream, f"read: {exc}")
                return
            if not data:
                self.close_stream(stream, "closed by peer")
                return
            stream.last_rx = time.monotonic()
            stream.counters["bytes_in"] += len(data)
            try:
                messages = stream.framer.feed(data)
            except FramingError as exc:
                self.counters["framing_errors"] += 1
                self.close_stream(stream, f"framing: {exc}")
                return
            for message in messages:
                stream.counters["messages_in"] += 1
                stream.handler.on_message(stream, message)
        if stream.state == "open":
            self._again.add(stream)  # more may be waiting, inside TLS or in the socket: come back after the others

    def _flush_dirty(self) -> None:
        dirty = self._dirty
        seen: set[int] = set()
        for _ in range(len(dirty)):  # what is there now; later arrivals wait for the next turn
            stream = dirty.popleft()
            if stream.id not in seen and stream.state == "open":
                seen.add(stream.id)
                self._flush(stream)

    def _flush(self, stream: Stream) -> None:
        if stream.state != "open":
            return
        sock = stream.sock
        while True:
            chunk = stream._next_chunk()
            if not chunk:
                break
            try:
                count = sock.send(chunk)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                if not stream._writing:
                    stream._writing = True
                    self._interest(stream)
                return
            except (ssl.SSLError, OSError) as exc:
                self.close_stream(stream, f"write: {exc}")
                return
            stream._sent(count)
            stream.last_tx = time.monotonic()
        if stream._writing:
            stream._writing = False
            self._interest(stream)
        if stream.close_after_flush:
            self.close_stream(stream, "closed after flush")

    def _interest(self, stream: Stream) -> None:
        """Register an open stream for what it waits on now: reads unless paused, writes while the socket is full."""
        events = (0 if stream.paused else selectors.EVENT_READ) | (selectors.EVENT_WRITE if stream._writing else 0)
        registered = stream.sock in self.selector.get_map()
        if events and registered:
            self.selector.modify(stream.sock, events, stream)
        elif events:
            self.selector.register(stream.sock, events, stream)
        elif registered:
            self.selector.unregister(stream.sock)

    def _resume_all(self) -> None:
        paused, self._paused = self._paused, set()
        for stream in paused:
            stream.paused = False
            if stream.state == "open":
                self._interest(stream)
                self._again.add(stream)  # TLS may hold decrypted data the selector cannot see

    def _tick(self, now: float) -> None:
        for stream in list(self.streams.values()):
            if stream.state in ("connecting", "handshake"):
                if now - stream.started > self.handshake_timeout:
                    self.close_stream(stream, "handshake timeout")
            elif now - stream.last_rx > self.idle_timeout:
                self.close_stream(stream, "idle timeout")
            elif now - stream.last_tx > self.keepalive_interval and not stream.queued:
                stream.enqueue(control(KEEPALIVE))
        for ticker in self._tickers:
            try:
                ticker(now)
            except Exception:
                log.exception("%s: ticker failed", self.name)


class InboundQueue:
    """Received packets for another thread, bounded; ``fileno`` is readable while it may hold some.

    The consumer select()s on ``fileno()`` next to its sockets, then calls
    ``pop(limit)``. A full queue drops the newest packet and counts it (as a
    full socket buffer would).
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.dropped = 0
        self._items: deque[tuple] = deque()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signalled = False

    def fileno(self) -> int:
        return self._r

    def __len__(self) -> int:
        return len(self._items)

    def behind(self) -> bool:
        """Three quarters full: the producer should stop reading its sockets for a moment."""
        return len(self._items) >= self.limit * 3 // 4

    def put(self, item: tuple) -> bool:
        if len(self._items) >= self.limit:
            self.dropped += 1
            return False
        self._items.append(item)
        if not self._signalled:
            self._signalled = True
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._w, b"\0")
        return True

    def pop(self, limit: int) -> list[tuple]:
        # Order matters: drain, then clear the flag, then take. A producer appends before it looks at
        # the flag, so an item is either taken here or its producer sees the flag clear and signals again.
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._r, 4096):
                pass
        self._signalled = False
        items = self._items
        batch = [items.popleft() for _ in range(min(limit, len(items)))]
        if items:  # more than one batch: stay readable
            self._signalled = True
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._w, b"\0")
        return batch

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
