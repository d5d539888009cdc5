"""bench/dataplane.py's figures from vpnbench's results: added latency per percentile, and the ratios line.

Why: the issue's data-plane targets are ratios to the best peer of the same run, and B1 asks for
p50 and p99 added latency. A ratio taken against the wrong peer, or a latency "best" taken as the
highest, would report a target met that is not.
"""

from __future__ import annotations

from typing import Any

from bench.dataplane import ratio_line, rows, table


def _result(name: str, p50: float, avg: float, p99: float, mbps: float = 0.0, pps: int = 0) -> dict[str, Any]:
    return {
        "adapter": name,
        "status": "ok",
        "ping": {"p50_ms": p50, "avg_ms": avg, "p99_ms": p99},
        "tcp1": {"mbps": mbps, "mbit_per_vpn_cpu_s": mbps / 2} if mbps else {},
        "tcpP": {"mbps": mbps} if mbps else {},
        "udp": {"rx_pps": pps} if pps else {},
    }


RESULTS = [
    _result("direct", 0.05, 0.06, 0.10, 10_000, 200_000),
    _result("coterie", 0.85, 0.96, 1.60, 1200, 60_000),
    _result("wireguard-go", 0.45, 0.56, 2.10, 600, 40_000),
    _result("nebula", 0.35, 0.66, 3.10, 500, 50_000),
]


def test_added_latency_is_the_tunnel_minus_the_underlay_at_each_percentile() -> None:
    by_vpn = {r["vpn"]: r for r in rows(RESULTS)}
    assert by_vpn["coterie"]["added_p50_ms"] == 0.8
    assert by_vpn["coterie"]["added_avg_ms"] == 0.9
    assert by_vpn["coterie"]["added_p99_ms"] == 1.5
    assert [r["vpn"] for r in rows(RESULTS)] == ["coterie", "wireguard-go", "nebula", "direct"]


def test_ratios_take_the_best_peer_per_figure() -> None:
    line = ratio_line(rows(RESULTS))
    assert "TCP 1 stream 2.00x (wireguard-go)" in line  # the fastest peer, not the first
    assert "64 B pps 1.20x (nebula)" in line
    assert "added ping p50 2.67x (nebula)" in line  # for latency the best is the lowest: 0.8 / 0.3
    assert "added ping p99 0.75x (wireguard-go)" in line  # 1.5 / 2.0
    assert line in table(rows(RESULTS))


def test_no_ratio_without_a_peer_that_measured() -> None:
    failed = [dict(RESULTS[2], status="failed")]
    assert ratio_line(rows([RESULTS[0], RESULTS[1], *failed])) == ""
    assert ratio_line(rows([RESULTS[0], RESULTS[2]])) == ""  # no Coterie row
