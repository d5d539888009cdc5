"""The TUI's link to the server: one bus connection, owned by one thread, talking to the App by messages.

The bus Client blocks and is not thread-safe, so it lives in this thread
alone. The loop, in order, every turn:
  1. run the requests the UI submitted (each answered by a Reply message);
  2. read pushed ChangeNotices; a notice marks the state stale;
  3. re-read the state when stale, at most every RELOAD_GAP seconds, so a
     burst of changes costs one read;
  4. heartbeat the broker every HEARTBEAT seconds (it also keeps the broker's
     route for pushes pointing at this connection) and renew the watch
     lease every RENEW seconds; the lease reply's head reveals lost notices.
A silent broker (HEARTBEAT_MISSES missed heartbeats) or a failed read means
the link is down: it says so (LinkDown), backs off and retries, and when
the server answers again it subscribes first, then reads the state (the
Guide's Clone order), then says LinkUp.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from textual.message import Message as UiMessage

from bus.client import Client
from bus.errors import BusError, BusTimeout, RemoteError
from bus.messages import Message
from bus.messages.events import WATCH_LEASE, ChangeNotice, WatchLease, WatchRequest
from tui.app.messages import LinkDown, LinkUp, Reply, StateLoaded
from tui.app.state import load_state
from tui.client import ServerAddress, connect

log = logging.getLogger(__name__)

RENEW = WATCH_LEASE / 3  # seconds between lease renewals (10 s)
HEARTBEAT = 1.0
HEARTBEAT_MISSES = 2
RELOAD_GAP = 0.5  # a burst of changes (hundreds of agents coming online) costs two reads a second at most
BACKOFF = (0.5, 1.0, 2.0, 4.0, 5.0)  # seconds between reconnection attempts; the last repeats
REQUEST_TIMEOUT = 5.0


class LinkLost(Exception):
    """The server stopped answering."""


class ServerLink:
    """Runs the bus client in a thread; ``post`` receives the Textual messages (thread-safe)."""

    def __init__(self, address: ServerAddress, post: Callable[[UiMessage], object]) -> None:
        self.address = address
        self.post = post
        self.jobs: queue.SimpleQueue[tuple[str, Message, Callable[[Any], None]]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._stale = threading.Event()
        self.head = 0
        self.thread = threading.Thread(target=self.run, name="tui-link", daemon=True)

    # ------------------------------------------------------------------ from the UI thread
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def submit(self, message: Message, callback: Callable[[Any], None], service: str = "datastore") -> None:
        """Send *message*; *callback* later gets the reply or the BusError, on the UI thread."""
        self.jobs.put((service, message, callback))

    def refresh(self) -> None:
        """Re-read the state soon (after a mutation, in case its notice is lost)."""
        self._stale.set()

    # ------------------------------------------------------------------ the link's thread
    def run(self) -> None:
        attempt = 0
        client: Client | None = None
        while not self._stop.is_set():
            try:
                if client is None:
                    client = connect(self.address, timeout=2.0, retries=0)
                self._subscribe_and_load(client)
                self.post(LinkUp(self.address.endpoint))
                attempt = 0
                self._serve(client)
            except (BusError, LinkLost) as exc:
                delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
                attempt += 1
                log.info("server link down: %s; retrying in %.1fs", exc, delay)
                self.post(LinkDown(_reason(exc), delay))
                self._fail_jobs(exc)
                self._stop.wait(delay)
                if client is not None:
                    client.reconnect()
        if client is not None:
            self._unwatch(client)
            client.close()

    def _subscribe_and_load(self, client: Client) -> None:
        lease = client.request("fanout", WatchRequest(), expect=WatchLease)
        assert isinstance(lease, WatchLease)
        self._load(client)

    def _load(self, client: Client) -> None:
        self._stale.clear()
        state = load_state(client)
        self.head = state.head
        log.debug("state read at r%d", state.head)
        self.post(StateLoaded(state))

    def _serve(self, client: Client) -> None:
        now = time.monotonic()
        next_beat, next_renew, next_load, misses = now + HEARTBEAT, now + RENEW, now, 0
        while not self._stop.is_set():
            self._run_jobs(client)
            self._read_pushes(client, wait=0.05)
            now = time.monotonic()
            if self._stale.is_set() and now >= next_load:
                self._load(client)
                next_load = now + RELOAD_GAP
            if now >= next_beat:
                next_beat = now + HEARTBEAT
                misses = 0 if client.heartbeat(timeout=1.5) else misses + 1
                if misses >= HEARTBEAT_MISSES:
                    raise LinkLost("the server does not answer heartbeats")
            if now >= next_renew:
                next_renew = now + RENEW
                lease = client.request("fanout", WatchRequest(), expect=WatchLease)
                assert isinstance(lease, WatchLease)
                log.debug("lease renewed: head r%d, holding r%d", lease.head, self.head)
                if lease.head > self.head:
                    self._stale.set()  # a notice was lost on the way

    def _read_pushes(self, client: Client, wait: float) -> None:
        for _ in range(100):  # bounded: requests and heartbeats are never starved
            push = client.next_push(wait)
            wait = 0.0
            if push is None:
                return
            _, message = push
            if isinstance(message, ChangeNotice):
                log.debug("notice r%d..r%d (holding r%d)", message.prev_revision, message.revision, self.head)
                if message.revision > self.head:
                    self._stale.set()

    def _run_jobs(self, client: Client) -> None:
        for _ in range(100):
            try:
                service, message, callback = self.jobs.get_nowait()
            except queue.Empty:
                return
            try:
                result: Any = client.request(service, message, timeout=REQUEST_TIMEOUT, retries=1)
            except RemoteError as exc:
                result = exc
            except BusError as exc:
                self.post(Reply(callback, exc))
                raise LinkLost(str(exc)) from None
            self.post(Reply(callback, result))
            self._stale.set()

    def _fail_jobs(self, exc: Exception) -> None:
        """Requests queued while the server is away are answered at once, not sent later by surprise."""
        while True:
            try:
                _, _, callback = self.jobs.get_nowait()
            except queue.Empty:
                return
            self.post(Reply(callback, BusTimeout(f"server unreachable: {_reason(exc)}")))

    def _unwatch(self, client: Client) -> None:
        with contextlib.suppress(BusError):  # if unanswered, the lease lapses by itself
            client.request("fanout", WatchRequest(stop=True), timeout=0.5, retries=0)


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 120 else text[:117] + "..."
