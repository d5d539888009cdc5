"""Key registries: which CURVE public keys the server knows, and as whom.

The broker asks a registry on every handshake (ZAP) and on every message
(revocation). Two implementations sit behind one small interface: an
in-memory one for tests and embedding, and a TOML file that the datastore
will keep current (DIR/registry.toml); the file is re-read when it changes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import tomllib
from pathlib import Path
from typing import Protocol

import tomli_w

from bus.errors import KeyFileError
from bus.identity import Identity, Role
from bus.keys import validate_public_key

log = logging.getLogger(__name__)


class KeyRegistry(Protocol):
    def lookup(self, key: str) -> Identity | None:
        """The identity that owns the Z85 public *key*, or None if unknown."""
        ...


class MemoryKeyRegistry:
    """A registry held in memory; ``add`` and ``remove`` take effect at once."""

    def __init__(self, identities: list[Identity] | None = None) -> None:
        self._by_key: dict[str, Identity] = {}
        self._lock = threading.Lock()
        for identity in identities or []:
            self.add(identity)

    def add(self, identity: Identity) -> None:
        validate_public_key(identity.key)
        with self._lock:
            self._by_key[identity.key] = identity

    def remove(self, key: str) -> None:
        with self._lock:
            self._by_key.pop(key, None)

    def lookup(self, key: str) -> Identity | None:
        return self._by_key.get(key)

    def identities(self) -> list[Identity]:
        with self._lock:
            return list(self._by_key.values())


class ChainRegistry:
    """Several registries asked in order: the file of operators and services, then the datastore's nodes."""

    def __init__(self, *registries: KeyRegistry) -> None:
        self.registries = registries

    def lookup(self, key: str) -> Identity | None:
        for registry in self.registries:
            identity = registry.lookup(key)
            if identity is not None:
                return identity
        return None


class FileKeyRegistry:
    """A registry backed by a TOML file of ``[[identity]]`` tables.

    The file is checked for changes at most every *recheck* seconds, so a
    lookup costs a dictionary access almost always.
    """

    def __init__(self, path: Path, recheck: float = 0.5) -> None:
        self.path = path
        self._recheck = recheck
        self._checked_at = 0.0
        self._stamp: tuple[int, int] | None = None
        self._memory = MemoryKeyRegistry()
        self._reload_if_changed(force=True)

    def lookup(self, key: str) -> Identity | None:
        now = time.monotonic()
        if now - self._checked_at >= self._recheck:
            self._reload_if_changed()
        return self._memory.lookup(key)

    def identities(self) -> list[Identity]:
        self._reload_if_changed()
        return self._memory.identities()

    def _reload_if_changed(self, force: bool = False) -> None:
        self._checked_at = time.monotonic()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if force:
                raise KeyFileError(f"key registry {self.path} does not exist") from None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp and not force:
            return
        try:
            identities = read_registry_file(self.path)
        except KeyFileError:
            if force:
                raise
            log.error("key registry %s is unreadable; keeping the previous one", self.path)
            return
        self._memory = MemoryKeyRegistry(identities)
        self._stamp = stamp
        log.info("key registry %s loaded: %d identities", self.path, len(identities))


def read_registry_file(path: Path) -> list[Identity]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise KeyFileError(f"key registry {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key registry {path} is corrupt: {exc}") from exc
    identities = []
    for entry in data.get("identity", []):
        try:
            key = validate_public_key(entry["key"]).decode("ascii")
            identities.append(Identity(role=Role(entry["role"]), name=str(entry["name"]), key=key))
        except (KeyError, ValueError, TypeError) as exc:
            raise KeyFileError(f"key registry {path} has a bad entry {entry!r}: {exc}") from exc
    return identities


def write_registry_file(path: Path, identities: list[Identity]) -> None:
    """Replace the registry file atomically (write aside, then rename)."""
    doc = {
        "identity": [
            {"role": str(i.role), "name": i.name, "key": i.key} for i in identities if i.role is not Role.ANONYMOUS
        ]
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps(doc))
    os.replace(tmp, path)
