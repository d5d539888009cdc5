"""Socket construction: the one place where CURVE and socket options are set.

A CURVE server socket is built only together with a running ZAP handler and
is checked after construction: libzmq admits any client that knows the
server's public key when no handler answers, unless ZAP_ENFORCE_DOMAIN is on.
"""

from __future__ import annotations

import zmq

from bus.constants import IO_THREADS, LISTEN_BACKLOG, MAX_FRAME, RECONNECT_MAX, ZAP_DOMAIN
from bus.errors import InsecureSocketError
from bus.keys import KeyPair
from bus.zap import ZapHandler


def new_context(*, io_threads: int = IO_THREADS, max_sockets: int = 0) -> zmq.Context:
    """A context with LINGER 0; *max_sockets* raises libzmq's default cap of 1023 (many simulated agents)."""
    context = zmq.Context(io_threads=io_threads)
    context.setsockopt(zmq.LINGER, 0)
    if max_sockets:
        context.set(zmq.MAX_SOCKETS, max_sockets)
    return context


def curve_server_socket(context: zmq.Context, keypair: KeyPair, zap: ZapHandler | None, endpoint: str) -> zmq.Socket:
    """A ROUTER bound to *endpoint* that admits only clients *zap* approves."""
    if zap is None or zap.context is not context or zap.socket.closed:
        raise InsecureSocketError("refusing to start a CURVE server socket without a ZAP handler")
    sock = context.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_secretkey = keypair.secret
    sock.curve_publickey = keypair.public
    sock.zap_domain = ZAP_DOMAIN
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.PROBE_ROUTER, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
    sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    verify_server_socket(sock)
    sock.bind(endpoint)
    return sock


def verify_server_socket(sock: zmq.Socket) -> None:
    """Raise InsecureSocketError unless *sock* is a CURVE server that enforces ZAP."""
    if sock.getsockopt(zmq.MECHANISM) != zmq.CURVE or not sock.getsockopt(zmq.CURVE_SERVER):
        raise InsecureSocketError("server socket is not a CURVE server")
    if sock.getsockopt(zmq.ZAP_DOMAIN) != ZAP_DOMAIN:
        raise InsecureSocketError("server socket has no ZAP domain: libzmq would skip ZAP")
    if not sock.getsockopt(zmq.ZAP_ENFORCE_DOMAIN):
        raise InsecureSocketError("ZAP_ENFORCE_DOMAIN is off: clients would pass without ZAP")


def curve_client_socket(
    context: zmq.Context, keypair: KeyPair, server_key: bytes, endpoint: str, *, connect: bool = True
) -> zmq.Socket:
    """A DEALER that talks CURVE to the server whose public key is *server_key* (connected unless told not to)."""
    sock = context.socket(zmq.DEALER)
    sock.curve_serverkey = server_key
    sock.curve_publickey = keypair.public
    sock.curve_secretkey = keypair.secret
    sock.linger = 0
    # IMMEDIATE: queue nothing for a connection that is not up, so a retry
    # after reconnect is not preceded by a stale copy. PROBE_ROUTER: announce
    # ourselves at once so the broker can route pushes before we send.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.PROBE_ROUTER, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
    sock.sndtimeo = 1000  # a blocking send to a lost broker fails instead of hanging
    # libzmq's own reconnect after the TCP connection drops (a server restart): doubling from 100 ms up to
    # RECONNECT_MAX, with up to 100 ms of jitter each, so that a crowd of agents comes back spread out.
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(RECONNECT_MAX * 1000))
    if connect:
        sock.connect(endpoint)
    return sock
