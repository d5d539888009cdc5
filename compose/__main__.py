"""``python3 -m compose``: start a lab from a topology file, find it, run commands in it, stop it.

    python3 -m compose up compose/labs/demo.toml        # foreground; Ctrl-C or `down` stops it
    python3 -m compose list
    python3 -m compose exec compose/labs/demo.toml pat2a -- ping -c1 100.64.0.1
    python3 -m compose down compose/labs/demo.toml
    python3 -m compose --cleanup-stale                  # after a SIGKILLed lab

``up`` is compose.demo with a file: it publishes the running lab in
/run/coterie-lab/<tag>.json, which ``exec``, ``down`` and ``list`` read.
``down`` asks the lab's own process to stop (SIGTERM), so the cleanup is
the one that process does; only if it does not end in time does
``cleanup_stale`` remove what is left. ``coterie lab`` (tui/cli/lab.py)
delegates to these functions.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from compose.netns import OWNER_DIR, PREFIX, cleanup_stale, pid_alive


def running_labs() -> list[dict[str, Any]]:
    """Published labs whose owner process still runs."""
    labs = []
    for path in sorted(OWNER_DIR.glob("*.json")) if OWNER_DIR.is_dir() else []:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(int(doc.get("pid", 0))):
            labs.append(doc)
    return labs


def labs_of(file: Path) -> list[dict[str, Any]]:
    return [doc for doc in running_labs() if doc.get("file") == str(file.resolve())]


def namespace(doc: dict[str, Any], name: str) -> str | None:
    """The namespace of host or node *name* in a published lab."""
    host = doc.get("nodes", {}).get(name, name)
    return doc.get("hosts", {}).get(host)


def cmd_down(file: Path, timeout: float = 60) -> int:
    labs = labs_of(file)
    if not labs:
        print(f"compose: no running lab of {file}", file=sys.stderr)
        return 1
    for doc in labs:
        os.kill(int(doc["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(int(d["pid"])) for d in labs):
        time.sleep(0.2)
    left = cleanup_stale(PREFIX)  # only labs whose owner is gone: ours now, if any remains
    print(f"stopped {len(labs)} lab(s)" + (f"; removed leftovers {', '.join(left)}" if left else ""))
    return 0


def cmd_exec(file: Path, name: str, cmd: list[str]) -> int:
    labs = labs_of(file)
    if not labs:
        print(f"compose: no running lab of {file}", file=sys.stderr)
        return 1
    ns = namespace(labs[0], name)
    if ns is None:
        known = sorted({*labs[0].get("hosts", {}), *labs[0].get("nodes", {})})
        print(f"compose: no host or node {name!r} in that lab; known: {', '.join(known)}", file=sys.stderr)
        return 1
    if not cmd:
        print("compose: exec needs a command after --", file=sys.stderr)
        return 2
    return subprocess.call(["ip", "netns", "exec", ns, *cmd])


def cmd_list() -> int:
    for doc in running_labs():
        nodes = ", ".join(f"{n}={h}" for n, h in doc.get("nodes", {}).items())
        print(f"{doc['tag']}  pid {doc['pid']}  {doc.get('file', '-')}  {doc['workdir']}  nodes: {nodes or '-'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        rest, argv = argv[argv.index("--") + 1 :], argv[: argv.index("--")]
    ap = argparse.ArgumentParser(prog="python3 -m compose", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cleanup-stale", action="store_true", help="delete namespaces of labs whose owner is gone")
    ap.add_argument("--prefix", default=PREFIX, help=f"namespace prefix for --cleanup-stale [default: {PREFIX}]")
    ap.add_argument("--force", action="store_true", help="--cleanup-stale: also labs whose owner still runs")
    sub = ap.add_subparsers(dest="command")
    up = sub.add_parser("up", help="build the topology file's lab, start server and agents; wait for Ctrl-C")
    up.add_argument("file", type=Path)
    for name in ("down", "exec"):
        sub.add_parser(name).add_argument("file", type=Path)
    sub.choices["exec"].add_argument("host", help="a host (h0a, box1, r) or node (pat2a) name")
    sub.add_parser("list", help="running labs")
    args, extra = ap.parse_known_args(argv)
    if os.geteuid() != 0:
        print("compose: must run as root (network namespaces)", file=sys.stderr)
        return 1
    if args.cleanup_stale:
        removed = cleanup_stale(args.prefix, force=args.force)
        print(f"removed {len(removed)} namespace(s)" + (f": {', '.join(removed)}" if removed else ""))
        return 0
    if args.command == "up":
        from compose.demo import main as demo_main

        return demo_main(["--file", str(args.file), *extra])
    if extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "down":
        return cmd_down(args.file)
    if args.command == "exec":
        return cmd_exec(args.file, args.host, rest)
    if args.command == "list":
        return cmd_list()
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
