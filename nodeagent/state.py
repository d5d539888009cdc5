"""The agent's state directory: its keys, what it knows of the server, its last view.

Layout of the state dir::

    node.key / node.pub   the node's CURVE key pair (0600): its identity on the bus
    identity.key          the node's Ed25519 identity key (0600), for end-to-end keys later
    server.toml           server endpoints, server CURVE key, server signing key, node name
    view.json             the last view with its revision, digest and the server's seal
    status.json           what the running agent is doing (for `coterie agent status`)

Files are replaced atomically (write aside, rename), so a crash of the agent
never leaves half a view behind. They are not fsynced: after a power loss an
older view (still sealed, so still trusted) is fine, and a node must not pay
a disk flush per update.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from bus.keys import KeyPair, load_keypair, save_keypair
from bus.messages.sync import NodeView, Seal
from bus.signing import generate_signing_key


class StateError(Exception):
    """The state directory is missing something or holds something damaged."""


@dataclass(frozen=True)
class ServerInfo:
    endpoints: list[str]
    server_key: str
    sign_key: str
    node: str


@dataclass(frozen=True)
class StoredView:
    revision: int
    digest: str
    view: NodeView
    seal: Seal


def default_state_dir() -> Path:
    env = os.environ.get("COTERIE_AGENT_HOME")
    return Path(env) if env else Path.home() / ".coterie" / "agent"


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def enrolled(self) -> bool:
        return (self.path / "server.toml").exists()

    def keypair(self) -> KeyPair:
        """The node's CURVE key pair, made on first use."""
        key_file = self.path / "node.key"
        if not key_file.exists():
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            save_keypair(KeyPair.generate(), self.path, "node")
            generate_signing_key(self.path / "identity.key", force=True)
        return load_keypair(key_file)

    def identity_public(self) -> str:
        from bus.signing import load_signing_key

        return load_signing_key(self.path / "identity.key").verify_key.encode().hex()

    def save_server(self, info: ServerInfo) -> None:
        doc = {"endpoints": info.endpoints, "server_key": info.server_key, "sign_key": info.sign_key, "node": info.node}
        _replace(self.path / "server.toml", tomli_w.dumps(doc))

    def server(self) -> ServerInfo:
        path = self.path / "server.toml"
        try:
            doc = tomllib.loads(path.read_text())
            return ServerInfo(list(doc["endpoints"]), doc["server_key"], doc["sign_key"], doc["node"])
        except FileNotFoundError:
            raise StateError(f"{self.path} is not enrolled: run `coterie agent up --join JOIN` first") from None
        except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
            raise StateError(f"{path} is damaged: {exc}") from None

    def save_view(self, stored: StoredView) -> None:
        doc = {
            "revision": stored.revision,
            "digest": stored.digest,
            "view": stored.view.model_dump(mode="json"),
            "seal": stored.seal.model_dump(mode="json"),
        }
        _replace(self.path / "view.json", json.dumps(doc, indent=1, sort_keys=True))

    def load_view(self) -> StoredView | None:
        path = self.path / "view.json"
        try:
            doc = json.loads(path.read_text())
            return StoredView(
                revision=int(doc["revision"]),
                digest=str(doc["digest"]),
                view=NodeView.model_validate(doc["view"]),
                seal=Seal.model_validate(doc["seal"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{path} is damaged: {exc}") from None

    def save_status(self, status: dict[str, Any]) -> None:
        _replace(self.path / "status.json", json.dumps(status, sort_keys=True))

    def load_status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.path / "status.json").read_text()))
        except (FileNotFoundError, ValueError):
            return {}


def _replace(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
