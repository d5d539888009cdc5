"""The CLI contract end to end: init, server up, status, and the supervisor's restarts."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.messages.common import Ping, Pong
from bus.messages.services import SERVICE_NAMES
from tests.conftest import ROOT, wait_until
from tests.helpers.server import free_port
from tui.client import connect, resolve_address

PROCESSES = ["broker", *SERVICE_NAMES]


def coterie(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_init_writes_config_and_private_keys(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = coterie("init", "--dir", str(home))
    assert result.returncode == 0, result.stderr
    assert "server public key" in result.stdout
    assert (home / "config.toml").exists() and (home / "registry.toml").exists()
    for name in ("server", "admin", *SERVICE_NAMES):
        assert stat.S_IMODE((home / "keys" / f"{name}.key").stat().st_mode) == 0o600
    server_key = (home / "keys" / "server.key").read_text()
    again = coterie("init", "--dir", str(home))
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "--force" in again.stderr
    assert (home / "keys" / "server.key").read_text() == server_key, "keys were overwritten"
    forced = coterie("init", "--dir", str(home), "--force")
    assert forced.returncode == 0 and (home / "keys" / "server.key").read_text() != server_key


def test_init_honours_coterie_home(tmp_path: Path) -> None:
    env = {**os.environ, "COTERIE_HOME": str(tmp_path / "envhome")}
    result = subprocess.run(
        [sys.executable, "-m", "tui.cli", "init"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "envhome" / "keys" / "server.key").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--bogus"],
        ["init", "--port", "0"],
        ["service", "run", "nosuch", "--dir", "/nonexistent"],
        ["frobnicate"],
        ["vpn", "set", "lab"],
        ["vpn", "set", "lab", "--keepalive", "0"],
        ["vpn", "set", "lab", "--mtu", "100000"],
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args: list[str]) -> None:
    result = coterie(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("coterie: error:") and result.stderr.count("\n") == 1, result.stderr


def test_status_without_a_server_fails_in_one_line(tmp_path: Path) -> None:
    assert coterie("init", "--dir", str(tmp_path), "--port", str(free_port())).returncode == 0
    result = coterie("status", "--dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("coterie: error: cannot reach the server") and result.stderr.count("\n") == 1


def test_status_without_config_says_to_init(tmp_path: Path) -> None:
    result = coterie("status", "--dir", str(tmp_path / "empty"))
    assert result.returncode == 1 and "coterie init" in result.stderr


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    home = tmp_path / "srv"
    assert coterie("init", "--dir", str(home), "--port", str(free_port())).returncode == 0
    config = home / "config.toml"
    config.write_text(config.read_text().replace("port = 443", f"port = {free_port()}"))  # never the real 443
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "tui.cli", "server", "up", "--dir", str(home)], cwd=ROOT, stdout=log, stderr=log
    )
    try:
        yield home, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def status_json(home: Path) -> dict[str, dict] | None:
    result = coterie("status", "--dir", str(home), "--json")
    if result.returncode not in (0, 3):
        return None
    return {p["name"]: p for p in json.loads(result.stdout)["processes"]}


def all_up(home: Path) -> dict[str, dict] | None:
    rows = status_json(home)
    return rows if rows and all(rows[name]["up"] for name in PROCESSES) else None


def test_server_up_runs_every_process_and_restarts_a_killed_one(server: tuple[Path, subprocess.Popen[bytes]]) -> None:
    home, supervisor = server
    assert wait_until(lambda: all_up(home), timeout=30, interval=0.5), status_json(home)
    rows = all_up(home)
    assert rows is not None and sorted(rows) == sorted(PROCESSES)
    pids = {name: rows[name]["pid"] for name in PROCESSES}
    assert len(set(pids.values())) == len(PROCESSES) and supervisor.pid not in pids.values()

    # A request through the broker to each service and back, as the operator.
    with connect(resolve_address(home)) as client:
        for name in SERVICE_NAMES:
            assert client.request(name, Ping(payload=name.encode())) == Pong(payload=name.encode(), service=name)

    os.kill(pids["keydist"], signal.SIGKILL)
    assert wait_until(
        lambda: (r := all_up(home)) and r["keydist"]["pid"] != pids["keydist"], timeout=30, interval=0.5
    ), status_json(home)
    rows = all_up(home)
    assert rows is not None
    assert all(rows[n]["pid"] == pids[n] for n in PROCESSES if n != "keydist"), "only the killed one restarted"


def test_killed_broker_is_restarted_and_services_rejoin(server: tuple[Path, subprocess.Popen[bytes]]) -> None:
    home, _ = server
    assert wait_until(lambda: all_up(home), timeout=30, interval=0.5)
    rows = all_up(home)
    assert rows is not None
    os.kill(rows["broker"]["pid"], signal.SIGKILL)
    assert wait_until(
        lambda: (r := all_up(home)) and r["broker"]["pid"] != rows["broker"]["pid"], timeout=30, interval=0.5
    ), status_json(home)


def test_sigterm_stops_every_process(server: tuple[Path, subprocess.Popen[bytes]]) -> None:
    home, supervisor = server
    assert wait_until(lambda: all_up(home), timeout=30, interval=0.5)
    rows = all_up(home)
    assert rows is not None
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=15) == 0
    for name in PROCESSES:
        assert not _alive(rows[name]["pid"]), f"{name} outlived the supervisor"


def test_second_server_on_the_same_port_refuses_to_start(server: tuple[Path, subprocess.Popen[bytes]]) -> None:
    home, _ = server
    assert wait_until(lambda: all_up(home), timeout=30, interval=0.5)
    result = coterie("server", "up", "--dir", str(home), timeout=20)
    assert result.returncode == 1
    assert "in use" in result.stderr and result.stderr.count("\n") == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive: the supervisor reaped its children, so check the state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
