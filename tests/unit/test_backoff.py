"""bus.client.Backoff: reconnect delays grow, are capped, are jittered, and start over after a success."""

from __future__ import annotations

from bus.client import Backoff


def test_delays_double_within_their_jitter_band_up_to_the_cap() -> None:
    backoff = Backoff(base=0.5, cap=4.0)
    delays = [backoff.next() for _ in range(8)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert delays[3] > delays[0], "the gaps grow"


def test_two_clients_that_failed_together_do_not_retry_together() -> None:
    first, second = Backoff(), Backoff()
    pairs = [(first.next(), second.next()) for _ in range(6)]
    assert any(abs(a - b) > 1e-6 for a, b in pairs), "no jitter: a crowd would come back in step"
    spread = {round(Backoff().next(), 6) for _ in range(50)}
    assert len(spread) > 40, "first delays of a crowd should be spread, not equal"


def test_reset_starts_over_from_the_base() -> None:
    backoff = Backoff(base=0.5, cap=8.0)
    for _ in range(5):
        backoff.next()
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5
