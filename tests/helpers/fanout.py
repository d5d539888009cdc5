"""A FanoutService built on a real SQLite database but never connected: its methods are called directly.

For tests of the fanout's decisions (presence, batches) with explicit clocks and callers, without a broker.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nacl.signing import SigningKey

from bus.keys import KeyPair
from services.fanout.service import FanoutService


@contextmanager
def unconnected_fanout(tmp_path: Path, *, presence_timeout: float, heartbeat_budget: float) -> Iterator[FanoutService]:
    """The service on ``tmp_path/coterie.db`` (which it migrates itself), its ZeroMQ contexts ended afterwards."""
    url = f"sqlite:///{tmp_path / 'coterie.db'}"
    service = FanoutService(
        "tcp://127.0.0.1:9",
        KeyPair.generate(),
        KeyPair.generate().public,
        database_url=url,
        signing_key=SigningKey.generate(),
        presence_timeout=presence_timeout,
        heartbeat_budget=heartbeat_budget,
    )
    try:
        yield service
    finally:
        service.head_probe.close()
        service.beats.context.term()
        service.context.term()
