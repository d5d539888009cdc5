"""``python -m services NAME --dir DIR [--broker URL]``: how the supervisor starts a child.

Kept apart from the typer CLI so that a restarted service starts fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bus.errors import KeyFileError
from services.config import ConfigError, load_config
from services.processes import PROCESS_NAMES, run_process


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services")
    parser.add_argument("name", choices=PROCESS_NAMES)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--broker", default=None)
    parser.add_argument("--listen", default=None)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    try:
        config = load_config(args.dir).with_overrides(listen=args.listen, port=args.port)
        run_process(args.name, config, args.broker)
    except (ConfigError, KeyFileError) as exc:
        print(f"coterie {args.name}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
