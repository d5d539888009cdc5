"""Password hashing: argon2id through libsodium (pynacl), with parameters that only go up.

Parameters: t = 3 passes over m = 64 MiB, p = 1 (libsodium's only choice).
OWASP's Password Storage Cheat Sheet (2024) asks for at least m = 19 MiB,
t = 2, p = 1, or an equivalent trade; we sit above it on both axes. Measured
here (2 cores, shared): ~120 ms per hash, inside the 50-250 ms that B3 targets,
so a login costs a user little and a guesser 120 ms of a core per guess.
Memory is the price: each hash in flight holds 64 MiB, which is why the auth
service bounds how many run at once (service.HASH_SLOTS).

Stored hashes are libsodium's encoded strings (``$argon2id$v=19$m=...,t=...,p=1$salt$hash``),
so each carries its own parameters; a hash made with weaker ones is replaced
at the next successful login (:func:`needs_rehash`). Verification is
libsodium's crypto_pwhash_str_verify, which compares in constant time.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import nacl.exceptions
import nacl.pwhash

OPSLIMIT = 3  # t: passes
MEMLIMIT = 64 * 1024 * 1024  # m: bytes (65536 KiB in the encoded string)
OWASP_MIN_T = 2
OWASP_MIN_M_KIB = 19 * 1024
MAX_PASSWORD_BYTES = 1024  # longer input is refused before hashing (hashing cost is independent, parsing is not)

_ENCODED = re.compile(rb"^\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$")


@dataclass(frozen=True)
class Params:
    """argon2id cost parameters as stored: m in KiB, t passes, p lanes."""

    m_kib: int
    t: int
    p: int


CURRENT = Params(MEMLIMIT // 1024, OPSLIMIT, 1)


def hash_password(password: str, *, opslimit: int = OPSLIMIT, memlimit: int = MEMLIMIT) -> str:
    """An encoded argon2id hash of *password* with a fresh random salt (weaker params: tests only)."""
    return nacl.pwhash.argon2id.str(password.encode(), opslimit=opslimit, memlimit=memlimit).decode("ascii")


def verify_password(stored: str, password: str) -> bool:
    """True if *password* matches *stored*; False for a mismatch or a hash that is not argon2id."""
    try:
        return bool(nacl.pwhash.argon2id.verify(stored.encode("ascii"), password.encode()))
    except (nacl.exceptions.InvalidkeyError, ValueError, UnicodeError):
        return False


def params_of(stored: str) -> Params | None:
    match = _ENCODED.match(stored.encode("ascii", "replace"))
    if match is None:
        return None
    m, t, p = (int(g) for g in match.groups())
    return Params(m, t, p)


def needs_rehash(stored: str) -> bool:
    """True when *stored* was made with weaker parameters than today's (or is not argon2id at all)."""
    params = params_of(stored)
    return params is None or params.m_kib < CURRENT.m_kib or params.t < CURRENT.t


def check_new_password(password: str) -> str | None:
    """Why *password* may not be set, or None. Length only: NIST SP 800-63B asks no composition rules."""
    if len(password) < 8:
        return "a password needs at least 8 characters"
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        return f"a password may have at most {MAX_PASSWORD_BYTES} bytes"
    return None


@functools.cache
def dummy_hash() -> str:
    """Unknown users are checked against this, so that they cost what a real user costs (no enumeration by
    timing). Made on first use: every server process imports this module, only auth needs it."""
    return hash_password("coterie dummy password, never set for anyone")
