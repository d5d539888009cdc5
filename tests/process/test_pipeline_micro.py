"""bench/pipeline_micro.py runs every stage on real DataPlanes and refuses a bad --only (no time asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "pipeline_micro.py"


def test_every_stage_reports_a_figure() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--count", "90", "--repeat", "2"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()[1:]}
    assert set(rows) == {"inbound_udp", "outbound_super_packet", "outbound_64B", "coalesce", "summarize"}
    assert all(float(figure) > 0 for figure in rows.values())


def test_an_unknown_stage_is_a_one_line_error() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "nope"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "no stage 'nope'" in done.stderr.strip().splitlines()[-1]
