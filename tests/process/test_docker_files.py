"""The Docker deployment files (compose/docker) agree with the server they deploy.

No Docker daemon runs here, so the image is not built; what can drift is
checked for real instead: the entrypoint script runs on this machine against
a fresh directory (the real `coterie init`, then the environment applied to
config.toml, read back by the server's own loader), and every port the
compose file publishes is one the configured server listens on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.config import load_config
from services.processes import REFLECTOR_PORT_OFFSET

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "compose" / "docker"

yaml = pytest.importorskip("yaml", reason="PyYAML (the test extra) reads the compose file")


def run_entrypoint(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    bindir = Path(sys.executable).parent
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            "COTERIE_HOME": str(home),
            **env,
        },
    )


def test_entrypoint_initialises_once_and_applies_the_environment(tmp_path: Path) -> None:
    home = tmp_path / "coterie"
    env = {
        "COTERIE_DATABASE_URL": "postgresql+psycopg://coterie:pw@postgres/coterie",
        "COTERIE_RELAY_PORT": "8443",
        "COTERIE_ADVERTISE": "tcp://vpn.example.org:7870",
    }
    first = run_entrypoint(home, "--help", **env)
    assert first.returncode == 0, first.stderr
    shown = [line for line in first.stdout.splitlines() if "server public key (agents need it): " in line]
    assert len(shown) == 1, first.stdout
    config = load_config(home)
    assert config.listen == "0.0.0.0" and config.port == 7870
    assert config.database_url == env["COTERIE_DATABASE_URL"]
    assert config.relay_port == 8443
    assert config.join_endpoints == ["tcp://vpn.example.org:7870"]
    key = (home / "keys" / "server.pub").read_text()
    assert shown[0].rpartition(": ")[2] in key

    again = run_entrypoint(home, "--help")  # a restart: the same keys, the settings kept
    assert again.returncode == 0, again.stderr
    assert (home / "keys" / "server.pub").read_text() == key
    assert shown[0] in again.stdout  # the key is shown at every start, for the operator reading the logs
    assert load_config(home).database_url == env["COTERIE_DATABASE_URL"]


def test_compose_file_publishes_the_ports_the_server_uses(tmp_path: Path) -> None:
    doc = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    server = doc["services"]["server"]
    assert (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    published = {}
    for entry in server["ports"]:
        outside, inside = entry.split(":")
        port, _, proto = inside.partition("/")
        published[(int(port), proto)] = int(outside)

    home = tmp_path / "coterie"
    env = {"COTERIE_RELAY_PORT": server["environment"]["COTERIE_RELAY_PORT"]}
    assert run_entrypoint(home, "--help", **env).returncode == 0
    config = load_config(home)
    wanted = {
        (config.port, "tcp"),
        (config.port + REFLECTOR_PORT_OFFSET, "udp"),
        (config.port + REFLECTOR_PORT_OFFSET + 1, "udp"),
        (config.port + REFLECTOR_PORT_OFFSET + 2, "udp"),
        (config.relay_port, "tcp"),
    }
    assert set(published) == wanted
    assert published[(config.relay_port, "tcp")] == 443, "the relay is what firewalled nodes reach on 443"
    exposed = {
        (int(p.split("/")[0]), p.split("/")[1])
        for line in (DOCKER / "Dockerfile").read_text().splitlines()
        if line.startswith("EXPOSE")
        for p in line.split()[1:]
    }
    assert exposed == wanted


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = pyproject.split("include = [", 1)[1].split("]", 1)[0]
    for name in (p.strip().strip('"').rstrip("*") for p in packages.split(",") if p.strip()):
        assert f"COPY {name} ./{name}" in dockerfile, f"the image would lack the {name} package"
