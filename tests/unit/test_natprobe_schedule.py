"""The NAT probe's schedule: blocked UDP is re-probed sooner, so a pair returns to UDP soon after it works again."""

from __future__ import annotations

from nodeagent.natprobe import (
    BLOCKED,
    BLOCKED_INTERVAL,
    OPEN,
    PROBE_INTERVAL,
    PROBE_TRIES,
    PROBE_WAIT,
    NatProbe,
    answer,
    parse_probe,
)


def _round_without_answers(probe: NatProbe, now: float) -> float:
    for _ in range(PROBE_TRIES):
        assert probe.due(now)
        probe.start(now)
        now += PROBE_WAIT
        probe.conclude(now)
    return now


def test_blocked_is_probed_again_after_the_short_interval() -> None:
    probe = NatProbe()
    now = _round_without_answers(probe, 0.0)
    assert probe.report.filtering == BLOCKED
    assert not probe.due(now + BLOCKED_INTERVAL - 0.1) and probe.due(now + BLOCKED_INTERVAL)


def test_open_is_probed_again_after_the_long_interval_and_soon_cuts_it_short() -> None:
    probe = NatProbe()
    nonce = parse_probe(probe.start(0.0))
    assert nonce is not None
    assert probe.on_answer(answer(nonce, 0, ("198.18.0.2", 7871))) and probe.on_answer(answer(nonce, 1, ("1.2.3.4", 1)))
    assert probe.conclude(PROBE_WAIT) and probe.report.filtering == OPEN
    assert not probe.due(PROBE_WAIT + PROBE_INTERVAL - 0.1) and probe.due(PROBE_WAIT + PROBE_INTERVAL)
    probe.soon()  # what the agent does when a UDP peer goes silent while it sends
    assert probe.due(PROBE_WAIT + 0.1)
