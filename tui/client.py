"""The operator's connection to the server: the one module of tui/ that uses the bus.

It finds the server's address and keys in the configuration directory, or
takes them from the command line for a remote server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bus.client import Client
from bus.errors import BusError, KeyFileError
from bus.keys import load_keypair, load_public_key, validate_public_key
from bus.messages.common import BrokerHealth, Health, HealthRequest
from bus.messages.services import SERVICE_NAMES
from services.config import load_config, require_key


@dataclass(frozen=True)
class ServerAddress:
    endpoint: str
    server_key: bytes
    key_file: Path


def resolve_address(
    directory: Path, server: str | None = None, server_key: str | None = None, key: Path | None = None
) -> ServerAddress:
    """The server to talk to: --server/--server-key/--key win over DIR's config and keys."""
    endpoint = server
    if endpoint is None:
        endpoint = load_config(directory).connect_endpoint
    if server_key is not None:
        public = _server_key_from(server_key)
    else:
        public = load_public_key(require_key(directory / "keys" / "server.pub"))
    key_file = key if key is not None else directory / "keys" / "admin.key"
    return ServerAddress(endpoint, public, require_key(key_file))


def _server_key_from(text: str) -> bytes:
    """A server key given as Z85 text or as the path of a .pub file."""
    path = Path(text)
    if len(text) != 40 and path.exists():
        return load_public_key(path)
    try:
        return validate_public_key(text)
    except KeyFileError as exc:
        raise KeyFileError(f"--server-key: {exc}") from None


def connect(address: ServerAddress, *, timeout: float = 2.0, retries: int = 1) -> Client:
    keypair = load_keypair(address.key_file)
    return Client(address.endpoint, keypair, address.server_key, timeout=timeout, retries=retries)


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    up: bool
    pid: int | None = None
    uptime: float | None = None
    version: str | None = None
    workers: int = 0
    error: str | None = None


def server_status(client: Client, timeout: float = 2.0) -> list[ProcessStatus]:
    """Health of the broker and every service; raises BusError if the broker is unreachable."""
    broker = client.request("broker", HealthRequest(), expect=BrokerHealth)
    assert isinstance(broker, BrokerHealth)
    rows = [_row("broker", broker.health, 1)]
    directory = {entry.name: entry for entry in broker.services}
    present = [n for n in SERVICE_NAMES if directory.get(n) and directory[n].workers]
    answers = dict(
        zip(present, client.request_many([(n, HealthRequest()) for n in present], timeout=timeout), strict=True)
    )
    for name in SERVICE_NAMES:
        answer = answers.get(name)
        if isinstance(answer, Health):
            rows.append(_row(name, answer, directory[name].workers))
        elif isinstance(answer, BusError):
            rows.append(ProcessStatus(name, up=False, error=str(answer)))
        elif answer is not None:
            rows.append(ProcessStatus(name, up=False, error=f"unexpected reply {answer.KIND}"))
        else:
            rows.append(ProcessStatus(name, up=False, error="no worker registered"))
    return rows


def _row(name: str, health: Health, workers: int) -> ProcessStatus:
    return ProcessStatus(name, True, health.pid, round(health.uptime, 1), health.version, workers)
