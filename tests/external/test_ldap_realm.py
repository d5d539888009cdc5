"""The LDAP realm against a real OpenLDAP slapd (RELIABILITY A3): binds, injection, TLS, a server that is down.

One slapd serves the module (plain ldap:// with StartTLS, and ldaps://, with
a certificate from a CA the test makes); the tests that stop a server start
their own. The directory holds alice, carol (whose uid needs escaping in a
DN), two entries named twin (an ambiguous name) and a read-only service
account.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.auth.realms import RealmUnavailable
from services.auth.realms.ldap import LdapRealm
from services.config import LdapRealmConfig
from tests.helpers.server import free_port
from tests.helpers.slapd import READER_DN, SUFFIX, Slapd, SlapdUnavailable, TlsFiles, make_tls_files, person

PASSWORDS = {"alice": "alice's secret", "carol,x+y": "carol-pw", "twin": "twin-pw"}
BOUND = 15.0  # seconds: "no hang" means well inside this, whatever the machine's load

LDIF = "\n".join(
    [
        person("alice", PASSWORDS["alice"]),
        person("carol,x+y", PASSWORDS["carol,x+y"], rdn_value=r"carol\,x\+y"),
        person("twin", PASSWORDS["twin"]),
        f"dn: ou=staff,{SUFFIX}\nobjectClass: organizationalUnit\nou: staff\n",
        person("twin", PASSWORDS["twin"], ou="staff"),
    ]
)

ESCAPED_VALUE = re.compile(r"(?:[^\\*()\x00]|\\(?:5c|2a|28|29|00))*")
INJECTIONS = [
    "*",
    "a*",
    "alice*",
    "*)(uid=*",
    ")(uid=*",
    "alice)(uid=*",
    "alice)(|(uid=*",
    "*))(|(objectClass=*",
    "\\",
    "alice\\",
    "\\2a",
    "\x00",
    "alice\x00",
    "alice\x00)(uid=*",
]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[Slapd]:
    try:
        server = Slapd(tmp_path_factory.mktemp("slapd"), LDIF, tls=tls)
    except SlapdUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server.start()
    finally:
        server.stop()


def realm(url: str, **kw: object) -> LdapRealm:
    settings = {"timeout": 2.0} | kw
    return LdapRealm(LdapRealmConfig(name="corp", url=url, base_dn=SUFFIX, **settings), Path("/"))


SERVICE = {"bind_dn": READER_DN, "bind_password": "reader-pw"}


# ------------------------------------------------------------------ binds
@pytest.mark.parametrize("service", [False, True], ids=["anonymous-search", "service-bind"])
def test_success_and_wrong_password(slapd: Slapd, service: bool) -> None:
    subject = realm(slapd.url, **(SERVICE if service else {}))
    accepted = subject.authenticate("alice", PASSWORDS["alice"])
    assert accepted.ok and accepted.reason == "accepted"
    wrong = subject.authenticate("alice", PASSWORDS["alice"] + "x")
    assert not wrong.ok and "invalid credentials" in wrong.reason
    unknown = subject.authenticate("mallory", PASSWORDS["alice"])
    assert not unknown.ok and unknown.reason == "no such user"


def test_user_whose_dn_needs_escaping(slapd: Slapd) -> None:
    """The DN comes from the server, escaped as it stores it (uid=carol\\,x\\+y): bind works, no DN built by us."""
    subject = realm(slapd.url)
    assert subject.authenticate("carol,x+y", PASSWORDS["carol,x+y"]).ok
    assert not subject.authenticate("carol,x+y", PASSWORDS["alice"]).ok
    assert not subject.authenticate("carol", PASSWORDS["carol,x+y"]).ok


def test_ambiguous_name_is_refused(slapd: Slapd) -> None:
    verdict = realm(slapd.url).authenticate("twin", PASSWORDS["twin"])
    assert not verdict.ok and verdict.reason.startswith("ambiguous")


def test_operator_filter_narrows_the_search(slapd: Slapd) -> None:
    subject = realm(slapd.url, user_filter="(ou=nobody-has-this)")
    assert subject.authenticate("alice", PASSWORDS["alice"]).reason == "no such user"


def test_wrong_service_password_is_unavailable_not_a_rejection(slapd: Slapd) -> None:
    subject = realm(slapd.url, bind_dn=READER_DN, bind_password="wrong")
    with pytest.raises(RealmUnavailable, match="service bind refused"):
        subject.authenticate("alice", PASSWORDS["alice"])


# ------------------------------------------------------------------ empty password, injection
def test_server_would_take_an_unauthenticated_bind(slapd: Slapd) -> None:
    """The hazard the realm guards against is real on this server: DN + empty password binds (as anonymous)."""
    ldapwhoami = shutil.which("ldapwhoami")
    if ldapwhoami is None:
        pytest.skip("ldapwhoami not installed (Debian package ldap-utils)")
    dn = f"uid=alice,ou=people,{SUFFIX}"
    result = subprocess.run(
        [ldapwhoami, "-x", "-H", slapd.url, "-D", dn, "-w", ""], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout.strip() == "anonymous", result


def test_empty_password_is_refused_before_any_bind(slapd: Slapd) -> None:
    verdict = realm(slapd.url).authenticate("alice", "")
    assert not verdict.ok and verdict.reason == "empty password"
    # Before any traffic at all: against a port where nothing listens it still answers, instead of raising.
    assert realm(f"ldap://127.0.0.1:{free_port()}").authenticate("alice", "").reason == "empty password"


@pytest.mark.parametrize("password", ["\u00ad", "\u00ad\u034f\u180b", "\x00", "\x00" + PASSWORDS["alice"]])
def test_password_saslprep_maps_to_nothing_or_refuses_is_a_rejection(slapd: Slapd, password: str) -> None:
    """SASLprep (RFC 4013) maps soft hyphens and the like to nothing: never an empty bind, never 'unavailable'."""
    verdict = realm(slapd.url).authenticate("alice", password)
    assert not verdict.ok and ("empty password" in verdict.reason or "SASLprep" in verdict.reason), verdict


def test_saslprep_maps_the_password_as_rfc_4013_says(slapd: Slapd) -> None:
    """A soft hyphen inside a password maps to nothing, so it binds as the password without it."""
    password = PASSWORDS["alice"]
    assert realm(slapd.url).authenticate("alice", password[:3] + "\u00ad" + password[3:]).ok


@pytest.mark.parametrize("name", INJECTIONS, ids=[repr(n) for n in INJECTIONS])
@pytest.mark.parametrize("service", [False, True], ids=["anonymous-search", "service-bind"])
def test_filter_characters_match_nothing(slapd: Slapd, name: str, service: bool) -> None:
    subject = realm(slapd.url, **(SERVICE if service else {}))
    for password in (PASSWORDS["alice"], PASSWORDS["twin"], "reader-pw"):
        verdict = subject.authenticate(name, password)
        assert not verdict.ok and verdict.reason == "no such user", (name, verdict)
    escaped = subject.search_filter(name)[len("(&(objectClass=*)(uid=") : -2]
    assert ESCAPED_VALUE.fullmatch(escaped), escaped  # RFC 4515: no bare special, every backslash an escape


# ------------------------------------------------------------------ TLS
def test_starttls_and_ldaps(slapd: Slapd, tls: TlsFiles) -> None:
    for subject in (
        realm(slapd.url, starttls=True, ca_file=str(tls.ca_cert)),
        realm(slapd.ldaps_url, ca_file=str(tls.ca_cert)),
        realm(slapd.url, starttls=True, ca_file=str(tls.ca_cert), **SERVICE),
    ):
        assert subject.authenticate("alice", PASSWORDS["alice"]).ok
        assert not subject.authenticate("alice", "wrong").ok


def test_tls_with_an_untrusted_certificate_is_unavailable(slapd: Slapd, tmp_path: Path) -> None:
    other_ca = make_tls_files(tmp_path, "other").ca_cert
    for subject in (
        realm(slapd.url, starttls=True, ca_file=str(other_ca)),
        realm(slapd.ldaps_url, ca_file=str(other_ca)),
    ):
        with pytest.raises(RealmUnavailable):
            subject.authenticate("alice", PASSWORDS["alice"])


# ------------------------------------------------------------------ server down
def test_nothing_listening_is_unavailable_quickly() -> None:
    started = time.monotonic()
    with pytest.raises(RealmUnavailable):
        realm(f"ldap://127.0.0.1:{free_port()}").authenticate("alice", PASSWORDS["alice"])
    assert time.monotonic() - started < BOUND


def test_server_that_never_answers_is_unavailable_within_its_timeout() -> None:
    """A listener that accepts (in the kernel's backlog) and never speaks: the receive timeout ends the wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"ldap://127.0.0.1:{silent.getsockname()[1]}"
        for subject in (realm(url, timeout=1.0), realm(url, timeout=1.0, starttls=True)):
            started = time.monotonic()
            with pytest.raises(RealmUnavailable):
                subject.authenticate("alice", PASSWORDS["alice"])
            assert time.monotonic() - started < BOUND


def test_server_stopped_then_restarted(tmp_path: Path) -> None:
    try:
        server = Slapd(tmp_path / "slapd", LDIF)
    except SlapdUnavailable as exc:
        pytest.skip(str(exc))
    try:
        subject = realm(server.start().url)
        assert subject.authenticate("alice", PASSWORDS["alice"]).ok
        server.stop()
        started = time.monotonic()
        with pytest.raises(RealmUnavailable):
            subject.authenticate("alice", PASSWORDS["alice"])
        assert time.monotonic() - started < BOUND
        server.start()  # same port and database
        assert subject.authenticate("alice", PASSWORDS["alice"]).ok  # at once: no address remembered as dead
    finally:
        server.stop()
