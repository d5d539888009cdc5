"""The worker base class that every service subclasses.

A worker holds one CURVE connection to the broker, registers its service
with READY, answers its requests in order, and heartbeats both ways: when
the broker falls silent for HEARTBEAT_LIVENESS intervals (time this worker
itself did not run does not count), or tells it to DISCONNECT, the worker
reconnects and registers again. A worker may register for some message
kinds only (``kinds``: its own lane in the broker) and take several
requests at once (``capacity``: pipelined, still answered one by one).

A subclass sets ``service`` and ``allow`` and extends :meth:`handlers`; a
handler takes the decoded request and the caller and returns the reply.
Bad requests get error replies; a handler's exception is logged and answered
with ``internal``; nothing a caller sends stops the worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

import zmq

from bus import codec, errors
from bus import constants as c
from bus.errors import DecodeError, RemoteError
from bus.frames import NOBLOCK, recv_frames, send_frames
from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.messages import Message
from bus.messages.common import Error, Health, HealthRequest, Ping, Pong, WorkerReady
from bus.sockets import curve_client_socket, new_context

log = logging.getLogger(__name__)

Handler = Callable[[Any, Identity], Message]


class Worker:
    """Serve one named service through the broker."""

    service: ClassVar[str]
    allow: ClassVar[tuple[Role, ...]] = (Role.OPERATOR, Role.SERVICE)
    version: ClassVar[str] = "0.1.0"
    #: How often :meth:`tick` runs (seconds); also the longest a stop request waits.
    tick_interval: ClassVar[float] = 0.1
    #: The message kinds this worker serves alone (empty: every kind of its service that has no lane of its own).
    kinds: ClassVar[tuple[str, ...]] = ()
    #: Requests the broker may hand this worker before its first reply.
    capacity: ClassVar[int] = 1
    #: Messages read per wake-up before :meth:`tick` runs again.
    drain: ClassVar[int] = 64
    #: Hand the requests of one wake-up to :meth:`serve_many` together (the datastore commits them as one
    #: transaction); with ``capacity`` above 1 the broker has several waiting for this worker at once.
    batch_requests: ClassVar[bool] = False

    def __init__(self, endpoint: str, keypair: KeyPair, server_key: bytes) -> None:
        self.endpoint = endpoint
        self.keypair = keypair
        self.server_key = server_key
        self.context = new_context()
        self.counters: Counter[str] = Counter()
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._socket: zmq.Socket | None = None
        self._table = self.handlers()
        self._last_sent = 0.0  # when this worker last sent the broker anything (keepalive skips sooner ones)
        #: When this worker last had nothing to read (no backlog here, so none waiting for it in the broker either).
        self.idle_at = time.monotonic()

    def handlers(self) -> dict[type[Message], Handler]:
        """The handler table: request class -> bound method. Subclasses extend it."""
        return {Ping: self.on_ping, HealthRequest: self.on_health}

    def next_tick_in(self) -> float:
        """Seconds the loop may wait for a message before it ticks: ``tick_interval``, or less when a subclass
        has work due sooner (each message read starts the wait over, so a due tick could slip by that much)."""
        return self.tick_interval

    def on_ping(self, request: Ping, caller: Identity) -> Pong:
        return Pong(payload=request.payload, service=self.service)

    def on_health(self, request: HealthRequest, caller: Identity) -> Health:
        return Health(
            service=self.service,
            version=self.version,
            pid=os.getpid(),
            uptime=time.monotonic() - self.started,
            counters=dict(self.counters),
        )

    def tick(self, now: float) -> None:
        """Periodic work between requests (subclasses override); *now* is monotonic time."""

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        log.info("%s worker started (pid %d), broker %s", self.service, os.getpid(), self.endpoint)
        try:
            while not self._stop.is_set():
                self._session()
        finally:
            self.context.term()
            log.info("%s worker stopped", self.service)

    def stop(self) -> None:
        self._stop.set()

    def keepalive(self) -> None:
        """Heartbeat now, from a handler that blocks for long (a password hash on a loaded machine).

        The broker drops a worker silent for HEARTBEAT_LIVENESS intervals, even one busy with a request.
        Call it from the worker's own thread (the one running the handler), as the socket is not thread-safe.
        """
        now = time.monotonic()
        if self._socket is not None and now - self._last_sent >= c.HEARTBEAT_INTERVAL / 2:
            self._last_sent = now
            with contextlib.suppress(zmq.ZMQError):  # the loop notices a lost broker by itself
                send_frames(self._socket, [c.WORKER, c.HEARTBEAT], NOBLOCK)

    def push(self, target_key: str, message: Message) -> None:
        """Send *message* to the client whose CURVE key is *target_key*, through the broker."""
        if self._socket is None:
            raise RemoteError(errors.SERVICE_UNAVAILABLE, "not connected to the broker")
        send_frames(self._socket, [c.WORKER, c.PUSH, target_key.encode(), codec.encode(message)])

    def push_many(self, pushes: list[tuple[str, Message]]) -> None:
        """Send several pushes, PUSH_BATCH to a message: the broker then receives once per batch, not per push."""
        if self._socket is None:
            raise RemoteError(errors.SERVICE_UNAVAILABLE, "not connected to the broker")
        for start in range(0, len(pushes), c.PUSH_BATCH):
            frames = [c.WORKER, c.PUSH]
            for key, message in pushes[start : start + c.PUSH_BATCH]:
                frames += [key.encode(), codec.encode(message)]
            send_frames(self._socket, frames)

    def _session(self) -> None:
        """One connection to the broker, until it is lost or we are stopped."""
        sock = curve_client_socket(self.context, self.keypair, self.server_key, self.endpoint)
        self._socket = sock
        ready = WorkerReady(
            service=self.service,
            allow=list(self.allow),
            version=self.version,
            pid=os.getpid(),
            kinds=list(self.kinds),
            capacity=self.capacity,
        )
        interval = c.HEARTBEAT_INTERVAL
        broker_deadline = time.monotonic() + interval * c.HEARTBEAT_LIVENESS
        next_heartbeat = time.monotonic() + interval
        # A handshake may wait behind thousands of agents' (a reconnect storm): keep this socket, which libzmq
        # retries by itself, rather than start over at the back of the queue with a new one every 3 s.
        connect_deadline = time.monotonic() + c.CONNECT_WAIT
        try:
            # IMMEDIATE: nothing can be sent until the CURVE handshake is done.
            while not sock.poll(100, zmq.POLLOUT):
                self.idle_at = time.monotonic()  # not registered: the broker sends this worker's kinds elsewhere
                if self._stop.is_set() or time.monotonic() >= connect_deadline:
                    if not self._stop.is_set():
                        log.warning("%s: cannot reach broker %s, retrying", self.service, self.endpoint)
                    return
            send_frames(sock, [c.WORKER, c.READY, codec.encode(ready)])
            broker_deadline = time.monotonic() + interval * c.HEARTBEAT_LIVENESS
            last_loop = time.monotonic()
            while not self._stop.is_set():
                if sock.poll(math.ceil(self.next_tick_in() * 1000), zmq.POLLIN):
                    if not self._read(sock):
                        log.info("%s: broker asked to reconnect", self.service)
                        return
                    broker_deadline = time.monotonic() + interval * c.HEARTBEAT_LIVENESS
                else:
                    self.idle_at = time.monotonic()
                now = time.monotonic()
                # A stall of this loop (a long handler or tick, or no CPU) is not the broker's silence.
                broker_deadline += max(0.0, now - last_loop - interval)
                self._tick(now)
                last_loop = time.monotonic()
                broker_deadline += max(0.0, last_loop - now - interval)
                if now >= broker_deadline:
                    log.warning(
                        "%s: broker silent for %.1fs, reconnecting", self.service, interval * c.HEARTBEAT_LIVENESS
                    )
                    return
                if now >= next_heartbeat:
                    send_frames(sock, [c.WORKER, c.HEARTBEAT])
                    self._last_sent = now
                    next_heartbeat = now + interval
            with contextlib.suppress(zmq.ZMQError):  # stopping: a broker already gone need not hear it
                send_frames(sock, [c.WORKER, c.DISCONNECT], NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("%s: socket error %s, reconnecting", self.service, exc)
        finally:
            self._socket = None
            sock.close(linger=0)

    def _tick(self, now: float) -> None:
        try:
            self.tick(now)
        except Exception:
            log.exception("%s: periodic work failed; continuing", self.service)
            self.counters["tick_failures"] += 1

    def _read(self, sock: zmq.Socket) -> bool:
        """Handle what the broker sent, up to ``drain`` messages; False means reconnect."""
        held: list[list[bytes]] = []  # requests for serve_many, answered together after this read
        try:
            for _ in range(self.drain):
                try:
                    frames = recv_frames(sock, NOBLOCK)
                except zmq.Again:
                    self.idle_at = time.monotonic()
                    return True
                if self.batch_requests and _is_request(frames):
                    held.append(frames)
                elif not self._on_frames(sock, frames):
                    return False
            return True
        finally:
            if held:
                self._answer_many(sock, held)

    def _answer_many(self, sock: zmq.Socket, held: list[list[bytes]]) -> None:
        items = [(f[4], f[5], f[6].decode("ascii", "replace") if len(f) == 7 else "") for f in held]
        replies = self.serve_many(items)
        for frames, reply in zip(held, replies, strict=True):
            send_frames(sock, [c.WORKER, c.REPLY, frames[2], frames[3], self._encode(reply)])
        self._last_sent = time.monotonic()

    def serve_many(self, items: list[tuple[bytes, bytes, str]]) -> list[Message]:
        """Replies, in order, to requests given as (caller frame, body, address); subclasses may group them."""
        return [self._serve(caller, body, address) for caller, body, address in items]

    def _on_frames(self, sock: zmq.Socket, frames: list[bytes]) -> bool:
        """Handle one message from the broker; False means reconnect."""
        if frames == [b""]:
            return True  # connection probe
        if len(frames) < 2 or frames[0] != c.WORKER:
            self.counters["malformed"] += 1
            log.warning("%s: malformed message of %d frames from broker dropped", self.service, len(frames))
            return True
        command = frames[1]
        if command == c.HEARTBEAT:
            return True
        if command == c.DISCONNECT:
            return False
        if _is_request(frames):
            client, request_id, caller, body = frames[2:6]
            address = frames[6].decode("ascii", "replace") if len(frames) == 7 else ""
            reply = self._serve(caller, body, address)
            send_frames(sock, [c.WORKER, c.REPLY, client, request_id, self._encode(reply)])
            self._last_sent = time.monotonic()
            return True
        self.counters["malformed"] += 1
        log.warning("%s: unexpected %s from broker dropped", self.service, c.COMMAND_NAMES.get(command, command))
        return True

    def _encode(self, reply: Message) -> bytes:
        try:
            return codec.encode(reply)
        except (TypeError, ValueError, OverflowError):
            log.exception("%s: reply %s could not be encoded", self.service, reply.KIND)
            return codec.encode(self._error(errors.INTERNAL, f"{self.service} failed to encode its reply"))

    def _serve(self, caller_text: bytes, body: bytes, address: str = "") -> Message:
        opened = self._open(caller_text, body, address)
        if isinstance(opened, Error):
            return opened
        return self._handle(*opened)

    def _open(self, caller_text: bytes, body: bytes, address: str = "") -> tuple[Message, Identity] | Error:
        """The request and its caller, or the error that answers a malformed one."""
        self.counters["requests"] += 1
        try:
            caller = Identity.from_wire(caller_text.decode(), address)
            return codec.decode(body), caller
        except DecodeError as exc:
            return self._error(exc.code, exc.message)
        except ValueError as exc:
            return self._error(errors.MALFORMED, f"bad caller frame: {exc}")

    def _handle(self, request: Message, caller: Identity) -> Message:
        handler = self._table.get(type(request))
        if handler is None:
            return self._error(errors.UNSUPPORTED_REQUEST, f"{self.service} does not serve {request.KIND}")
        try:
            return handler(request, caller)
        except RemoteError as exc:
            return self._error(exc.code, exc.message)
        except Exception:
            log.exception("%s: handler for %s failed", self.service, request.KIND)
            return self._error(errors.INTERNAL, f"{self.service} failed to handle {request.KIND}")

    def _error(self, code: str, text: str) -> Error:
        self.counters[f"error_{code}"] += 1
        log.warning("%s: request answered with %s: %s", self.service, code, text)
        return Error(code=code, message=text)


def _is_request(frames: list[bytes]) -> bool:
    return len(frames) in (6, 7) and frames[0] == c.WORKER and frames[1] == c.REQUEST
