"""The per-source limit on forged packets (RELIABILITY.md D16): burst 5, then 20 a second, bounded table."""

from __future__ import annotations

import pytest

from nodeagent.sourcelimit import SourceLimiter


def spend(limiter: SourceLimiter, host: str, now: float, attempts: int) -> int:
    """Offer *attempts* forged packets from *host* at *now*; returns how many were let through to fail."""
    tried = 0
    for _ in range(attempts):
        if limiter.allow(host, now):
            limiter.failed(host, now)
            tried += 1
    return tried


def test_a_source_gets_its_burst_then_twenty_a_second() -> None:
    limiter = SourceLimiter()
    assert spend(limiter, "198.51.100.7", 100.0, 50) == 5
    assert spend(limiter, "198.51.100.7", 100.0, 50) == 0
    assert spend(limiter, "198.51.100.7", 100.06, 50) == 1  # 1/20 s later (and a bit): one token back
    total = sum(spend(limiter, "198.51.100.7", 100.06 + k * 0.01, 10) for k in range(1, 101))  # one second
    assert 19 <= total <= 21
    assert spend(limiter, "198.51.100.7", 200.0, 50) == 5  # idle long enough: the burst again, no more


def test_sources_are_limited_independently_and_strangers_pass() -> None:
    limiter = SourceLimiter()
    spend(limiter, "198.51.100.7", 10.0, 50)
    assert not limiter.allow("198.51.100.7", 10.0)
    assert limiter.allow("198.51.100.8", 10.0) and len(limiter) == 1  # asking costs nothing and stores nothing


def test_the_table_is_bounded_under_a_spoofed_flood() -> None:
    limiter = SourceLimiter(max_sources=1000)
    for n in range(10_000):
        limiter.failed(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 5.0)
    assert len(limiter) == 1000
    # the most recent failures are the ones kept; the oldest were forgotten (a fresh burst)
    assert spend(limiter, "10.0.39.15", 5.0, 10) == 4  # n = 9999: 5 tokens, one spent by the flood
    assert spend(limiter, "10.0.0.0", 5.0, 10) == 5  # n = 0: evicted long ago
    assert len(limiter) == 1000


@pytest.mark.parametrize("kwargs", [{"rate": 0}, {"burst": 0}, {"max_sources": 0}])
def test_nonsense_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SourceLimiter(**kwargs)  # type: ignore[arg-type]
