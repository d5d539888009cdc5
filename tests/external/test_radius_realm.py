"""The RADIUS realm against a real FreeRADIUS (RELIABILITY A4), and against forged replies from a fake responder.

(The request's own format, and the uniqueness of Request Authenticators over
10^5 requests, need no server: tests/unit/test_realm_requests.py.)

Positive cases (Accept, Reject, wrong secret, unsigned replies) use a
FreeRADIUS started by the test. FreeRADIUS never sends a bad reply, so the
negative cases (no Message-Authenticator, a wrong one, a wrong Response
Authenticator, a wrong Identifier, an unsolicited Proxy-State) use a tiny
UDP responder in a thread that builds replies byte by byte from RFC 2865
section 3 and RFC 3579 section 3.2, independently of pyrad.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.auth.realms import RealmUnavailable
from services.auth.realms.radius import RadiusRealm
from services.config import RadiusRealmConfig
from tests.helpers.freeradius import FreeRadius, FreeRadiusUnavailable
from tests.helpers.server import free_port

SECRET = "t3sting-secret"
USERS = {"bob": "b0b's pass", "dave": "dave-pw"}
ACCEPT, REJECT = 2, 3
BOUND = 15.0  # seconds: "no hang" means well inside this, whatever the machine's load


def _radius(tmp: Path, **kw: object) -> Iterator[FreeRadius]:
    try:
        server = FreeRadius(tmp, SECRET, USERS, **kw)  # type: ignore[arg-type]
    except FreeRadiusUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def radius(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FreeRadius]:
    yield from _radius(tmp_path_factory.mktemp("radius"))


def realm(port: int, secret: str = SECRET, **kw: object) -> RadiusRealm:
    settings = {"timeout": 1.0, "retries": 1} | kw
    return RadiusRealm(RadiusRealmConfig(name="radius", server="127.0.0.1", port=port, secret=secret, **settings))


# ------------------------------------------------------------------ real FreeRADIUS
def test_access_accept(radius: FreeRadius) -> None:
    verdict = realm(radius.port).authenticate("bob", USERS["bob"])
    assert verdict.ok and verdict.reason == "accepted"


def test_access_reject_for_a_wrong_password_and_an_unknown_user(radius: FreeRadius) -> None:
    subject = realm(radius.port)
    for user, password in (("bob", "not bob's"), ("nobody", "whatever"), ("bob", USERS["dave"])):
        verdict = subject.authenticate(user, password)
        assert not verdict.ok and verdict.reason.startswith("rejected"), (user, verdict)
    assert not subject.drops


def test_empty_password_is_refused_without_asking(radius: FreeRadius) -> None:
    verdict = realm(radius.port).authenticate("bob", "")
    assert not verdict.ok and verdict.reason == "empty password"


def test_password_with_a_nul_is_refused_locally_because_the_server_would_cut_it(radius: FreeRadius) -> None:
    subject = realm(radius.port)
    smuggled = USERS["bob"] + "\x00"
    assert subject.authenticate("bob", smuggled).reason == "NUL in password"
    assert subject.authenticate("bob", "\x00" + USERS["bob"]).reason == "NUL in password"
    # The hazard is real: sent anyway, a trailing NUL is indistinguishable from PAP padding and is accepted.
    reply = subject._exchange(subject.build_request("bob", smuggled))
    assert reply.code == ACCEPT


def test_wrong_shared_secret_is_unavailable_not_a_rejection(radius: FreeRadius) -> None:
    """FreeRADIUS drops a request whose Message-Authenticator fails; the realm gives up after its retries."""
    subject = realm(radius.port, secret="not-the-secret", timeout=0.5, retries=1)
    started = time.monotonic()
    with pytest.raises(RealmUnavailable, match="no valid reply"):
        subject.authenticate("bob", USERS["bob"])
    assert time.monotonic() - started < BOUND
    assert "invalid Message-Authenticator" in radius.log_path.read_text(errors="replace")


def test_server_down_is_unavailable_within_bounded_time() -> None:
    port = free_port()  # nothing listens: ICMP port unreachable on loopback
    started = time.monotonic()
    with pytest.raises(RealmUnavailable, match="after 3 tries"):
        realm(port, retries=2).authenticate("bob", USERS["bob"])
    assert time.monotonic() - started < BOUND


def test_unsigned_replies_are_dropped_unless_the_realm_opts_out(tmp_path: Path) -> None:
    """An old server that does not sign replies: refused by default (BlastRADIUS), accepted only when allowed."""
    for server in _radius(tmp_path, sign_replies=False):
        strict = realm(server.port, timeout=0.5)
        with pytest.raises(RealmUnavailable):
            strict.authenticate("bob", USERS["bob"])
        assert strict.drops["no message-authenticator"] >= 1
        lax = realm(server.port, require_message_authenticator=False)
        assert lax.authenticate("bob", USERS["bob"]).ok
        assert not lax.authenticate("bob", "wrong").ok


# ------------------------------------------------------------------ forged replies (fake responder)
def reply_bytes(
    request: bytes,
    code: int = ACCEPT,
    *,
    secret: str = SECRET,
    ident: int | None = None,
    message_authenticator: bool = True,
    bad_message_authenticator: bool = False,
    proxy_state: bytes = b"",
) -> bytes:
    """A reply to *request* built from the RFCs: Message-Authenticator first, then any Proxy-State."""
    ident = request[1] if ident is None else ident
    request_authenticator = request[4:20]
    attributes = b""
    if message_authenticator:
        attributes += bytes([80, 18]) + bytes(16)
    if proxy_state:
        attributes += bytes([33, 2 + len(proxy_state)]) + proxy_state
    header = struct.pack("!BBH", code, ident, 20 + len(attributes))
    if message_authenticator:
        mac = hmac.new(secret.encode(), header + request_authenticator + attributes, "md5").digest()
        if bad_message_authenticator:
            mac = bytes(b ^ 0xFF for b in mac)
        attributes = attributes[:2] + mac + attributes[18:]
    response_authenticator = hashlib.md5(header + request_authenticator + attributes + secret.encode()).digest()
    return header + response_authenticator + attributes


class FakeResponder:
    """Answers each Access-Request it gets with the datagrams *answer* builds; records what it received."""

    def __init__(self, answer: Callable[[bytes], list[bytes]]) -> None:
        self.answer = answer
        self.received: list[bytes] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeResponder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.received.append(data)
            for datagram in self.answer(data):
                self.sock.sendto(datagram, peer)


FORGERIES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "no message-authenticator": (lambda req: reply_bytes(req, message_authenticator=False), "no message-authenticator"),
    "wrong message-authenticator": (lambda req: reply_bytes(req, bad_message_authenticator=True), "bad authenticator"),
    "wrong response authenticator": (lambda req: reply_bytes(req, secret="guessed"), "bad authenticator"),
    "wrong identifier": (lambda req: reply_bytes(req, ident=(req[1] + 1) % 256), "wrong identifier"),
    "unsolicited proxy-state": (lambda req: reply_bytes(req, proxy_state=b"blast"), "unsolicited proxy-state"),
    "truncated": (lambda req: reply_bytes(req)[:19], "short packet"),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_accept_is_dropped_and_the_genuine_reject_decides(forgery: str) -> None:
    forge, reason = FORGERIES[forgery]
    with FakeResponder(lambda req: [forge(req), reply_bytes(req, REJECT)]) as responder:
        subject = realm(responder.port)
        verdict = subject.authenticate("bob", USERS["bob"])
    assert not verdict.ok and verdict.reason == "rejected"
    assert subject.drops == {reason: 1}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_only_forged_accepts_mean_unavailable_after_retries(forgery: str) -> None:
    forge, reason = FORGERIES[forgery]
    with FakeResponder(lambda req: [forge(req)]) as responder:
        subject = realm(responder.port, timeout=0.3, retries=2)
        with pytest.raises(RealmUnavailable):
            subject.authenticate("bob", USERS["bob"])
    assert subject.drops == {reason: 3}
    assert len(responder.received) == 3
    assert len(set(responder.received)) == 1  # a retransmission is the same packet (RFC 5080 section 2.2.1)


def test_genuine_accept_from_the_responder_is_believed() -> None:
    """The control for the two tests above: the responder's well-formed reply is accepted."""
    with FakeResponder(lambda req: [reply_bytes(req, ACCEPT)]) as responder:
        subject = realm(responder.port)
        assert subject.authenticate("bob", USERS["bob"]).ok
    assert not subject.drops
