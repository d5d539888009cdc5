"""A1 at the unit level: argon2id parameters, verification, rehash; and the throttle's arithmetic."""

from __future__ import annotations

import nacl.exceptions
import nacl.pwhash
import pytest

from services.auth import limiter, passwords
from services.auth.limiter import Throttle, keys_for

WEAK_OPS = 1
WEAK_MEM = 8 * 1024 * 1024


def test_stored_hash_is_argon2id_at_or_above_owasp() -> None:
    stored = passwords.hash_password("correct horse battery")
    assert stored.startswith("$argon2id$v=19$")
    params = passwords.params_of(stored)
    assert params is not None
    assert params.m_kib >= 19 * 1024 and params.t >= 2 and params.p == 1
    assert params == passwords.CURRENT
    assert passwords.CURRENT.m_kib >= passwords.OWASP_MIN_M_KIB and passwords.CURRENT.t >= passwords.OWASP_MIN_T


def test_verify_accepts_the_password_and_nothing_else() -> None:
    stored = passwords.hash_password("correct horse battery")
    assert passwords.verify_password(stored, "correct horse battery")
    assert not passwords.verify_password(stored, "correct horse batterY")
    assert not passwords.verify_password(stored, "")
    assert not passwords.verify_password("not a hash", "correct horse battery")
    with pytest.raises(nacl.exceptions.InvalidkeyError):  # libsodium's own verdict, compared in constant time
        nacl.pwhash.argon2id.verify(stored.encode(), b"wrong")


def test_salts_differ() -> None:
    assert passwords.hash_password("same password") != passwords.hash_password("same password")


def test_weaker_parameters_need_a_rehash() -> None:
    weak = passwords.hash_password("pw-weak-params", opslimit=WEAK_OPS, memlimit=WEAK_MEM)
    assert passwords.params_of(weak) == passwords.Params(8192, 1, 1)
    assert passwords.needs_rehash(weak)
    assert passwords.verify_password(weak, "pw-weak-params"), "an old hash still verifies until it is replaced"
    assert not passwords.needs_rehash(passwords.hash_password("pw"))
    assert passwords.needs_rehash("$2b$12$bcrypt-looking")


def test_new_password_rules() -> None:
    assert passwords.check_new_password("short") is not None
    assert passwords.check_new_password("long enough") is None
    assert passwords.check_new_password("x" * 2000) is not None


def test_throttle_grows_delays_and_refuses_without_counting() -> None:
    throttle, keys = Throttle(), keys_for("alice", "")
    now = 100.0
    for _ in range(limiter.FREE_FAILURES):
        assert throttle.check(keys, now).allowed
        assert throttle.failure(keys, now) == []
    delays = []
    for _ in range(4):
        steps = throttle.failure(keys, now)
        delays.append(steps[0].delay)
        verdict = throttle.check(keys, now)
        assert not verdict.allowed and verdict.retry_after == pytest.approx(steps[0].delay)
        now += steps[0].delay
        assert throttle.check(keys, now).allowed
    assert delays == [limiter.BASE_DELAY * 2**i for i in range(4)]
    count = throttle.failures("user:alice")
    throttle.check(keys, now - 0.1)  # a refused check changes nothing
    assert throttle.failures("user:alice") == count


def test_user_delay_is_capped_and_marked_as_a_lockout_once() -> None:
    throttle, keys, now = Throttle(), keys_for("bob", ""), 0.0
    lockouts, last = 0, 0.0
    for _ in range(40):
        for step in throttle.failure(keys, now):
            lockouts += step.lockout
            last = step.delay
    assert last == limiter.USER_MAX_DELAY and lockouts == 1


def test_source_lockout_and_success_clears() -> None:
    throttle, now = Throttle(), 0.0
    keys = keys_for("carol", "10.0.0.9")
    steps = []
    for _ in range(limiter.SOURCE_LOCKOUT_AFTER):
        steps += throttle.failure(keys, now)
    source_steps = [s for s in steps if s.key == "source:10.0.0.9"]
    assert source_steps[-1].lockout and source_steps[-1].delay == limiter.SOURCE_LOCKOUT
    # Another source for the same user is only held back by the user's (much shorter) delay.
    other = keys_for("carol", "10.0.0.10")
    wait = throttle.check(other, now).retry_after
    assert 0 < wait < limiter.USER_MAX_DELAY
    assert throttle.check(other, now + wait).allowed
    assert not throttle.check(keys, now + wait).allowed
    throttle.success(other)
    assert throttle.failures("user:carol") == 0
    assert not throttle.check(keys, now + wait).allowed, "a success elsewhere does not lift the address's lockout"


def test_one_attempt_per_key_in_flight() -> None:
    throttle = Throttle()
    first = keys_for("dave", "10.0.0.1")
    assert throttle.begin(first, 0.0).allowed
    assert not throttle.begin(keys_for("erin", "10.0.0.1"), 0.0).allowed, "same address"
    assert not throttle.begin(keys_for("dave", "10.0.0.2"), 0.0).allowed, "same user"
    assert throttle.begin(keys_for("erin", "10.0.0.2"), 0.0).allowed
    throttle.end(first)
    assert throttle.begin(keys_for("dave", "10.0.0.3"), 0.0).allowed


def test_unknown_and_known_names_are_throttled_alike() -> None:
    throttle = Throttle()
    for name in ("exists", "does-not-exist"):
        for _ in range(limiter.FREE_FAILURES + 1):
            throttle.failure(keys_for(name, ""), 0.0)
    a = throttle.check(keys_for("exists", ""), 0.0)
    b = throttle.check(keys_for("does-not-exist", ""), 0.0)
    assert a == b and not a.allowed


def test_an_address_that_keeps_knocking_while_blocked_is_locked_out() -> None:
    throttle, keys = Throttle(), keys_for("frank", "10.0.0.7")
    for _ in range(limiter.FREE_FAILURES + 1):
        throttle.failure(keys, 0.0)
    verdicts = [throttle.begin(keys, 0.0) for _ in range(limiter.SOURCE_LOCKOUT_REFUSALS)]
    assert not any(v.allowed for v in verdicts)
    assert [v.lockout for v in verdicts if v.lockout] == ["source:10.0.0.7"]
    assert verdicts[-1].retry_after == pytest.approx(limiter.SOURCE_LOCKOUT)
    assert throttle.failures("user:frank") == limiter.FREE_FAILURES + 1, "unchecked refusals do not count"
    assert throttle.begin(keys_for("frank", "10.0.0.8"), limiter.USER_MAX_DELAY).allowed
