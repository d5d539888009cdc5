"""One log format for every server process: time, level, process name and pid, logger."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(process: str, level: str | None = None) -> None:
    level = level or os.environ.get("COTERIE_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {process}[%(process)d] %(name)s: %(message)s",
        force=True,
    )
