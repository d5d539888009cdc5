"""``python3 -m compose --cleanup-stale``: remove namespaces (and their processes) left by a killed lab.

Only labs whose owning process is gone are touched; ``--force`` removes live
ones too (other test runs on this machine may own those: use with care).
"""

from __future__ import annotations

import argparse
import os
import sys

from compose.netns import PREFIX, cleanup_stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m compose", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cleanup-stale", action="store_true", help="delete namespaces of labs whose owner is gone")
    ap.add_argument("--prefix", default=PREFIX, help=f"namespace prefix of the labs [default: {PREFIX}]")
    ap.add_argument("--force", action="store_true", help="also delete labs whose owner still runs")
    args = ap.parse_args(argv)
    if not args.cleanup_stale:
        ap.print_help()
        return 2
    if os.geteuid() != 0:
        print("compose: must run as root", file=sys.stderr)
        return 1
    removed = cleanup_stale(args.prefix, force=args.force)
    print(f"removed {len(removed)} namespace(s)" + (f": {', '.join(removed)}" if removed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
