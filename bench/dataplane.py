"""Data-plane benchmark: Coterie beside the peer VPNs that are installed, on the same namespaces, in one run.

Usage (as root)::

    python3 bench/dataplane.py --seconds 5 [--peers wireguard-go,nebula] [--json PATH] [--vpnbench PATH]

It runs the shared harness (../shared/bench/vpnbench from the project root,
or --vpnbench) with this project's adapter, bench/adapters/coterie. vpnbench
only reads adapters from its own folder, so the harness is run from a
temporary copy of its directory with our adapter linked in: ../shared is
never modified. vpnbench builds a fresh A - R - B topology per VPN, brings
the tunnel up, verifies the traffic really went through it, and measures.

The table printed: per VPN, TCP Mbit/s with 1 and 4 streams, ping avg/p99
through the tunnel and the same minus the underlay's (the ``direct`` row,
which is always measured), UDP 64-byte packets per second, and megabits per
CPU-second of the VPN's processes (1 stream / 4 streams).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VPNBENCH = ROOT.parent / "shared" / "bench" / "vpnbench"
OUR_ADAPTER = ROOT / "bench" / "adapters" / "coterie"
BASELINE = "direct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 seconds per test (default 5)")
    ap.add_argument("--peers", help="comma-separated peer adapters; none: only Coterie (default: every installed peer)")
    ap.add_argument("--json", type=Path, help="write the table's rows and vpnbench's full JSON here")
    ap.add_argument(
        "--vpnbench", type=Path, default=DEFAULT_VPNBENCH, help=f"the harness [default: {DEFAULT_VPNBENCH}]"
    )
    ap.add_argument("--mtu", type=int, default=1400, help="overlay MTU for every VPN (default 1400)")
    ap.add_argument(
        "--setup-timeout", type=float, default=90, help="s from `up` to the first ping through the tunnel (default 90)"
    )
    ap.add_argument(
        "--path",
        choices=("auto", "udp", "esp", "tcp443", "relay"),
        default="auto",
        help="the agents' path (default auto: the server's; tcp443/relay: a pin on node b)",
    )
    ap.add_argument("--wire", action="store_true", help="wire-like wan (router segments GSO); see vpnbench --help")
    ap.add_argument("--no-udp", action="store_true", help="skip the UDP packet-rate test")
    ap.add_argument("--pings", type=int, default=20, help="pings for the RTT, 50 ms apart (default 20)")
    ap.add_argument("--repeat", type=int, default=1, help="run everything N times and print medians (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep vpnbench's work directory (logs, configs)")
    args = ap.parse_args(argv)
    if not 1 <= args.seconds <= 600 or not 1 <= args.repeat <= 20 or not 1 <= args.pings <= 1000:
        ap.error("--seconds must be 1..600, --repeat 1..20, --pings 1..1000")
    return args


def installed_peers(bench_dir: Path) -> list[str]:
    """Adapters of the shared harness whose Debian packages are all installed (ours and the baseline aside)."""
    names = []
    for path in sorted((bench_dir / "adapters").iterdir()):
        if path.name.startswith(("_", ".")) or path.name in ("coterie", BASELINE) or not os.access(path, os.X_OK):
            continue
        packages = subprocess.run([str(path), "packages"], capture_output=True, text=True, timeout=10).stdout.split()
        if all(_installed(p) for p in packages):
            names.append(path.name)
    return names


def _installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", package], capture_output=True, text=True, timeout=10)
    return "install ok installed" in proc.stdout


def copy_harness(vpnbench: Path, into: Path) -> Path:
    """A private copy of the harness directory with bench/adapters/coterie linked in; returns the new vpnbench."""
    source = vpnbench.resolve().parent
    target = into / "bench"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("results", "*.md", "__pycache__"))
    adapter = target / "adapters" / "coterie"
    adapter.unlink(missing_ok=True)
    adapter.symlink_to(OUR_ADAPTER)
    return target / vpnbench.name


def run_vpnbench(harness: Path, names: list[str], args: argparse.Namespace, json_out: Path) -> int:
    argv = [
        sys.executable,
        str(harness),
        "--peers",
        ",".join(names),
        "--seconds",
        str(args.seconds),
        "--mtu",
        str(args.mtu),
        "--json",
        str(json_out),
        "--setup-timeout",
        str(args.setup_timeout),
        "--pings",
        str(args.pings),
    ]
    argv += [] if args.no_udp else ["--udp"]
    argv += ["--wire"] if args.wire else []
    argv += ["--keep"] if args.keep else []
    env = {**os.environ, "VB_COTERIE_ROOT": str(ROOT), "VB_COTERIE_PY": sys.executable, "VB_COTERIE_PATH": args.path}
    # vpnbench prints its own markdown table on stdout; ours replaces it, its progress stays on stderr
    timeout = len(names) * (args.seconds * 3 + 400) + 60
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, timeout=timeout)
    return proc.returncode


def rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per VPN with the figures of the table; ping also relative to the underlay (``direct``)."""
    base = next((r.get("ping", {}) for r in results if r["adapter"] == BASELINE), {})
    out = []
    for r in results:
        ping, t1, tp, udp = r.get("ping", {}), r.get("tcp1", {}), r.get("tcpP", {}), r.get("udp", {})
        added = {k: _minus(ping.get(k), base.get(k)) for k in ("p50_ms", "avg_ms", "p99_ms")}
        out.append(
            {
                "vpn": r["adapter"],
                "status": r["status"],
                "reason": r.get("reason") or "; ".join(r.get("notes", [])),
                "setup_s": r.get("setup_s"),
                "tcp1_mbps": t1.get("mbps"),
                "tcp4_mbps": tp.get("mbps"),
                "ping_p50_ms": ping.get("p50_ms"),
                "ping_avg_ms": ping.get("avg_ms"),
                "ping_p99_ms": ping.get("p99_ms"),
                "added_p50_ms": added["p50_ms"],
                "added_avg_ms": added["avg_ms"],
                "added_p99_ms": added["p99_ms"],
                "udp64_pps": udp.get("rx_pps"),
                "mbit_per_cpu_s_1": t1.get("mbit_per_vpn_cpu_s"),
                "mbit_per_cpu_s_4": tp.get("mbit_per_vpn_cpu_s"),
            }
        )
    return _ordered(out)


def _ordered(table_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Coterie first, then the peers, then the baseline: the comparison reads top-down."""
    order = {"coterie": 0, BASELINE: 2}
    return sorted(table_rows, key=lambda row: order.get(row["vpn"], 1))


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per VPN, the median of each figure over the runs in which it was measured; a status other than ok wins."""
    merged = []
    names = list(dict.fromkeys(r["vpn"] for run in runs for r in run))
    for name in names:
        same = [r for run in runs for r in run if r["vpn"] == name]
        first = same[0]
        row = dict(first)
        for key, value in first.items():
            if key not in ("vpn", "status", "reason") and (value is None or isinstance(value, int | float)):
                values = [r[key] for r in same if r.get(key) is not None]
                row[key] = statistics.median(values) if values else None
        bad = [r for r in same if r["status"] != "ok"]
        if bad:
            row["status"] = bad[0]["status"] + (f" ({len(bad)}/{len(same)} runs)" if len(same) > 1 else "")
            row["reason"] = bad[0]["reason"]
        merged.append(row)
    return _ordered(merged)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _f(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(table_rows: list[dict[str, Any]]) -> str:
    header = [
        "VPN",
        "status",
        "TCP Mbit/s 1 / 4 streams",
        "ping p50 / avg / p99 ms",
        "added ping p50 / avg / p99 ms",
        "UDP 64 B pps",
        "Mbit per CPU-s 1 / 4",
        "setup s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table_rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["vpn"],
                    r["status"],
                    f"{_f(r['tcp1_mbps'])} / {_f(r['tcp4_mbps'])}",
                    " / ".join(_f(r.get(f"ping_{k}_ms"), 3) for k in ("p50", "avg", "p99")),
                    "-"
                    if r["vpn"] == BASELINE
                    else " / ".join(_f(r.get(f"added_{k}_ms"), 3) for k in ("p50", "avg", "p99")),
                    _f(r["udp64_pps"]),
                    f"{_f(r['mbit_per_cpu_s_1'])} / {_f(r['mbit_per_cpu_s_4'])}",
                    _f(r["setup_s"], 2),
                ]
            )
            + " |"
        )
    notes = [f"- {r['vpn']} ({r['status']}): {r['reason']}" for r in table_rows if r["reason"]]
    ratios = ratio_line(table_rows)
    return "\n".join(lines + ([ratios] if ratios else []) + (["", "Notes:", *notes] if notes else []))


# Figures compared with the best peer's: for each, whether more is better (throughput) or less (latency).
_RATIO_FIGURES = (
    ("TCP 1 stream", "tcp1_mbps", True),
    ("TCP 4 streams", "tcp4_mbps", True),
    ("64 B pps", "udp64_pps", True),
    ("Mbit per CPU-s 1 stream", "mbit_per_cpu_s_1", True),
    ("added ping p50", "added_p50_ms", False),
    ("added ping avg", "added_avg_ms", False),
    ("added ping p99", "added_p99_ms", False),
)


def ratio_line(table_rows: list[dict[str, Any]]) -> str:
    """Coterie's figures divided by the best peer's of the same run (for latency the best is the lowest):
    the issue's targets are such ratios. Empty without Coterie or a peer that measured."""
    coterie = next((r for r in table_rows if r["vpn"] == "coterie" and r["status"].startswith("ok")), None)
    peers = [r for r in table_rows if r["vpn"] not in ("coterie", BASELINE) and r["status"].startswith("ok")]
    if coterie is None or not peers:
        return ""
    parts = []
    for label, key, more_is_better in _RATIO_FIGURES:
        values = [(r[key], r["vpn"]) for r in peers if r.get(key)]
        if not values or not coterie.get(key):
            continue
        best, who = max(values) if more_is_better else min(values)
        parts.append(f"{label} {coterie[key] / best:.2f}x ({who})")
    return "" if not parts else "\nCoterie / best peer: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("dataplane: must run as root (it builds network namespaces)", file=sys.stderr)
        return 1
    if not args.vpnbench.is_file():
        print(f"dataplane: no vpnbench at {args.vpnbench} (give --vpnbench PATH)", file=sys.stderr)
        return 1
    if args.peers is not None:
        skip = ("coterie", BASELINE, "none")
        peers = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() not in skip]
    else:
        peers = installed_peers(args.vpnbench.resolve().parent)
    names = [BASELINE, "coterie", *peers]
    docs, code = [], 0
    for run in range(args.repeat):
        if args.repeat > 1:
            print(f"dataplane: run {run + 1} of {args.repeat}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="coterie-dataplane-") as tmp:
            harness = copy_harness(args.vpnbench, Path(tmp))
            json_out = Path(tmp) / "vpnbench.json"
            code = run_vpnbench(harness, names, args, json_out) or code
            if json_out.exists():
                docs.append(json.loads(json_out.read_text()))
    if not docs:
        print(f"dataplane: vpnbench wrote no results (exit {code})", file=sys.stderr)
        return code or 1
    doc = docs[0]
    table_rows = median_rows([rows(d["results"]) for d in docs])
    meta = doc["meta"]
    machine = meta["machine"]
    print(
        f"\nCoterie data plane, {meta['started_utc']}: {machine['nproc']} x {machine['cpu_model']}, "
        f"kernel {machine['kernel']}; iperf3 -t {args.seconds}, overlay MTU {args.mtu}"
        + (", wire-like wan" if args.wire else "")
        + (f"; medians of {len(docs)} runs" if len(docs) > 1 else "")
        + "\n"
    )
    print(table(table_rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": table_rows, "vpnbench": docs}, indent=2) + "\n")
        print(f"\nJSON: {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
