"""Entry point of each server process: the broker or one service, by name.

Each process loads only what it needs from the configuration directory: the
broker its own key pair and the key registry; a service its own key pair and
the broker's public key. SIGTERM and SIGINT stop it cleanly.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from bus.broker import Broker
from bus.heap import freeze_long_lived
from bus.keys import load_keypair, load_public_key
from bus.messages.services import SERVICE_NAMES
from bus.registry import ChainRegistry, FileKeyRegistry
from bus.signing import load_signing_key
from bus.worker import Worker
from services.auth.service import AuthService
from services.config import ServerConfig, require_key
from services.datastore.db import make_engine
from services.datastore.keyregistry import DatastoreKeyRegistry
from services.datastore.service import DatastoreService
from services.fanout.service import FanoutService
from services.keydist.service import KeydistService
from services.logsetup import setup_logging
from services.relay.service import RelayService

REFLECTOR_PORT_OFFSET = 2  # the reflector answers on port + 2, + 3 (filtering) and + 4 (mapping)

SERVICES: dict[str, type[Worker]] = {
    "auth": AuthService,
    "datastore": DatastoreService,
    "keydist": KeydistService,
    "fanout": FanoutService,
    "relay": RelayService,
}
PROCESS_NAMES = ("broker", *SERVICE_NAMES)
assert set(SERVICES) == set(SERVICE_NAMES)


def build_broker(config: ServerConfig) -> Broker:
    keypair = load_keypair(require_key(config.key_path("server")))
    nodes = DatastoreKeyRegistry(make_engine(config.database_url))
    registry = ChainRegistry(FileKeyRegistry(config.registry_path), nodes)
    return Broker(keypair, registry, config.bind_endpoint, allow_anonymous=config.allow_anonymous)


def build_service(name: str, config: ServerConfig, broker: str | None = None) -> Worker:
    keypair = load_keypair(require_key(config.key_path(name)))
    server_key = load_public_key(require_key(config.public_key_path("server")))
    endpoint = broker or config.connect_endpoint
    signing_key = load_signing_key(config.signing_key_path)
    sign_public = signing_key.verify_key.encode().hex()
    url = config.database_url
    cfg = {"config": config}  # auth loads its proxy realms from it
    # What each service needs beyond its connection to the broker.
    extra: dict[str, dict[str, Any]] = {
        "datastore": {"database_url": url, "join_endpoints": config.join_endpoints, "sign_key": sign_public},
        "auth": {"database_url": url, "sign_key": sign_public, "join_endpoints": config.join_endpoints, **cfg},
        "fanout": {
            "database_url": url,
            "signing_key": signing_key,
            "presence_timeout": config.presence_timeout,
            "heartbeat_budget": config.heartbeat_budget,
            # The UDP reflector for NAT discovery: two ports above the bus, advertised with the join host.
            "reflector": (config.listen, config.port + REFLECTOR_PORT_OFFSET),
            "reflector_advertise": urlsplit(config.join_endpoints[0]).hostname or "",
            # The relay, announced in every heartbeat answer: its own listen address if set, else the join host.
            "relay_advertise": f"{_relay_host(config)}:{config.relay_port}",
        },
        "keydist": {"database_url": url},
        "relay": {
            "database_url": url,
            "host": config.relay_host,
            "port": config.relay_port,
            "cert": config.relay_cert_path,
            "key": config.relay_key_path,
        },
    }
    return SERVICES[name](endpoint, keypair, server_key, **extra[name])


def _relay_host(config: ServerConfig) -> str:
    """The relay host nodes dial: `[relay] listen` when it names one address, else the join host."""
    if config.relay_listen not in ("", "*", "0.0.0.0", "::"):
        return config.relay_listen
    return urlsplit(config.join_endpoints[0]).hostname or config.listen


def run_process(name: str, config: ServerConfig, broker: str | None = None) -> None:
    """Run the broker or service *name* in this process until SIGTERM/SIGINT."""
    if name not in PROCESS_NAMES:
        raise ValueError(f"unknown process {name!r}; choose one of {', '.join(PROCESS_NAMES)}")
    setup_logging(name)
    runner = build_broker(config) if name == "broker" else build_service(name, config, broker)

    def _stop(signum: int, frame: FrameType | None) -> None:
        runner.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    freeze_long_lived()  # its imports and itself: never garbage, and full collections paused batches (bus/heap.py)
    runner.run()
