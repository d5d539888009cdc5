"""CURVE key pairs: generate, save, load.

A key pair lives in two files: ``NAME.key`` holds both halves and is written
with mode 0600 before any secret byte reaches it; ``NAME.pub`` holds the
public half only, for handing to whoever must trust it. Both are TOML with
Z85 text, the encoding libzmq itself uses for CURVE keys.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from bus.errors import KeyFileError

Z85_KEY_LENGTH = 40


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair as Z85 text (40 ASCII characters each)."""

    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public=public, secret=secret)

    @property
    def public_text(self) -> str:
        return self.public.decode("ascii")


def validate_public_key(text: str | bytes) -> bytes:
    """Return a Z85 public key as bytes, or raise KeyFileError saying why not."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    if len(raw) != Z85_KEY_LENGTH:
        raise KeyFileError(f"a CURVE key is {Z85_KEY_LENGTH} Z85 characters, got {len(raw)}")
    try:
        z85.decode(raw)
    except (ValueError, KeyError) as exc:
        raise KeyFileError(f"not a Z85 CURVE key: {exc}") from exc
    return raw


def save_keypair(keypair: KeyPair, directory: Path, name: str, *, force: bool = False) -> Path:
    """Write ``name.key`` (0600) and ``name.pub`` into *directory*; return the secret file."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret_path = directory / f"{name}.key"
    public_path = directory / f"{name}.pub"
    if not force and (secret_path.exists() or public_path.exists()):
        raise KeyFileError(f"{secret_path} already exists (use --force to replace it)")
    public = keypair.public.decode("ascii")
    secret = keypair.secret.decode("ascii")
    _write_private(secret_path, f'public = "{public}"\nsecret = "{secret}"\n')
    public_path.write_text(f'public = "{public}"\n')
    return secret_path


def _write_private(path: Path, text: str) -> None:
    # O_CREAT with 0600 so the secret is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _read_toml(path: Path) -> dict[str, object]:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeyFileError(f"key file {path} is corrupt: {exc}") from exc


def load_keypair(path: Path) -> KeyPair:
    """Load a ``.key`` file, checking that its public half matches its secret half."""
    data = _read_toml(path)
    try:
        public = validate_public_key(str(data["public"]))
        secret = validate_public_key(str(data["secret"]))
    except KeyError as exc:
        raise KeyFileError(f"key file {path} lacks the {exc.args[0]!r} field") from exc
    except KeyFileError as exc:
        raise KeyFileError(f"key file {path} is corrupt: {exc}") from exc
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"key file {path} is corrupt: public key does not match secret key")
    return KeyPair(public=public, secret=secret)


def load_public_key(path: Path) -> bytes:
    """Load the public half from a ``.pub`` or ``.key`` file."""
    data = _read_toml(path)
    if "public" not in data:
        raise KeyFileError(f"key file {path} lacks the 'public' field")
    try:
        return validate_public_key(str(data["public"]))
    except KeyFileError as exc:
        raise KeyFileError(f"key file {path} is corrupt: {exc}") from exc
