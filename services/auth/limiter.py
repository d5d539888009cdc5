"""Failed-login throttling per user name and per source address, with growing delays.

Pure state with an explicit monotonic ``now``: the service owns the clock.

Each key (``user:NAME`` or ``source:ADDR``) counts recent failures. The first
FREE_FAILURES cost nothing; each one after that blocks the key for a delay that
doubles, up to a cap. A source that keeps failing past SOURCE_LOCKOUT_AFTER is
locked out for SOURCE_LOCKOUT seconds, and so is one that keeps knocking while
blocked (SOURCE_LOCKOUT_REFUSALS attempts refused unchecked): a flood that
stays below the failure count because its guesses are refused is still a flood. While blocked, attempts are refused
before any password is hashed, so a flood costs a dictionary lookup, not 64 MiB
and 120 ms of a core; blocked attempts do not add to the count, so a flood
from one address cannot keep a user's own account blocked for long: the
user's delay is bounded by the failures that were really checked. A success
clears the user's count (not the address's: a guesser with one valid account
must not be able to reset its address by logging in). Counts fade after FORGET seconds
without a failure. Keys exist for any name, known or not, so throttling
says nothing about which users exist.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

FREE_FAILURES = 5  # failures per key before any delay
BASE_DELAY = 0.5  # seconds: the first delay; each further failure doubles it
USER_MAX_DELAY = 30.0  # a user's delay stops growing here (the "temporary lockout" of an account)
SOURCE_MAX_DELAY = 60.0
SOURCE_LOCKOUT_AFTER = 8  # failures from one address before it is locked out
SOURCE_LOCKOUT_REFUSALS = 100  # attempts refused while blocked before the address is locked out anyway
SOURCE_LOCKOUT = 300.0  # seconds an address stays locked out
MAX_IN_FLIGHT = 1  # attempts of one key checked at once: one address cannot take every hash slot
FORGET = 900.0  # seconds without a failure after which a key's count starts over
MAX_KEYS = 100_000  # bounded memory under a flood of distinct names or addresses


@dataclass
class _State:
    failures: int = 0
    blocked_until: float = 0.0
    last_failure: float = 0.0
    in_flight: int = 0
    refused: int = 0  # attempts refused unchecked since the last lockout


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: float = 0.0  # seconds, when not allowed
    lockout: str = ""  # the key this refusal just locked out (for the audit), if any


@dataclass(frozen=True)
class Escalation:
    """What a failure changed: a new block, and whether it is a lockout (for the audit)."""

    key: str
    delay: float
    lockout: bool


class Throttle:
    """Thread-safe: the auth service's workers share one."""

    def __init__(self) -> None:
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()

    def check(self, keys: list[str], now: float) -> Verdict:
        """May an attempt for these keys be checked now? Refused attempts change nothing."""
        with self._lock:
            wait = max((self._live(k, now).blocked_until - now for k in keys if k in self._states), default=0.0)
        return Verdict(True) if wait <= 0 else Verdict(False, wait)

    def begin(self, keys: list[str], now: float) -> Verdict:
        """Like :meth:`check`, and if allowed, count the attempt as in flight until :meth:`end`."""
        with self._lock:
            states = [self._states.setdefault(k, _State()) for k in keys]
            wait = max(self._live(k, now).blocked_until - now for k in keys)
            if wait <= 0 and not any(s.in_flight >= MAX_IN_FLIGHT for s in states):
                for state in states:
                    state.in_flight += 1
                return Verdict(True)
            return self._refuse(keys, states, max(wait, 1.0), now)

    def _refuse(self, keys: list[str], states: list[_State], wait: float, now: float) -> Verdict:
        for key, state in zip(keys, states, strict=True):
            if not key.startswith("source:"):
                continue
            state.refused += 1
            if state.refused >= SOURCE_LOCKOUT_REFUSALS:
                state.refused = 0
                state.blocked_until = max(state.blocked_until, now + SOURCE_LOCKOUT)
                return Verdict(False, state.blocked_until - now, lockout=key)
        return Verdict(False, wait)

    def end(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                state = self._states.get(key)
                if state is not None and state.in_flight:
                    state.in_flight -= 1

    def failure(self, keys: list[str], now: float) -> list[Escalation]:
        escalations = []
        with self._lock:
            if len(self._states) >= MAX_KEYS:
                self._prune(now)
            for key in keys:
                state = self._states.setdefault(key, _State())
                self._live(key, now)
                state.failures += 1
                state.last_failure = now
                over = state.failures - FREE_FAILURES
                if over <= 0:
                    continue
                source = key.startswith("source:")
                if source and state.failures >= SOURCE_LOCKOUT_AFTER:
                    delay, lockout = SOURCE_LOCKOUT, state.failures == SOURCE_LOCKOUT_AFTER
                else:
                    cap = SOURCE_MAX_DELAY if source else USER_MAX_DELAY
                    delay = min(BASE_DELAY * 2 ** (over - 1), cap)
                    lockout = delay == cap and BASE_DELAY * 2 ** (over - 2) < cap
                state.blocked_until = max(state.blocked_until, now + delay)
                escalations.append(Escalation(key, delay, lockout))
        return escalations

    def success(self, keys: list[str]) -> None:
        with self._lock:
            for key in (k for k in keys if k.startswith("user:")):
                state = self._states.get(key)
                if state is not None:
                    state.failures, state.blocked_until = 0, 0.0

    def failures(self, key: str) -> int:
        with self._lock:
            state = self._states.get(key)
            return state.failures if state else 0

    def _live(self, key: str, now: float) -> _State:
        state = self._states[key] if key in self._states else _State()
        if state.failures and now - state.last_failure > FORGET and now >= state.blocked_until:
            state.failures, state.blocked_until = 0, 0.0
        return state

    def _prune(self, now: float) -> None:
        stale = [
            k
            for k, s in self._states.items()
            if not s.in_flight and now >= s.blocked_until and now - s.last_failure > BASE_DELAY
        ]
        for key in stale[: max(len(stale), len(self._states) - MAX_KEYS // 2)]:
            del self._states[key]


def keys_for(user: str, source: str) -> list[str]:
    keys = [f"user:{user.lower()}"]
    if source:
        keys.append(f"source:{source}")
    return keys
