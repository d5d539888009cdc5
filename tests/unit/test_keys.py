"""CURVE key files: generation, 0600 secrets, and clear errors for bad files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq

from bus.errors import KeyFileError
from bus.keys import KeyPair, load_keypair, load_public_key, save_keypair, validate_public_key


def test_saved_pair_loads_back_and_secret_is_private(tmp_path: Path) -> None:
    pair = KeyPair.generate()
    secret_file = save_keypair(pair, tmp_path / "keys", "server")
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert load_keypair(secret_file) == pair
    assert load_public_key(tmp_path / "keys" / "server.pub") == pair.public
    assert "secret" not in (tmp_path / "keys" / "server.pub").read_text()
    assert zmq.curve_public(pair.secret) == pair.public


def test_existing_keys_are_not_overwritten_without_force(tmp_path: Path) -> None:
    first = KeyPair.generate()
    save_keypair(first, tmp_path, "admin")
    with pytest.raises(KeyFileError, match="already exists"):
        save_keypair(KeyPair.generate(), tmp_path, "admin")
    assert load_keypair(tmp_path / "admin.key") == first
    second = KeyPair.generate()
    save_keypair(second, tmp_path, "admin", force=True)
    assert load_keypair(tmp_path / "admin.key") == second


def test_missing_key_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_keypair(tmp_path / "nope.key")


@pytest.mark.parametrize(
    "content, reason",
    [
        ("this is not toml [", "corrupt"),
        ('public = "abc"\nsecret = "def"\n', "40 Z85 characters"),
        ('public = "' + "~" * 40 + '"\nsecret = "' + "~" * 40 + '"\n', "not a Z85"),
        ('secret = "x"\n', "lacks the 'public' field"),
    ],
)
def test_corrupt_key_files_are_refused_with_a_reason(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(KeyFileError, match=reason):
        load_keypair(path)


def test_public_half_must_match_secret_half(tmp_path: Path) -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    path = tmp_path / "mixed.key"
    path.write_text(f'public = "{a.public_text}"\nsecret = "{b.secret.decode()}"\n')
    with pytest.raises(KeyFileError, match="does not match"):
        load_keypair(path)


def test_validate_public_key_accepts_only_z85_keys() -> None:
    pair = KeyPair.generate()
    assert validate_public_key(pair.public_text) == pair.public
    with pytest.raises(KeyFileError):
        validate_public_key("short")
