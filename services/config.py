"""The server's configuration directory: config.toml, keys/, registry.toml.

Layout of DIR (``coterie init`` writes it)::

    config.toml          listen address and port, database URL, anonymous callers
    registry.toml        the public keys the broker admits, and as whom
    keys/server.key      the broker's CURVE key pair (0600); server.pub is public
    keys/admin.key       the first operator's key pair
    keys/<service>.key   one key pair per service, so that each authenticates
    keys/relay-tls.crt   the relay's self-signed TLS certificate and key (made at its first start)

Every process of the server (and every operator command) reads the same
directory, so a service run alone on another machine needs a copy of its own
key, the server's public key and config.toml.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import tomli_w

from bus.errors import KeyFileError

DEFAULT_PORT = 7870
DEFAULT_LISTEN = "127.0.0.1"
DEFAULT_RELAY_PORT = 443


class ConfigError(Exception):
    """The configuration directory is missing, incomplete or invalid."""


def default_dir() -> Path:
    env = os.environ.get("COTERIE_HOME")
    return Path(env) if env else Path.home() / ".coterie"


@dataclass(frozen=True)
class ServerConfig:
    directory: Path
    listen: str = DEFAULT_LISTEN
    port: int = DEFAULT_PORT
    database: str = ""  # empty: SQLite in DIR
    allow_anonymous: bool = True
    advertise: tuple[str, ...] = ()  # endpoints written into join strings; default: connect_endpoint
    presence_timeout: float = 15.0  # seconds without a heartbeat before a node is marked offline
    relay_listen: str = ""  # the relay's TLS listener; empty: the broker's listen address
    relay_port: int = DEFAULT_RELAY_PORT
    relay_cert: str = ""  # PEM files; empty: keys/relay-tls.crt and .key, made self-signed if absent
    relay_key: str = ""

    @property
    def keys_dir(self) -> Path:
        return self.directory / "keys"

    @property
    def registry_path(self) -> Path:
        return self.directory / "registry.toml"

    @property
    def bind_endpoint(self) -> str:
        return f"tcp://{self.listen}:{self.port}"

    @property
    def connect_endpoint(self) -> str:
        """Where local processes reach the broker (a wildcard listen means loopback)."""
        host = "127.0.0.1" if self.listen in ("0.0.0.0", "*") else self.listen
        return f"tcp://{host}:{self.port}"

    @property
    def join_endpoints(self) -> list[str]:
        return list(self.advertise) or [self.connect_endpoint]

    @property
    def signing_key_path(self) -> Path:
        return self.keys_dir / "server-sign.key"

    @property
    def relay_host(self) -> str:
        host = self.relay_listen or self.listen
        return "0.0.0.0" if host == "*" else host

    @property
    def relay_cert_path(self) -> Path:
        return Path(self.relay_cert) if self.relay_cert else self.keys_dir / "relay-tls.crt"

    @property
    def relay_key_path(self) -> Path:
        return Path(self.relay_key) if self.relay_key else self.keys_dir / "relay-tls.key"

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.directory / 'coterie.db'}"

    def with_overrides(self, *, listen: str | None = None, port: int | None = None) -> ServerConfig:
        """This config with the command line's --listen/--port applied (None keeps the file's)."""
        return replace(
            self,
            listen=self.listen if listen is None else listen,
            port=self.port if port is None else _port(port),
        )

    def key_path(self, name: str) -> Path:
        return self.keys_dir / f"{name}.key"

    def public_key_path(self, name: str) -> Path:
        return self.keys_dir / f"{name}.pub"

    def to_toml(self) -> str:
        doc = {
            "server": {
                "listen": self.listen,
                "port": self.port,
                "allow_anonymous": self.allow_anonymous,
                "advertise": list(self.advertise),
            },
            "database": {"url": self.database},
            "sync": {"presence_timeout": self.presence_timeout},
            "relay": {
                "listen": self.relay_listen,
                "port": self.relay_port,
                "cert": self.relay_cert,
                "key": self.relay_key,
            },
        }
        return tomli_w.dumps(doc)


def load_config(directory: Path) -> ServerConfig:
    path = directory / "config.toml"
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; run `coterie init --dir {directory}` first") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    server = doc.get("server", {})
    relay = doc.get("relay", {})
    try:
        config = ServerConfig(
            directory=directory,
            listen=str(server.get("listen", DEFAULT_LISTEN)),
            port=_port(server.get("port", DEFAULT_PORT)),
            database=str(doc.get("database", {}).get("url", "")),
            allow_anonymous=bool(server.get("allow_anonymous", True)),
            advertise=tuple(str(e) for e in server.get("advertise", [])),
            presence_timeout=float(doc.get("sync", {}).get("presence_timeout", 15.0)),
            relay_listen=str(relay.get("listen", "")),
            relay_port=_port(relay.get("port", DEFAULT_RELAY_PORT), "relay.port"),
            relay_cert=str(relay.get("cert", "")),
            relay_key=str(relay.get("key", "")),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def _port(value: object, name: str = "server.port") -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{name} must be an integer 1..65535, got {value!r}")
    return value


def require_key(path: Path) -> Path:
    if not path.exists():
        raise KeyFileError(f"key file {path} does not exist; run `coterie init` or copy it there")
    return path
