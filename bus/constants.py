"""Wire constants of the Coterie bus, written down once.

Every multipart message starts with a protocol signature frame and a one-byte
command frame; the signature names the side that speaks (client or worker)
and the protocol version, after the ZeroMQ Guide's Majordomo (MDP/0.2).

Client <-> broker (a DEALER connected to the broker's ROUTER)::

    client -> broker  REQUEST    [CLIENT, REQUEST, service, request_id, body]
    client -> broker  HEARTBEAT  [CLIENT, HEARTBEAT]
    broker -> client  REPLY      [CLIENT, REPLY, service, request_id, body]
    broker -> client  PUSH       [CLIENT, PUSH, service, body]
    broker -> client  HEARTBEAT  [CLIENT, HEARTBEAT]

Worker <-> broker (a DEALER connected to the same ROUTER)::

    worker -> broker  READY      [WORKER, READY, body(WorkerReady)]
    worker -> broker  REPLY      [WORKER, REPLY, client_id, request_id, body]
    worker -> broker  PUSH       [WORKER, PUSH, target_key_z85, body, (target_key_z85, body)...]
    worker -> broker  HEARTBEAT  [WORKER, HEARTBEAT]
    worker -> broker  DISCONNECT [WORKER, DISCONNECT]
    broker -> worker  REQUEST    [WORKER, REQUEST, client_id, request_id, caller, body, address]
    broker -> worker  HEARTBEAT  [WORKER, HEARTBEAT]
    broker -> worker  DISCONNECT [WORKER, DISCONNECT]

A REQUEST whose request_id is NOTIFY_ID is a notification: the worker answers
it (which frees its slot) but the broker does not forward that reply.
A worker's PUSH may carry several ``target_key_z85, body`` pairs in one
message (a change to all is thousands of pushes: one message per hundred
costs the broker one receive instead of a hundred).

``body`` is one message encoded by :mod:`bus.codec`; ``caller`` is the
authenticated identity of the client as ``role;key;name``; ``address``
the client's IP address as the broker's socket saw it (may be empty). An empty single-frame
message is a connection probe (ZMQ_PROBE_ROUTER) and is never an error.
"""

from __future__ import annotations

import os

CLIENT = b"CTC1"
WORKER = b"CTW1"

REQUEST = b"\x01"
REPLY = b"\x02"
PUSH = b"\x03"
HEARTBEAT = b"\x04"
READY = b"\x05"
DISCONNECT = b"\x06"

COMMAND_NAMES = {
    REQUEST: "REQUEST",
    REPLY: "REPLY",
    PUSH: "PUSH",
    HEARTBEAT: "HEARTBEAT",
    READY: "READY",
    DISCONNECT: "DISCONNECT",
}

#: The ZAP domain every Coterie CURVE server socket uses (libzmq only asks the
#: handler for sockets with a domain set, and ZAP_ENFORCE_DOMAIN makes a
#: missing handler a refusal instead of an open door).
ZAP_DOMAIN = b"coterie"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"

#: The request id of notifications (bus.client.Client.notify): the broker drops their replies.
NOTIFY_ID = b"\x00" * 8

#: The broker's own service: health of the broker and the service directory.
BROKER_SERVICE = "broker"

# Tuning numbers (not spec): seconds unless named otherwise.
HEARTBEAT_INTERVAL = 1.0
# Missed intervals before a broker or worker takes the other for dead. Three (the Guide's figure) was too tight
# here: on the shared 2-core machine (load 20-50) a process went unscheduled for over 3 s several times per
# benchmark run, its peer dropped it, the requests it held came back `worker_lost` and agents reconnected in
# storms. Ten seconds covers those stalls; a hung worker still loses its requests within seconds of a client's
# retry, and a crashed one is noticed at once (its connection closes). Any message counts as a sign of life, and
# the time an observer itself was not running (its own loop stalled) does not count against the other side.
HEARTBEAT_LIVENESS = 10
SERVICE_WAIT = 2.0  # how long a request waits for a worker of a known service
CONNECT_WAIT = 30.0  # how long a worker waits for its handshake with the broker before a new socket
REQUEST_TIMEOUT = 2.5
REQUEST_RETRIES = 3
LISTEN_BACKLOG = 4096  # libzmq's default of 100 makes reconnect storms slow
MAX_FRAME = 16 * 1024 * 1024  # ZMQ_MAXMSGSIZE: larger frames drop the connection
MAX_BODY = 8 * 1024 * 1024  # larger bodies get a `too_large` error reply
MAX_SERVICE_NAME = 64
MAX_WORKER_CAPACITY = 256  # requests one worker may hold at once (WorkerReady.capacity)
# Client reconnects (bus.client.Backoff; libzmq's own TCP reconnect): exponential from the base, capped, with
# jitter, reset once the broker answers. 10,000 agents that lost the server together otherwise come back in the
# same 100 ms and queue their CURVE handshakes behind each other; spread over a few seconds they are each served.
RECONNECT_BASE = 0.5
RECONNECT_MAX = 5.0
OUTBOX_LIMIT = 1000  # pushes kept per disconnected identity
PUSH_BATCH = 100  # pushes per PUSH message from a worker (Worker.push_many)
IO_THREADS = max(1, min(4, os.cpu_count() or 1))
