"""What the realms send, checked without a server: LDAP filters (RFC 4515) and RADIUS Access-Requests (RFC 2865).

RELIABILITY A3 and A4 in part; the rest, against real slapd and FreeRADIUS,
is in tests/external/test_ldap_realm.py and test_radius_realm.py.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import pytest

from services.auth.realms.ldap import LdapRealm
from services.auth.realms.radius import RadiusRealm
from services.config import LdapRealmConfig, RadiusRealmConfig
from tests.helpers.server import free_port

SECRET = "unit-secret"
SPECIALS = ["*", ")(uid=*", "alice)(|(uid=*", "\\", "\\2a", "\x00", "alice\x00)(uid=*", "(", "x)"]
ESCAPED_VALUE = re.compile(r"(?:[^\\*()\x00]|\\(?:5c|2a|28|29|00))*")


def ldap_realm(**kw: object) -> LdapRealm:
    settings = {"url": f"ldap://127.0.0.1:{free_port()}", "base_dn": "dc=example,dc=org"} | kw
    return LdapRealm(LdapRealmConfig(name="corp", **settings), Path("/"))  # type: ignore[arg-type]


def radius_realm() -> RadiusRealm:
    return RadiusRealm(RadiusRealmConfig(name="radius", server="127.0.0.1", port=free_port(), secret=SECRET))


@pytest.mark.parametrize("name", SPECIALS, ids=[repr(n) for n in SPECIALS])
def test_ldap_filter_escapes_every_special(name: str) -> None:
    realm = ldap_realm(user_filter="(objectClass=person)", user_attribute="uid")
    text = realm.search_filter(name)
    assert text.startswith("(&(objectClass=person)(uid=") and text.endswith("))")
    value = text[len("(&(objectClass=person)(uid=") : -2]
    assert ESCAPED_VALUE.fullmatch(value), value
    unescaped = re.sub(r"\\([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), value)
    assert unescaped == name  # the escaping loses nothing: the server compares exactly the name given


@pytest.mark.parametrize("password", ["", "\u00ad", "\u00ad\u034f"])
def test_ldap_empty_password_is_refused_without_any_traffic(password: str) -> None:
    """Nothing listens on the realm's port: an answer (not RealmUnavailable) proves no connection was tried."""
    verdict = ldap_realm().authenticate("alice", password)
    assert not verdict.ok and ("empty password" in verdict.reason or "SASLprep" in verdict.reason)


@pytest.mark.parametrize("password", ["", "pw\x00", "\x00pw"])
def test_radius_empty_or_nul_password_is_refused_without_any_traffic(password: str) -> None:
    realm = radius_realm()
    verdict = realm.authenticate("bob", password)
    assert not verdict.ok and verdict.reason in ("empty password", "NUL in password")


def test_radius_request_carries_a_valid_message_authenticator_first() -> None:
    request = radius_realm().build_request("bob", "pw")
    raw = request.RequestPacket()
    assert raw[0] == 1 and raw[20] == 80 and raw[21] == 18  # Access-Request; type 80, length 18, first
    zeroed = raw[:22] + bytes(16) + raw[38:]
    assert hmac.compare_digest(raw[22:38], hmac.new(SECRET.encode(), zeroed, "md5").digest())
    assert raw[4:20] == request.authenticator
    # The User-Password is hidden as RFC 2865 section 5.2 says: "pw" padded to 16, XOR MD5(secret + authenticator).
    at = raw.index(bytes([2, 18]), 38)
    hidden = raw[at + 2 : at + 18]
    pad = hashlib.md5(SECRET.encode() + request.authenticator).digest()
    assert bytes(a ^ b for a, b in zip(hidden, pad, strict=True)) == b"pw" + bytes(14)


def test_radius_request_authenticators_are_unique_over_100k_requests() -> None:
    realm = radius_realm()
    seen = {realm.build_request("bob", "pw").RequestPacket()[4:20] for _ in range(100_000)}
    assert len(seen) == 100_000
