"""The server's configuration directory: config.toml, keys/, registry.toml.

Layout of DIR (``coterie init`` writes it)::

    config.toml          listen address and port, database URL, anonymous callers,
                         and the proxy authentication realms ([realms.NAME] tables)
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
import re
import tomllib
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

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
    heartbeat_budget: float = 1000.0  # heartbeats a second from all nodes together (longer intervals beyond)
    relay_listen: str = ""  # the relay's TLS listener; empty: the broker's listen address
    relay_port: int = DEFAULT_RELAY_PORT
    relay_cert: str = ""  # PEM files; empty: keys/relay-tls.crt and .key, made self-signed if absent
    relay_key: str = ""
    realms: tuple[RealmConfig, ...] = ()  # proxy authentication realms, in file order

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
            "sync": {"presence_timeout": self.presence_timeout, "heartbeat_budget": self.heartbeat_budget},
            "relay": {
                "listen": self.relay_listen,
                "port": self.relay_port,
                "cert": self.relay_cert,
                "key": self.relay_key,
            },
        }
        if self.realms:
            doc["realms"] = {realm.name: realm.to_table() for realm in self.realms}
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
            heartbeat_budget=float(doc.get("sync", {}).get("heartbeat_budget", 1000.0)),
            relay_listen=str(relay.get("listen", "")),
            relay_port=_port(relay.get("port", DEFAULT_RELAY_PORT), "relay.port"),
            relay_cert=str(relay.get("cert", "")),
            relay_key=str(relay.get("key", "")),
            realms=parse_realms(doc.get("realms", {})),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


# ---------------------------------------------------------------------------- proxy authentication realms
# A user name ``alice@corp`` is checked by the realm named ``corp``: an LDAP
# directory or a RADIUS server (services/auth/realms builds them). Each realm
# is one ``[realms.NAME]`` table with ``kind = "ldap"`` or ``"radius"``. Every
# key is checked here, at load time, so that a typo stops the server with a
# message naming the key instead of surfacing as failed logins later.

REALM_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
LDAP_ATTRIBUTE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")  # RFC 4512 descr
# Seconds. A login waits for its realm while an auth worker thread waits with it, and the agent gives up
# on its login request after 10 s: the defaults keep the worst case (a RADIUS server that never answers:
# (retries + 1) x timeout = 6 s; an LDAP server that stalls: one timeout) well below that.
MAX_TIMEOUT = 60.0


@dataclass(frozen=True)
class LdapRealmConfig:
    """An LDAP directory: search the user's DN (service bind or anonymous search), then bind as the user."""

    name: str
    url: str  # ldap://host[:port] or ldaps://host[:port]
    base_dn: str  # where the user search starts (subtree)
    user_attribute: str = "uid"  # the attribute that holds the login name
    user_filter: str = "(objectClass=*)"  # ANDed with (user_attribute=NAME); an operator-written filter
    bind_dn: str = ""  # service account for the search; empty: anonymous search
    bind_password: str = ""
    starttls: bool = False  # upgrade ldap:// with StartTLS (RFC 4513 section 3)
    ca_file: str = ""  # PEM file of CAs to trust for ldaps/StartTLS, relative to the config dir; empty: system CAs
    timeout: float = 3.0  # connect and receive timeout, seconds (receive: whole seconds, rounded up)

    kind = "ldap"

    def to_table(self) -> dict[str, Any]:
        return {"kind": self.kind} | {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


@dataclass(frozen=True)
class RadiusRealmConfig:
    """A RADIUS server asked with Access-Request/PAP (RFC 2865) and a Message-Authenticator (RFC 3579)."""

    name: str
    server: str  # host name or address
    secret: str  # the shared secret of this client at the server
    port: int = 1812
    timeout: float = 2.0  # seconds to wait for a reply to one transmission
    retries: int = 2  # retransmissions after the first try
    nas_identifier: str = "coterie"
    # Drop replies without a Message-Authenticator (BlastRADIUS, CVE-2024-3596). Turn off only for a server
    # too old to sign its replies (FreeRADIUS < 3.2.5 without the post-auth workaround), on a trusted network.
    require_message_authenticator: bool = True

    kind = "radius"

    def to_table(self) -> dict[str, Any]:
        return {"kind": self.kind} | {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


RealmConfig = LdapRealmConfig | RadiusRealmConfig
REALM_KINDS: dict[str, type[LdapRealmConfig] | type[RadiusRealmConfig]] = {
    "ldap": LdapRealmConfig,
    "radius": RadiusRealmConfig,
}


def parse_realms(tables: object) -> tuple[RealmConfig, ...]:
    """The ``[realms.NAME]`` tables of config.toml, validated; ValueError names the realm and the key."""
    if not isinstance(tables, dict):
        raise ValueError("[realms] must be a table of [realms.NAME] tables")
    return tuple(_parse_realm(name, table) for name, table in tables.items())


def _parse_realm(name: str, table: object) -> RealmConfig:
    where = f"realms.{name}"
    if not REALM_NAME.match(name):
        raise ValueError(f"{where}: a realm name is lower-case letters, digits, '.', '_' or '-' (it follows '@')")
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table")
    kind = table.get("kind")
    cls = REALM_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"{where}.kind must be one of {sorted(REALM_KINDS)}, got {kind!r}")
    known = {f.name: f for f in fields(cls) if f.name != "name"}
    unknown = sorted(set(table) - set(known) - {"kind"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for key, field in known.items():
        if key in table:
            values[key] = _typed(f"{where}.{key}", table[key], field.type)
    missing = [key for key, f in known.items() if key not in values and _required(cls, key)]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    realm = cls(name=name, **values)
    _check_common(where, realm)
    if isinstance(realm, LdapRealmConfig):
        _check_ldap(where, realm)
    else:
        _check_radius(where, realm)
    return realm


def _required(cls: type, key: str) -> bool:
    return next(f for f in fields(cls) if f.name == key).default is MISSING


def _typed(where: str, value: object, annotation: object) -> object:
    """*value* checked against the field's annotation (a string under ``from __future__ import annotations``)."""
    expected = {"str": str, "bool": bool, "int": int, "float": (int, float)}[str(annotation)]
    if isinstance(value, bool) and expected is not bool:
        raise ValueError(f"{where} must be {annotation}, got {value!r}")
    if not isinstance(value, expected):  # type: ignore[arg-type]
        raise ValueError(f"{where} must be {annotation}, got {value!r}")
    return float(value) if annotation == "float" else value  # type: ignore[arg-type]


def _check_common(where: str, realm: RealmConfig) -> None:
    if not 0 < realm.timeout <= MAX_TIMEOUT:
        raise ValueError(f"{where}.timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds")


def _check_ldap(where: str, realm: LdapRealmConfig) -> None:
    from ldap3.core.exceptions import LDAPInvalidDnError
    from ldap3.utils.dn import parse_dn

    scheme, sep, rest = realm.url.partition("://")
    if not sep or scheme.lower() not in ("ldap", "ldaps") or not rest.strip("/"):
        raise ValueError(f"{where}.url must be ldap://HOST[:PORT] or ldaps://HOST[:PORT], got {realm.url!r}")
    if realm.starttls and scheme.lower() == "ldaps":
        raise ValueError(f"{where}: starttls applies to ldap:// only (ldaps:// is TLS from the start)")
    for key in ("base_dn", "bind_dn"):
        value = getattr(realm, key)
        try:
            if value or key == "base_dn":
                parse_dn(value)
        except LDAPInvalidDnError as exc:
            raise ValueError(f"{where}.{key} is not a valid DN ({exc}): {value!r}") from None
    if not realm.base_dn:
        raise ValueError(f"{where}.base_dn must not be empty")
    if not LDAP_ATTRIBUTE.match(realm.user_attribute):
        raise ValueError(f"{where}.user_attribute must be an attribute name, got {realm.user_attribute!r}")
    if not _balanced_filter(realm.user_filter):
        raise ValueError(f"{where}.user_filter must be one parenthesised LDAP filter, got {realm.user_filter!r}")
    if bool(realm.bind_dn) != bool(realm.bind_password):
        raise ValueError(f"{where}: set both bind_dn and bind_password, or neither (anonymous search)")


def _balanced_filter(text: str) -> bool:
    depth = 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0 or (depth == 0 and index != len(text) - 1):
            return False
    return text.startswith("(") and depth == 0


def _check_radius(where: str, realm: RadiusRealmConfig) -> None:
    if not realm.server.strip():
        raise ValueError(f"{where}.server must not be empty")
    if not realm.secret:
        raise ValueError(f"{where}.secret must not be empty (RFC 2865 section 3)")
    if not 0 < realm.port < 65536:
        raise ValueError(f"{where}.port must be 1..65535, got {realm.port}")
    if not 0 <= realm.retries <= 10:
        raise ValueError(f"{where}.retries must be 0..10, got {realm.retries}")
    if (realm.retries + 1) * realm.timeout > MAX_TIMEOUT:
        raise ValueError(f"{where}: (retries + 1) x timeout must be at most {MAX_TIMEOUT:g} seconds")
    if not realm.nas_identifier:
        raise ValueError(f"{where}.nas_identifier must not be empty (RFC 2865 wants NAS-Identifier or NAS-IP)")


def _port(value: object, name: str = "server.port") -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{name} must be an integer 1..65535, got {value!r}")
    return value


def require_key(path: Path) -> Path:
    if not path.exists():
        raise KeyFileError(f"key file {path} does not exist; run `coterie init` or copy it there")
    return path
