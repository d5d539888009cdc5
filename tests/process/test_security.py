"""CURVE and ZAP at the front door (RELIABILITY C1) and authorization per message."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
import zmq
import zmq.utils.monitor

from bus import errors
from bus.broker import Broker
from bus.constants import ZAP_DOMAIN
from bus.errors import BusTimeout, InsecureSocketError, RemoteError
from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.messages.common import HealthRequest, Ping, Pong
from bus.registry import MemoryKeyRegistry
from bus.sockets import curve_server_socket, new_context, verify_server_socket
from bus.worker import Worker
from bus.zap import ZapHandler
from tests.conftest import BusHarness


def _protected(bus: BusHarness) -> Worker:
    worker = bus.thread_worker("vault")
    assert bus.wait_workers("vault", 1)
    return worker


def test_unknown_key_gets_nothing_from_a_protected_service(bus: BusHarness, caplog: pytest.LogCaptureFixture) -> None:
    worker = _protected(bus)
    caplog.set_level(logging.WARNING)
    stranger = bus.client(KeyPair.generate(), retries=0)
    with pytest.raises(RemoteError) as info:
        stranger.request("vault", Ping())
    assert info.value.code == errors.FORBIDDEN
    assert worker.counters["requests"] == 0, "the request reached the service"
    assert any("refused" in r.getMessage() and "vault" in r.getMessage() for r in caplog.records)


def test_closed_server_refuses_unknown_keys_at_the_handshake(
    closed_bus: BusHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    worker = _protected(closed_bus)
    stranger = closed_bus.client(KeyPair.generate(), timeout=0.5, retries=1)
    with pytest.raises(BusTimeout):
        stranger.request("vault", Ping())
    assert _handshake_failure(closed_bus, KeyPair.generate()) == 400
    assert worker.counters["requests"] == 0
    assert closed_bus.broker is not None and closed_bus.broker.zap.counters["refused"] >= 1
    assert any("refused connection" in r.getMessage() for r in caplog.records)
    # The operator, whose key is known, is still served.
    assert isinstance(closed_bus.client().request("vault", Ping()), Pong)


def _handshake_failure(bus: BusHarness, keypair: KeyPair) -> int | None:
    """Connect with *keypair* and return the ZAP status of a failed handshake, if one is reported."""
    context = zmq.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
            bus.server.public,
            keypair.public,
            keypair.secret,
        )
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sock.connect(bus.endpoint)
        if not monitor.poll(3000):
            return None
        event = zmq.utils.monitor.recv_monitor_message(monitor)
        return event["value"] if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH else 200
    finally:
        context.destroy(linger=0)


def test_wrong_server_key_cannot_connect(bus: BusHarness) -> None:
    _protected(bus)
    impostor_view = KeyPair.generate().public
    client = bus.client(server_key=impostor_view, timeout=0.5, retries=1)
    with pytest.raises(BusTimeout, match="public key"):
        client.request("vault", Ping())


def test_anonymous_callers_reach_only_anonymous_services(bus: BusHarness) -> None:
    bus.thread_worker("login", anonymous=True)
    vault = _protected(bus)
    assert bus.wait_workers("login", 1)
    stranger = bus.client(KeyPair.generate(), retries=0)
    assert stranger.request("login", Ping(payload=b"hi")) == Pong(payload=b"hi", service="login")
    for service in ("vault", "broker"):
        with pytest.raises(RemoteError) as info:
            stranger.request(service, HealthRequest())
        assert info.value.code == errors.FORBIDDEN
    assert vault.counters["requests"] == 0


def test_roles_are_enforced_per_service(bus: BusHarness) -> None:
    vault = bus.thread_worker("vault")  # allows operator, service, node
    assert bus.wait_workers("vault", 1)
    node = KeyPair.generate()
    bus.registry.add(Identity(Role.NODE, "n1", node.public_text))
    client = bus.client(node, retries=0)
    assert isinstance(client.request("vault", Ping()), Pong)
    with pytest.raises(RemoteError) as info:
        client.request("broker", HealthRequest())  # operators and services only
    assert info.value.code == errors.FORBIDDEN
    assert vault.counters["requests"] == 1


def test_revoked_key_loses_its_rights_on_a_live_connection(bus: BusHarness) -> None:
    _protected(bus)
    node = KeyPair.generate()
    bus.registry.add(Identity(Role.NODE, "n1", node.public_text))
    client = bus.client(node, retries=0)
    assert isinstance(client.request("vault", Ping()), Pong)
    bus.registry.remove(node.public_text)
    with pytest.raises(RemoteError) as info:
        client.request("vault", Ping())
    assert info.value.code == errors.FORBIDDEN


def test_a_service_key_cannot_register_as_another_service(bus: BusHarness) -> None:
    impostor = type(bus.thread_worker("vault"))  # same class, registers as "vault"
    assert bus.wait_workers("vault", 1)
    worker = impostor(bus.endpoint, bus.service_key("other"), bus.server.public)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        assert bus.broker is not None
        assert sum(1 for w in list(bus.broker.workers.values()) if w.service == "vault") == 1
        assert bus.broker.counters["forbidden"] >= 1
    finally:
        worker.stop()
        thread.join(timeout=5)


def test_null_mechanism_client_is_never_delivered_nor_asks_zap(bus: BusHarness) -> None:
    worker = _protected(bus)
    assert bus.broker is not None
    zap_before = sum(bus.broker.zap.counters.values())
    context = zmq.Context()
    try:
        plain = context.socket(zmq.DEALER)
        plain.linger = 0
        plain.connect(bus.endpoint)
        plain.send_multipart([b"CTC1", b"\x01", b"vault", b"12345678", b"x"], zmq.NOBLOCK)
        assert not plain.poll(500, zmq.POLLIN)
    except zmq.Again:
        pass  # never even connected: also a pass
    finally:
        context.destroy(linger=0)
    assert worker.counters["requests"] == 0
    assert sum(bus.broker.zap.counters.values()) == zap_before
    assert isinstance(bus.client().request("vault", Ping()), Pong)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x01\x00" + b"sneaky",  # ZMTP/1.0 short frame
        b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL" + b"\x00" * 16 + b"\x00" * 32,  # greeting, NULL
        b"GET / HTTP/1.1\r\n\r\n",
        # ZMTP 3.0 greeting announcing CURVE, then a HELLO command of garbage.
        b"\xff"
        + b"\x00" * 8
        + b"\x7f\x03\x00CURVE"
        + b"\x00" * 15
        + b"\x00" * 32
        + b"\x04\x20\x05HELLO"
        + b"\x00" * 26,
        bytes(range(256)) * 4,
    ],
)
def test_raw_bytes_on_the_port_are_not_delivered(bus: BusHarness, payload: bytes) -> None:
    worker = _protected(bus)
    host, port = bus.endpoint.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as raw:
        raw.sendall(payload)
        raw.settimeout(1.0)
        try:
            while raw.recv(4096):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
    assert worker.counters["requests"] == 0
    assert isinstance(bus.client().request("vault", Ping()), Pong)


def test_curve_server_socket_refuses_to_start_without_zap() -> None:
    context = new_context()
    try:
        with pytest.raises(InsecureSocketError, match="ZAP"):
            curve_server_socket(context, KeyPair.generate(), None, "tcp://127.0.0.1:*")
        other = new_context()
        try:
            foreign = ZapHandler(other, MemoryKeyRegistry(), allow_anonymous=False)
            with pytest.raises(InsecureSocketError):
                curve_server_socket(context, KeyPair.generate(), foreign, "tcp://127.0.0.1:*")
            foreign.close()
        finally:
            other.term()
    finally:
        context.term()


def test_server_socket_without_enforced_zap_is_refused() -> None:
    context = new_context()
    try:
        pair = KeyPair.generate()
        sock = context.socket(zmq.ROUTER)
        sock.curve_server = True
        sock.curve_secretkey = pair.secret
        with pytest.raises(InsecureSocketError, match="ZAP domain"):
            verify_server_socket(sock)
        sock.zap_domain = ZAP_DOMAIN
        with pytest.raises(InsecureSocketError, match="ZAP_ENFORCE_DOMAIN"):
            verify_server_socket(sock)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        verify_server_socket(sock)
        sock.close()
        plain = context.socket(zmq.ROUTER)
        with pytest.raises(InsecureSocketError, match="not a CURVE server"):
            verify_server_socket(plain)
        plain.close()
    finally:
        context.term()


def test_only_one_zap_handler_per_context() -> None:
    context = new_context()
    try:
        broker = Broker(KeyPair.generate(), MemoryKeyRegistry(), "tcp://127.0.0.1:*", context=context)
        with pytest.raises(zmq.ZMQError):
            ZapHandler(context, MemoryKeyRegistry(), allow_anonymous=True)
        broker.close()
    finally:
        context.term()


def test_zap_counts_known_and_anonymous_admissions(bus: BusHarness) -> None:
    bus.thread_worker("login", anonymous=True)
    assert bus.wait_workers("login", 1)
    assert bus.broker is not None
    known_before = bus.broker.zap.counters["admitted"]
    bus.client().request("login", Ping())
    bus.client(KeyPair.generate()).request("login", Ping())
    assert bus.broker.zap.counters["admitted"] == known_before + 1
    assert bus.broker.zap.counters["admitted_anonymous"] == 1
