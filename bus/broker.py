"""The broker: Coterie's single front door, after the ZeroMQ Guide's Majordomo.

One CURVE ROUTER socket serves clients (operators, node agents) and workers
(the services) alike; the signature frame tells them apart (bus.constants).

Request path, in order:
  1. ZAP admits the connection (bus.zap); every frame carries its User-Id.
  2. The User-Id (a public key) is looked up again in the key registry, so a
     revoked key loses its rights on a live connection.
  3. The service must be known, and must allow the caller's role.
  4. The request joins its lane: the service's workers that registered for
     its message kind (the fanout's heartbeats), else the service's general
     workers. It waits there (up to SERVICE_WAIT) for a free slot; a worker
     has as many slots as the capacity it registered with, used least
     recently used first.
  5. The worker's reply goes back to the client's current connection.

Heartbeats run both ways with workers; any message is a sign of life, and a
stall of the broker's own loop does not count against them. A silent worker
is dropped, and the requests it held are answered with a retriable
``worker_lost`` error. Pushes
from workers to a node are routed by the node's key; when the node is not
connected they wait in a bounded per-node outbox until it reconnects.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace

import zmq

from bus import codec, errors
from bus import constants as c
from bus.errors import DecodeError
from bus.frames import NOBLOCK, recv_message, send_frames
from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.messages import Message
from bus.messages.common import (
    BrokerHealth,
    Error,
    Health,
    HealthRequest,
    Ping,
    Pong,
    ServiceEntry,
    WorkerReady,
)
from bus.registry import KeyRegistry
from bus.sockets import curve_server_socket, new_context
from bus.zap import ZapHandler

log = logging.getLogger(__name__)

VERSION = "0.1.0"
BROKER_ALLOW = (Role.OPERATOR, Role.SERVICE)


@dataclass
class PendingRequest:
    client: bytes  # routing id of the client connection
    request_id: bytes
    caller: Identity
    body: bytes
    deadline: float
    address: str = ""  # the client's IP address (Peer-Address), passed on for rate limits and the audit


@dataclass
class WorkerRecord:
    routing_id: bytes
    service: str
    pid: int
    expires: float
    lane: str = ""
    capacity: int = 1
    busy: list[PendingRequest] = field(default_factory=list)  # handed to the worker, not answered yet


@dataclass
class Lane:
    """Workers of one service that serve the same message kinds, and the requests waiting for them."""

    idle: deque[bytes] = field(default_factory=deque)  # one entry per free slot of a worker
    requests: deque[PendingRequest] = field(default_factory=deque)
    workers: set[bytes] = field(default_factory=set)


#: The lane of a service's general workers (those that registered no kinds).
GENERAL = ""


@dataclass
class ServiceRecord:
    name: str
    allow: frozenset[Role]
    lanes: dict[str, Lane] = field(default_factory=lambda: {GENERAL: Lane()})
    routes: dict[str, str] = field(default_factory=dict)  # message kind -> lane name

    def lane_for(self, body: bytes) -> Lane:
        """The lane a request goes to: its kind's own workers while any are registered, else the general ones."""
        if self.routes:
            name = self.routes.get(codec.peek_kind(body) or "", GENERAL)
            lane = self.lanes.get(name)
            if lane is not None and lane.workers:
                return lane
        return self.lanes[GENERAL]


class Broker:
    """Routes requests, replies and pushes; run it with :meth:`run` in one thread."""

    def __init__(
        self,
        keypair: KeyPair,
        registry: KeyRegistry,
        endpoint: str,
        *,
        allow_anonymous: bool = True,
        context: zmq.Context | None = None,
    ) -> None:
        self.context = context or new_context()
        self.registry = registry
        self.zap = ZapHandler(self.context, registry, allow_anonymous=allow_anonymous)
        self.socket = curve_server_socket(self.context, keypair, self.zap, endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.counters: Counter[str] = Counter()
        self.started = time.monotonic()
        self.services: dict[str, ServiceRecord] = {}
        self.workers: dict[bytes, WorkerRecord] = {}
        self.clients: dict[str, bytes] = {}  # client key -> current routing id
        self.outbox: OrderedDict[str, deque[list[bytes]]] = OrderedDict()
        self._stop = threading.Event()
        self._next_heartbeat = 0.0
        self._backlog = False  # the last drain stopped at its bound: signs of life may still be unread
        self._last_loop = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        log.info("broker started on %s (pid %d)", self.endpoint, os.getpid())
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.zap.socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(100))
                if self.zap.socket in ready:
                    self.zap.handle_pending()
                self._backlog = False
                if self.socket in ready:
                    self._drain()
                now = time.monotonic()
                self._forgive_stall(now)
                self._tick(now)
        finally:
            self.close()
            log.info("broker stopped")

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from any thread or a signal handler)."""
        self._stop.set()

    def close(self) -> None:
        self.socket.close(linger=0)
        self.zap.close()

    # ------------------------------------------------------------------ receiving
    def _drain(self) -> None:
        for _ in range(1000):  # bounded, so heartbeats and ZAP are never starved
            try:
                first, frames = recv_message(self.socket, NOBLOCK)
            except zmq.Again:
                return
            self._on_message(first.bytes, first.get("User-Id"), frames, first)
        self._backlog = True

    def _forgive_stall(self, now: float) -> None:
        """Time this loop did not run (the process starved of CPU) is not the workers' silence: extend them."""
        stalled = now - self._last_loop - c.HEARTBEAT_INTERVAL
        self._last_loop = now
        if stalled > 0:
            self.counters["stalls"] += 1
            for worker in self.workers.values():
                worker.expires += stalled

    def _on_message(self, routing_id: bytes, key: str, frames: list[bytes], meta: zmq.Frame | None = None) -> None:
        identity = self.registry.lookup(key) or Identity.anonymous(key)
        if meta is not None and len(frames) >= 2 and frames[1] == c.REQUEST:  # only requests carry the address
            address = _peer_address(meta)
            if address:
                identity = replace(identity, address=address)
        self._learn_client(key, routing_id)
        if frames == [b""]:
            return  # connection probe
        header = frames[0]
        if header == c.CLIENT and len(frames) >= 2:
            self._on_client(routing_id, identity, frames[1], frames[2:])
        elif header == c.WORKER and len(frames) >= 2:
            self._on_worker(routing_id, identity, frames[1], frames[2:])
        else:
            self.counters["malformed"] += 1
            log.warning("malformed message of %d frames from %s dropped", len(frames), identity.caller)
            self._reply_error(routing_id, b"", b"", errors.MALFORMED, "unknown protocol header")

    # ------------------------------------------------------------------ clients
    def _on_client(self, rid: bytes, who: Identity, command: bytes, rest: list[bytes]) -> None:
        if command == c.HEARTBEAT:
            self._send([rid, c.CLIENT, c.HEARTBEAT])
            return
        if command != c.REQUEST or len(rest) != 3:
            self.counters["malformed"] += 1
            request_id = rest[1] if len(rest) >= 2 else b""
            self._reply_error(rid, b"", request_id, errors.MALFORMED, "expected REQUEST service id body")
            return
        service_raw, request_id, body = rest
        self.counters["requests"] += 1
        service = service_raw.decode("utf-8", "replace")
        if len(body) > c.MAX_BODY:
            self.counters["too_large"] += 1
            self._reply_error(rid, service_raw, request_id, errors.TOO_LARGE, f"body exceeds {c.MAX_BODY} bytes")
            return
        if service == c.BROKER_SERVICE:
            self._serve_broker(rid, who, request_id, body)
            return
        record = self.services.get(service)
        if record is None:
            self.counters["unknown_service"] += 1
            self._reply_error(rid, service_raw, request_id, errors.UNKNOWN_SERVICE, f"no service named {service!r}")
            return
        if who.role not in record.allow:
            self._refuse(rid, who, service_raw, request_id)
            return
        deadline = time.monotonic() + c.SERVICE_WAIT
        lane = record.lane_for(body)
        lane.requests.append(PendingRequest(rid, request_id, who, body, deadline, who.address))
        self._dispatch(lane)

    def _refuse(self, rid: bytes, who: Identity, service: bytes, request_id: bytes) -> None:
        self.counters["forbidden"] += 1
        log.warning("refused: %s may not call %s", who.caller, service.decode("utf-8", "replace"))
        self._reply_error(rid, service, request_id, errors.FORBIDDEN, "not allowed to call this service")

    def _serve_broker(self, rid: bytes, who: Identity, request_id: bytes, body: bytes) -> None:
        service = c.BROKER_SERVICE.encode()
        if who.role not in BROKER_ALLOW:
            self._refuse(rid, who, service, request_id)
            return
        try:
            message = codec.decode(body)
        except DecodeError as exc:
            self.counters[exc.code] += 1
            self._reply_error(rid, service, request_id, exc.code, exc.message)
            return
        reply: Message
        if isinstance(message, HealthRequest):
            reply = self.health()
        elif isinstance(message, Ping):
            reply = Pong(payload=message.payload, service=c.BROKER_SERVICE)
        else:
            self._reply_error(
                rid, service, request_id, errors.UNSUPPORTED_REQUEST, f"broker does not serve {message.KIND}"
            )
            return
        self._send([rid, c.CLIENT, c.REPLY, service, request_id, codec.encode(reply)])

    def health(self) -> BrokerHealth:
        entries = [
            ServiceEntry(
                name=s.name,
                workers=sum(1 for w in self.workers.values() if w.service == s.name),
                pids=sorted(w.pid for w in self.workers.values() if w.service == s.name),
                allow=sorted(s.allow),
            )
            for s in self.services.values()
        ]
        counters = dict(self.counters) | {f"zap_{k}": v for k, v in self.zap.counters.items()}
        return BrokerHealth(
            health=Health(
                service=c.BROKER_SERVICE,
                version=VERSION,
                pid=os.getpid(),
                uptime=time.monotonic() - self.started,
                counters=counters,
            ),
            services=entries,
        )

    def _learn_client(self, key: str, rid: bytes) -> None:
        if self.clients.get(key) == rid:
            return
        self.clients[key] = rid
        queued = self.outbox.pop(key, None)
        while queued:
            self._deliver(key, queued.popleft())

    # ------------------------------------------------------------------ workers
    def _on_worker(self, rid: bytes, who: Identity, command: bytes, rest: list[bytes]) -> None:
        if who.role is not Role.SERVICE:
            self._refuse(rid, who, b"(worker)", b"")
            return
        worker = self.workers.get(rid)
        if command == c.READY and len(rest) == 1 and worker is None:
            self._on_ready(rid, who, rest[0])
            return
        if worker is None:
            # Unknown worker (expired while stopped, say): tell it to register anew.
            self._send([rid, c.WORKER, c.DISCONNECT])
            return
        worker.expires = time.monotonic() + c.HEARTBEAT_INTERVAL * c.HEARTBEAT_LIVENESS  # any message is life
        if command == c.HEARTBEAT:
            return
        if command == c.REPLY and len(rest) == 3:
            self._on_reply(worker, *rest)
        elif command == c.PUSH and rest and len(rest) % 2 == 0:
            for i in range(0, len(rest), 2):
                self._push(rest[i].decode("ascii", "replace"), worker.service, rest[i + 1])
        elif command == c.DISCONNECT:
            self._drop_worker(worker, "disconnected")
        else:
            self.counters["malformed"] += 1
            log.warning("malformed worker message from %s dropped; dropping the worker", who.caller)
            self._send([rid, c.WORKER, c.DISCONNECT])
            self._drop_worker(worker, "protocol error")

    def _on_ready(self, rid: bytes, who: Identity, body: bytes) -> None:
        try:
            ready = codec.decode(body, WorkerReady)
        except DecodeError as exc:
            log.warning("bad READY from %s: %s", who.caller, exc)
            self._send([rid, c.WORKER, c.DISCONNECT])
            return
        assert isinstance(ready, WorkerReady)
        if ready.service != who.name:
            log.warning("refused: %s tried to register as service %s", who.caller, ready.service)
            self.counters["forbidden"] += 1
            self._send([rid, c.WORKER, c.DISCONNECT])
            return
        record = self.services.get(ready.service)
        if record is None:
            record = self.services[ready.service] = ServiceRecord(ready.service, frozenset(ready.allow))
        record.allow = frozenset(ready.allow)
        name = ",".join(sorted(set(ready.kinds)))
        lane = record.lanes.setdefault(name, Lane())
        for kind in ready.kinds:
            record.routes[kind] = name
        expires = time.monotonic() + c.HEARTBEAT_INTERVAL * c.HEARTBEAT_LIVENESS
        self.workers[rid] = WorkerRecord(rid, ready.service, ready.pid, expires, name, ready.capacity)
        lane.workers.add(rid)
        lane.idle.extend([rid] * ready.capacity)
        log.info(
            "worker of %s registered (pid %d, version %s%s, capacity %d)",
            ready.service,
            ready.pid,
            ready.version,
            f", kinds {name}" if name else "",
            ready.capacity,
        )
        if name != GENERAL:  # requests of these kinds that waited for the general workers are now this lane's
            self._move_requests(record, record.lanes[GENERAL], lane)
        self._dispatch(lane)

    def _on_reply(self, worker: WorkerRecord, client: bytes, request_id: bytes, body: bytes) -> None:
        pending = next((p for p in worker.busy if p.request_id == request_id and p.client == client), None)
        if pending is None:
            self.counters["stray_replies"] += 1
            return
        worker.busy.remove(pending)
        self.counters["replies"] += 1
        if request_id != c.NOTIFY_ID:  # nobody waits for a notification's reply: do not send it
            self._send([client, c.CLIENT, c.REPLY, worker.service.encode(), request_id, body])
        lane = self.services[worker.service].lanes[worker.lane]
        lane.idle.append(worker.routing_id)
        self._dispatch(lane)

    def _move_requests(self, record: ServiceRecord, source: Lane, target: Lane) -> None:
        """Hand the requests in *source* that belong to *target* (by the service's routes) over to it."""
        if not source.requests:
            return
        kept: deque[PendingRequest] = deque()
        for request in source.requests:
            (target.requests if record.lane_for(request.body) is target else kept).append(request)
        source.requests = kept

    def _dispatch(self, lane: Lane) -> None:
        while lane.idle and lane.requests:
            rid = lane.idle.popleft()
            worker = self.workers.get(rid)
            if worker is None:
                continue
            request = lane.requests.popleft()
            frames = [
                rid,
                c.WORKER,
                c.REQUEST,
                request.client,
                request.request_id,
                request.caller.wire.encode(),
                request.body,
                request.address.encode(),
            ]
            if self._send(frames):
                worker.busy.append(request)
            else:
                lane.requests.appendleft(request)
                self._drop_worker(worker, "unreachable")

    def _drop_worker(self, worker: WorkerRecord, why: str) -> None:
        rid = worker.routing_id
        self.workers.pop(rid, None)
        record = self.services.get(worker.service)
        if record is not None:
            lane = record.lanes[worker.lane]
            lane.workers.discard(rid)
            lane.idle = deque(r for r in lane.idle if r != rid)
            if worker.lane != GENERAL and not lane.workers:  # its kinds fall back to the general workers
                general = record.lanes[GENERAL]
                general.requests.extend(lane.requests)
                lane.requests.clear()
                self._dispatch(general)
        log.warning("worker of %s (pid %d) dropped: %s", worker.service, worker.pid, why)
        self.counters["workers_dropped"] += 1
        for pending in worker.busy:
            self._reply_error(
                pending.client,
                worker.service.encode(),
                pending.request_id,
                errors.WORKER_LOST,
                f"the {worker.service} worker was lost; retry",
            )
        worker.busy = []

    # ------------------------------------------------------------------ pushes
    def _push(self, key: str, service: str, body: bytes) -> None:
        self.counters["pushes"] += 1
        self._deliver(key, [c.CLIENT, c.PUSH, service.encode(), body])

    def _deliver(self, key: str, frames: list[bytes]) -> None:
        rid = self.clients.get(key)
        if rid is not None and self._send([rid, *frames]):
            return
        # EHOSTUNREACH (ROUTER_MANDATORY) or never connected: keep it for later.
        self.clients.pop(key, None)
        self.counters["push_unroutable"] += 1
        queue = self.outbox.setdefault(key, deque())
        if len(queue) >= c.OUTBOX_LIMIT:
            queue.popleft()
            self.counters["push_dropped"] += 1
        queue.append(frames)

    # ------------------------------------------------------------------ timers
    def _tick(self, now: float) -> None:
        for record in self.services.values():
            for lane in record.lanes.values():
                while lane.requests and lane.requests[0].deadline <= now:
                    pending = lane.requests.popleft()
                    self.counters["service_unavailable"] += 1
                    self._reply_error(
                        pending.client,
                        record.name.encode(),
                        pending.request_id,
                        errors.SERVICE_UNAVAILABLE,
                        f"no {record.name} worker is available",
                    )
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + c.HEARTBEAT_INTERVAL
        for worker in list(self.workers.values()):
            if worker.expires <= now and not self._backlog:  # unread messages may hold its sign of life
                self._drop_worker(worker, "heartbeat expired")
            elif not self._send([worker.routing_id, c.WORKER, c.HEARTBEAT]):
                self._drop_worker(worker, "unreachable")

    # ------------------------------------------------------------------ sending
    def _send(self, frames: list[bytes]) -> bool:
        """Send without blocking; False when the peer is gone or its queue is full."""
        try:
            send_frames(self.socket, frames, NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            self.counters["unroutable"] += 1
            return False

    def _reply_error(self, rid: bytes, service: bytes, request_id: bytes, code: str, text: str) -> None:
        body = codec.encode(Error(code=code, message=text))
        self._send([rid, c.CLIENT, c.REPLY, service, request_id, body])


def _peer_address(frame: zmq.Frame) -> str:
    """The sender's IP address (libzmq's Peer-Address property; empty for transports without one)."""
    try:
        return str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return ""
