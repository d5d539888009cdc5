"""The bus client: requests with timeouts and retries (the Guide's Lazy Pirate).

A client holds one CURVE connection to the broker. A request is sent, and
the reply awaited until a deadline; on silence the socket is thrown away and
reopened (the only way to reset a DEALER that lost its peer) and the request
sent again, up to ``retries`` times. Retriable error replies (a worker lost,
a service briefly without workers) are retried the same way. Replies are
matched by request id, so a late reply to an abandoned attempt is ignored.
Pushes that arrive meanwhile are kept for :meth:`Client.next_push`.

A new connection after a lost one waits a backoff (:class:`Backoff`:
exponential, capped, jittered, reset once the broker answers), so that
thousands of agents that lost the server together do not come back in the
same instant and queue their handshakes behind each other.
"""

from __future__ import annotations

import logging
import os
import random
import select
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import zmq

from bus import codec, errors
from bus import constants as c
from bus.errors import BusTimeout, DecodeError, RemoteError
from bus.frames import NOBLOCK, recv_frames, send_frames
from bus.keys import KeyPair
from bus.messages import Message
from bus.messages.common import Error
from bus.sockets import curve_client_socket, new_context

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Message)

#: The request id of notifications: their replies are dropped on arrival.
NOTIFY_ID = c.NOTIFY_ID

#: A ZeroMQ context, for callers that share one among many clients (simulated agents).
Context = zmq.Context


def shared_context(*, io_threads: int | None = None, max_sockets: int = 0) -> Context:
    """One context for many clients in one process; *max_sockets* above 1023 for thousands of them."""
    if io_threads is None:
        return new_context(max_sockets=max_sockets)
    return new_context(io_threads=io_threads, max_sockets=max_sockets)


class Backoff:
    """Delays between reconnects: doubling from *base* up to *cap*, each drawn from its upper half, reset on success.

    "Equal jitter": a delay lies in [d/2, d] for the doubling d, so the gaps grow (a crowd backs off) and no two
    clients that failed together retry together.
    """

    def __init__(self, base: float = c.RECONNECT_BASE, cap: float = c.RECONNECT_MAX) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        """The delay before the next attempt; each call counts one failure."""
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 30))
        self.failures += 1
        return ceiling / 2 + random.random() * ceiling / 2

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class Incoming:
    """One message read by :meth:`Client.incoming`: a reply to a started request, or a push."""

    request_id: bytes  # empty for a push
    service: str
    message: Message | None  # None when the reply was an error (then ``error`` says which)
    error: RemoteError | None = None


class ClientPoller:
    """Waits on many clients' connections (and plain file descriptors) at once, for one event loop.

    Simulated agents run thousands of clients per thread. ``zmq.Poller`` hands every socket to
    ``zmq_poll`` on every call (1.6 ms for 1,000 sockets here, whether or not any has input), so the
    loop spent more CPU polling than applying updates. This waits in ``epoll`` on each socket's
    ``ZMQ_FD`` instead: a call costs what is ready, not what is watched.

    ``ZMQ_FD`` only says that the socket has commands to process; ``ZMQ_EVENTS`` then says whether a
    message waits. Two rules keep a message from being stranded (queued while the descriptor is
    quiet): a client returned by :meth:`poll` must be drained (``Client.incoming`` to its end), and a
    client that sent since the last poll is asked for ``ZMQ_EVENTS`` again (a send may process the
    command that announced a message, so its descriptor never fires). Clients report their sends
    here themselves (``Client._send``). A client must be removed before it reconnects, and added
    again after (its socket, and so its descriptor, is new).
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._by_fd: dict[int, Client] = {}
        self._fd_of: dict[Client, int] = {}
        self._plain: set[int] = set()
        self._sent: set[Client] = set()  # clients that sent since the last poll: ask ZMQ_EVENTS again

    def add(self, client: Client) -> None:
        fd = client.socket.getsockopt(zmq.FD)
        self._epoll.register(fd, select.EPOLLIN)
        self._by_fd[fd], self._fd_of[client] = client, fd
        client._poller_sent = self._sent
        self._sent.add(client)  # whatever it holds already is seen at the next poll

    def remove(self, client: Client) -> None:
        fd = self._fd_of.pop(client, None)
        if fd is None:
            return
        del self._by_fd[fd]
        self._epoll.unregister(fd)
        self._sent.discard(client)
        client._poller_sent = None

    def add_fd(self, fd: int) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._plain.add(fd)

    def poll(self, timeout: float) -> tuple[list[Client], list[int]]:
        """The clients and descriptors with input waiting, after at most *timeout* seconds.

        Every client returned must be drained before the next call (see the class).
        """
        ready = {client for client in self._sent if client.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN}
        self._sent.clear()
        fds = []
        for fd, _ in self._epoll.poll(0 if ready else max(0.0, timeout)):
            client = self._by_fd.get(fd)
            if client is None:
                if fd in self._plain:
                    fds.append(fd)
            elif client not in ready and client.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                ready.add(client)  # reading EVENTS also quiets the descriptor until new commands come
        return list(ready), fds

    def close(self) -> None:
        self._epoll.close()


class Client:
    """A synchronous client of the broker; not thread-safe (one per thread)."""

    def __init__(
        self,
        endpoint: str,
        keypair: KeyPair,
        server_key: bytes,
        *,
        timeout: float = c.REQUEST_TIMEOUT,
        retries: int = c.REQUEST_RETRIES,
        context: zmq.Context | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.keypair = keypair
        self.server_key = server_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff or Backoff()  # shared with a caller that also waits between its own attempts
        self.counters: Counter[str] = Counter()
        self._poller_sent: set[Client] | None = None  # the ClientPoller watching this client: told of every send
        self.pushes: deque[tuple[str, Message]] = deque(maxlen=10_000)
        self._own_context = context is None
        self.context = context or new_context()
        self._started: set[bytes] = set()  # ids of requests sent with start(), whose replies incoming() returns
        self._connect_at: float | None = None  # when the pending connect is due; None once connected
        self._socket = self._connect()

    def _connect(self) -> zmq.Socket:
        return curve_client_socket(self.context, self.keypair, self.server_key, self.endpoint)

    def _connect_when_due(self, wait: float) -> bool:
        """Connect the socket if its backoff has passed, sleeping up to *wait* for it; True when connected."""
        if self._connect_at is None:
            return True
        left = self._connect_at - time.monotonic()
        if left > wait:
            return False
        if left > 0:
            time.sleep(left)
        self._socket.connect(self.endpoint)
        self._connect_at = None
        return True

    @property
    def socket(self) -> zmq.Socket:
        """The connection, for waiting on many clients in one poller (simulated agents)."""
        return self._socket

    @property
    def connecting_in(self) -> float:
        """Seconds until the pending reconnect is made (0: connected, or due now)."""
        return 0.0 if self._connect_at is None else max(0.0, self._connect_at - time.monotonic())

    def reconnect(self) -> None:
        """Throw the connection away; a new one is made after the backoff (at the next send, or on its own)."""
        self._started.clear()
        self._socket.close(linger=0)
        self._socket = curve_client_socket(self.context, self.keypair, self.server_key, self.endpoint, connect=False)
        self._connect_at = time.monotonic() + self.backoff.next()
        self.counters["reconnects"] += 1

    def close(self) -> None:
        self._socket.close(linger=0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def request(
        self,
        service: str,
        message: Message,
        *,
        expect: type[T] | None = None,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> T | Message:
        """Send *message* to *service*; return the reply or raise RemoteError/BusTimeout."""
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        body = codec.encode(message)
        last_error: RemoteError | None = None
        for attempt in range(retries + 1):
            if attempt:
                self.counters["retries"] += 1
            request_id = os.urandom(8)
            frames = [c.CLIENT, c.REQUEST, service.encode(), request_id, body]
            reply = None
            if self._send(frames, timeout):
                reply = self._await({request_id}, timeout).get(request_id)
            if reply is None:
                log.info("no reply from %s within %.1fs (attempt %d), reconnecting", service, timeout, attempt + 1)
                self.reconnect()
                continue
            try:
                return self._unwrap(reply, expect)
            except RemoteError as exc:
                if not exc.retriable:
                    raise
                last_error = exc
                time.sleep(min(0.1 * 2**attempt, 1.0))
        if last_error is not None:
            raise last_error
        raise BusTimeout(
            f"no reply from service {service!r} at {self.endpoint} after {retries + 1} attempts"
            " (is the server running, and is its public key the right one?)"
        )

    def _send(self, frames: list[bytes], timeout: float) -> bool:
        """Send once the connection is up (IMMEDIATE queues nothing before); False on timeout.

        A blocking send (timeout > 0) first sleeps out the reconnect backoff (at most RECONNECT_MAX); the timeout
        is the attempt's own. A non-blocking one (an event loop's) fails until the backoff has passed.
        """
        if not self._connect_when_due(c.RECONNECT_MAX if timeout > 0 else 0.0):
            return False
        if self._poller_sent is not None:
            self._poller_sent.add(self)  # even a failed send may have processed the command announcing a message
        if timeout > 0 and not self._socket.poll(int(timeout * 1000), zmq.POLLOUT):
            return False  # (without a timeout the non-blocking send below is the same test, one call cheaper)
        try:
            send_frames(self._socket, frames, NOBLOCK)
        except zmq.Again:
            return False
        return True

    def notify(self, service: str, message: Message) -> bool:
        """Send a request whose reply nobody waits for (it is discarded when it comes); False if unsent.

        For reports that later messages repeat anyway (a receipt that the next
        heartbeat also carries), so that the sender never blocks on a busy service.
        """
        frames = [c.CLIENT, c.REQUEST, service.encode(), NOTIFY_ID, codec.encode(message)]
        return self._send(frames, 0.0)

    def request_many(
        self, requests: list[tuple[str, Message]], *, timeout: float | None = None
    ) -> list[Message | errors.BusError]:
        """Send several requests at once and collect what answers within *timeout* (no retries)."""
        timeout = self.timeout if timeout is None else timeout
        ids = []
        for service, message in requests:
            request_id = os.urandom(8)
            ids.append(request_id)
            self._send([c.CLIENT, c.REQUEST, service.encode(), request_id, codec.encode(message)], timeout)
        replies = self._await(set(ids), timeout)
        results: list[Message | errors.BusError] = []
        for (service, _), request_id in zip(requests, ids, strict=True):
            if request_id not in replies:
                results.append(BusTimeout(f"no reply from service {service!r} within {timeout:.1f}s"))
                continue
            try:
                results.append(self._unwrap(replies[request_id]))
            except errors.BusError as exc:
                results.append(exc)
        return results

    def _unwrap(self, body: bytes, expect: type[T] | None = None) -> Message:
        try:
            reply = codec.decode(body)
        except DecodeError as exc:
            raise RemoteError(exc.code, f"undecodable reply: {exc.message}") from None
        if isinstance(reply, Error):
            raise RemoteError(reply.code, reply.message)
        self.backoff.reset()  # a service answered: this connection works (an error reply does not say so)
        if expect is not None and not isinstance(reply, expect):
            raise RemoteError(errors.INVALID, f"expected {expect.KIND} in reply, got {reply.KIND}")
        return reply

    def _await(self, wanted: set[bytes], timeout: float) -> dict[bytes, bytes]:
        """Receive until every id in *wanted* has a reply or *timeout* passes."""
        found: dict[bytes, bytes] = {}
        deadline = time.monotonic() + timeout
        while len(found) < len(wanted):
            left = deadline - time.monotonic()
            if left <= 0 or not self._socket.poll(int(left * 1000) + 1, zmq.POLLIN):
                break
            frames = recv_frames(self._socket)
            self._sort(frames, wanted, found)
        return found

    def _sort(self, frames: list[bytes], wanted: set[bytes], found: dict[bytes, bytes]) -> None:
        if frames == [b""]:
            return  # connection probe from the broker
        if len(frames) == 5 and frames[0] == c.CLIENT and frames[1] == c.REPLY:
            if frames[3] == NOTIFY_ID:
                self.counters["notify_replies"] += 1
            elif frames[3] in wanted:
                found[frames[3]] = frames[4]
            else:
                self.counters["stale_replies"] += 1
        elif len(frames) == 4 and frames[0] == c.CLIENT and frames[1] == c.PUSH:
            self._keep_push(frames[2].decode("utf-8", "replace"), frames[3])
        elif len(frames) == 2 and frames[0] == c.CLIENT and frames[1] == c.HEARTBEAT:
            self.counters["heartbeats"] += 1
            self.backoff.reset()
        else:
            self.counters["malformed"] += 1
            log.warning("malformed message of %d frames from broker dropped", len(frames))

    # ------------------------------------------------------------------ pushes
    def _keep_push(self, service: str, body: bytes) -> None:
        self.backoff.reset()
        try:
            self.pushes.append((service, codec.decode(body)))
        except DecodeError as exc:
            self.counters["malformed_pushes"] += 1
            log.warning("push from %s dropped: %s", service, exc)

    def next_push(self, timeout: float) -> tuple[str, Message] | None:
        """The oldest push received, waiting up to *timeout* seconds for one."""
        deadline = time.monotonic() + timeout
        self._connect_when_due(0.0)
        while not self.pushes:
            left = max(0.0, deadline - time.monotonic())  # a zero timeout still reads what is waiting
            if not self._socket.poll(int(left * 1000), zmq.POLLIN):
                return None
            self._sort(recv_frames(self._socket), set(), {})
        return self.pushes.popleft()

    def heartbeat(self, timeout: float = c.REQUEST_TIMEOUT) -> bool:
        """Send a heartbeat and wait for the broker's; True if it answered in time."""
        before = self.counters["heartbeats"]
        if not self._send([c.CLIENT, c.HEARTBEAT], timeout):
            return False
        deadline = time.monotonic() + timeout
        while self.counters["heartbeats"] == before:
            left = deadline - time.monotonic()
            if left <= 0 or not self._socket.poll(int(left * 1000) + 1, zmq.POLLIN):
                return False
            self._sort(recv_frames(self._socket), set(), {})
        return True

    # ------------------------------------------------------------------ event-loop use (many clients per thread)
    def start(self, service: str, message: Message) -> bytes | None:
        """Send a request without waiting; its reply comes from :meth:`incoming`. None if it could not be sent.

        No retries here: an event loop that owns many clients decides itself when to give up and resend.
        """
        request_id = os.urandom(8)
        if not self._send([c.CLIENT, c.REQUEST, service.encode(), request_id, codec.encode(message)], 0.0):
            return None
        self._started.add(request_id)
        return request_id

    def incoming(self) -> Iterator[Incoming]:
        """Every reply to a started request and every push waiting now, without blocking."""
        self._connect_when_due(0.0)
        while True:
            try:
                frames = recv_frames(self._socket, NOBLOCK)
            except zmq.Again:
                return
            found: dict[bytes, bytes] = {}
            self._sort(frames, self._started, found)
            for request_id, body in found.items():
                self._started.discard(request_id)
                try:
                    yield Incoming(request_id, frames[2].decode("utf-8", "replace"), self._unwrap(body))
                except RemoteError as exc:
                    yield Incoming(request_id, frames[2].decode("utf-8", "replace"), None, exc)
            while self.pushes:
                service, message = self.pushes.popleft()
                yield Incoming(b"", service, message)
