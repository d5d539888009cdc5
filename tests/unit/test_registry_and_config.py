"""Key registries (memory and file) and the server configuration directory."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bus.errors import KeyFileError
from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.registry import FileKeyRegistry, MemoryKeyRegistry, write_registry_file
from services.config import ConfigError, ServerConfig, load_config


def _identity(role: Role, name: str) -> Identity:
    return Identity(role, name, KeyPair.generate().public_text)


def test_memory_registry_add_lookup_remove() -> None:
    alice = _identity(Role.NODE, "alice")
    registry = MemoryKeyRegistry([alice])
    assert registry.lookup(alice.key) == alice
    registry.remove(alice.key)
    assert registry.lookup(alice.key) is None


def test_memory_registry_refuses_a_bad_key() -> None:
    with pytest.raises(KeyFileError):
        MemoryKeyRegistry([Identity(Role.NODE, "x", "not-a-key")])


def test_file_registry_sees_changes(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    admin, node = _identity(Role.OPERATOR, "admin"), _identity(Role.NODE, "n1")
    write_registry_file(path, [admin])
    registry = FileKeyRegistry(path, recheck=0.0)
    assert registry.lookup(admin.key) == admin
    assert registry.lookup(node.key) is None
    write_registry_file(path, [node])
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # a new mtime even on coarse clocks
    assert registry.lookup(node.key) == node
    assert registry.lookup(admin.key) is None


def test_file_registry_keeps_last_good_copy_when_file_breaks(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    admin = _identity(Role.OPERATOR, "admin")
    write_registry_file(path, [admin])
    registry = FileKeyRegistry(path, recheck=0.0)
    path.write_text("[[identity]]\nrole = 'wizard'\nname = 'x'\nkey = 'y'\n")
    assert registry.lookup(admin.key) == admin


def test_file_registry_must_exist_at_start(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        FileKeyRegistry(tmp_path / "none.toml")


def test_anonymous_identities_are_never_written(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    anon = Identity.anonymous(KeyPair.generate().public_text)
    write_registry_file(path, [anon])
    assert FileKeyRegistry(path).identities() == []


def test_config_round_trip_and_overrides(tmp_path: Path) -> None:
    config = ServerConfig(directory=tmp_path, listen="0.0.0.0", port=9000)
    (tmp_path / "config.toml").write_text(config.to_toml())
    loaded = load_config(tmp_path)
    assert loaded == config
    assert loaded.connect_endpoint == "tcp://127.0.0.1:9000"
    assert loaded.database_url == f"sqlite:///{tmp_path / 'coterie.db'}"
    assert loaded.with_overrides(port=9100).bind_endpoint == "tcp://0.0.0.0:9100"


@pytest.mark.parametrize(
    "text, reason",
    [(None, "not found"), ("[server\n", "not valid TOML"), ("[server]\nport = 70000\n", "1..65535")],
)
def test_bad_config_is_refused_with_a_reason(tmp_path: Path, text: str | None, reason: str) -> None:
    if text is not None:
        (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError, match=reason):
        load_config(tmp_path)


def test_identity_wire_form_survives_any_key() -> None:
    for _ in range(200):  # Z85 keys contain ':' and other punctuation
        identity = Identity(Role.NODE, "n.1-x", KeyPair.generate().public_text)
        assert Identity.from_wire(identity.wire) == identity
