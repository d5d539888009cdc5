"""`coterie lab up|list|exec|down` as an operator runs them (issue 6): a shipped topology, detached.

The lab is built by a detached process that owns it; this test must find it
through the CLI, run a real ping through the VPN with `lab exec`, and see
`lab down` delete every namespace the lab made.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compose.netns import ROOT, checkout_env, list_namespaces
from tests.network.conftest import lab_unavailable

pytestmark = pytest.mark.timeout(600)


def coterie(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=checkout_env(),
        cwd=ROOT,
    )


def test_shipped_topologies_are_listed() -> None:
    shown = json.loads(coterie("lab", "list", "--files", "--json").stdout)
    names = {row["name"] for row in shown}
    assert {"demo", "two-hosts", "firewalled", "pat-pat", "pat-ambiguity", "lossy"} <= names
    assert all(Path(row["file"]).is_file() and row["about"] for row in shown)


def test_bad_arguments_get_one_line_and_nonzero_exit() -> None:
    unknown = coterie("lab", "up", "no-such-topology")
    assert unknown.returncode == 2 and "shipped ones: " in unknown.stderr and "Traceback" not in unknown.stderr
    if lab_unavailable():
        pytest.skip(lab_unavailable())
    idle = coterie("lab", "down", "two-hosts")
    assert idle.returncode == 1 and idle.stderr.strip() == "coterie: error: no running lab of two-hosts.toml"
    no_command = coterie("lab", "exec", "two-hosts", "a")
    assert no_command.returncode == 2 and "needs a command" in no_command.stderr


def test_up_detached_exec_ping_and_down(tmp_path: Path) -> None:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    up = coterie("lab", "up", "two-hosts", "--detach", "--workdir", str(tmp_path))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "node a" in up.stdout and "node b" in up.stdout and "stop it with: coterie lab down" in up.stdout
        labs = json.loads(coterie("lab", "list", "--json").stdout)
        mine = [d for d in labs if d.get("file", "").endswith("two-hosts.toml") and d["workdir"] == str(tmp_path)]
        assert len(mine) == 1, labs
        namespaces = set(mine[0]["hosts"].values())
        assert namespaces <= set(list_namespaces())

        def vip_of(node: str) -> str | None:
            agent_status = [sys.executable, "-m", "tui.cli", "agent", "status", "--json"]
            shown = coterie(
                "lab", "exec", "two-hosts", node, "--", *agent_status, "--state-dir", str(tmp_path / f"agent-{node}")
            )
            assert shown.returncode == 0, shown.stderr
            return json.loads(shown.stdout).get("vpns", {}).get("demo", {}).get("vip")

        assert vip_of("a"), "agent a reports no virtual address"
        vip_b = vip_of("b")
        assert vip_b, "agent b reports no virtual address"
        ping = coterie("lab", "exec", "two-hosts", "a", "--", "ping", "-c", "3", "-W", "2", vip_b, timeout=30)
        assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout
        unknown_host = coterie("lab", "exec", "two-hosts", "nosuch", "--", "true")
        assert unknown_host.returncode == 2 and "known: " in unknown_host.stderr
        again = coterie("lab", "up", "two-hosts", "--detach")
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        down = coterie("lab", "down", "two-hosts", timeout=120)
    assert down.returncode == 0 and "stopped 1 lab(s)" in down.stdout, down.stdout + down.stderr
    assert not namespaces & set(list_namespaces()), "lab down left namespaces behind"
    assert all(d["workdir"] != str(tmp_path) for d in json.loads(coterie("lab", "list", "--json").stdout))
