"""bench/control.py end to end at a small scale: what it reports is true, whatever the times are.

Real server processes and 50 simulated agents (real CURVE connections in a
worker process). No time is asserted: the benchmark is where figures come
from; here every agent must converge, a one-node change must reach nobody
else, a burst must leave every agent with the view the database gives it,
and after a full server restart every agent must have resynchronised.
"""

from __future__ import annotations

import math

import pytest

from bench.control import parse_args, run, table

pytestmark = pytest.mark.timeout(600)  # a real server started twice and 50 agents, on a shared 2-core machine

AGENTS = 50


def test_small_run_converges_and_reports_every_figure() -> None:
    args = parse_args(
        [
            *("--agents", str(AGENTS), "--per-process", "100", "--changes", "4", "--burst", "100"),
            *("--timeout", "120", "--idle-window", "2"),
        ]
    )
    results = run(args)

    assert results["to_all"]["at_last_revision"] == AGENTS, "some agent never applied the last change to all"
    for figure in ("each_ms", "all_applied_ms"):
        spread = results["to_all"][figure]
        assert set(spread) == {"p50", "p99", "max"} and all(math.isfinite(v) and v > 0 for v in spread.values())
    assert results["to_one"]["updates_to_others"] == 0, "a change to b0 reached other agents"
    assert results["to_one"]["updates_to_b0"] >= results["to_one"]["changes"]
    burst = results["burst"]
    assert burst["committed"] + burst["rejected"] == 100 and burst["committed"] > 0
    assert burst["fanout_batches"] >= 1 and burst["updates_per_agent"] > 0
    assert results["restart"]["all_resynced_s"] > 0
    assert set(results["rss_kb_per_agent"]) == {"broker", "fanout", "datastore", "total"}
    for idle in (results["idle_cpu_pct"], results["idle_cpu_pct_no_agents"]):
        assert {"broker", "fanout", "datastore", "total"} <= set(idle), f"a server process is missing: {idle}"
        assert all(v >= 0 for v in idle.values()) and idle["total"] == pytest.approx(sum(idle.values()) - idle["total"])
    assert results["agent_counters"]["snapshots"] >= AGENTS  # the first ones
    restart = results["restart"]
    assert restart["resumed"] + restart["snapshots_after"] >= AGENTS, "every agent resumed or took a new snapshot"
    assert results["agent_counters"].get("bad_snapshots", 0) == 0
    text = table(results)
    labels = ("a. change to every node", "b. change to one node", "c. server RSS", "c. server CPU", "e. burst")
    for label in (*labels, "d. server restart"):
        assert label in text
