"""`coterie bench`: wrong options are a one-line error and exit 2, before any server or namespace starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def coterie(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["control", "--agents", "0"], "--agents"),
        (["control", "--agents", "20000"], "--agents"),
        (["control", "--changes", "3"], "must be even"),
        (["control", "--per-process", "10"], "--per-process"),
        (["control", "--heartbeat", "0"], "--heartbeat"),
        (["control", "--db", "mysql"], "--db"),
        (["control", "--dsn", "postgresql://x/y"], "needs --db postgres"),
        (["control", "--burst", "-1"], "--burst"),
        (["control", "--idle-window", "0"], "--idle-window"),
        (["dataplane", "--path", "bogus"], "--path"),
        (["dataplane", "--seconds", "0"], "--seconds"),
        (["dataplane", "--repeat", "21"], "--repeat"),
        (["nosuch"], "nosuch"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(args: list[str], words: str) -> None:
    result = coterie(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("coterie: error:") and result.stderr.count("\n") == 1, result.stderr
    assert words in result.stderr
    assert result.stdout == ""


def test_bench_without_a_command_shows_both_benchmarks() -> None:
    result = coterie()
    assert result.returncode == 2
    assert "control" in result.stdout and "dataplane" in result.stdout


def test_dataplane_needs_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """As an ordinary user the command refuses at once. CI runs as root, so the user id is the one thing
    faked here (in-process), so that the refusal is checked on every run instead of skipped."""
    if os.geteuid() != 0:
        result = coterie("dataplane", "--seconds", "1")
        assert result.returncode == 2 and "needs root" in result.stderr and result.stderr.count("\n") == 1
        return
    from tui.cli.app import main as cli_main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sys, "argv", ["coterie", "bench", "dataplane", "--seconds", "1"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "needs root" in err and err.count("\n") == 1, err
