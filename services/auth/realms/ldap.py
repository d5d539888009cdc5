"""The LDAP realm: find the user's entry with a safe search, then bind as that entry with the user's password.

Steps of one ``authenticate`` (RFC 4513 for binds, RFC 4515 for the filter):

1. Refuse an empty password (and an empty user name) before any network
   traffic. A simple bind with a DN and an empty password is an
   "unauthenticated bind" (RFC 4513 section 5.1.2) that many servers accept
   as anonymous: it must never be mistaken for a login. The password is
   prepared with SASLprep (RFC 4013) here, once, so that one which maps to
   nothing (soft hyphens, say) or holds control characters is refused as a
   rejection, not sent and not mistaken for an unavailable server.
2. Open a connection (ldap:// or ldaps://), upgrade it with StartTLS when
   configured, and bind as the service account (or search anonymously when
   none is configured).
3. Search the subtree under ``base_dn`` with
   ``(&USER_FILTER(USER_ATTRIBUTE=NAME))`` where NAME passes through
   ldap3's ``escape_filter_chars``, so ``*``, ``(``, ``)``, ``\\`` and NUL
   are matched literally and cannot widen or end the filter.
4. Require exactly one entry: none is "no such user", more than one is
   ambiguous and refused (size limit 2, so a broad match costs little).
5. Bind the same connection again (RFC 4511 section 4.2 allows a new bind
   on a bound connection) with the entry's DN, as the server spelled it (so
   DN special characters arrive already escaped), and the password; the
   connection is closed right after, so the user's identity does nothing
   else. One connection per login: with TLS, one handshake, not two.
   Referrals are never followed, so no credential is sent to another server.
   invalidCredentials is a rejection; any other refusal is a rejection with
   the server's reason; a network failure is :class:`RealmUnavailable`.

Every socket wait is bounded: ``timeout`` is both the connect timeout and the
receive timeout, so a server that is down or that accepts and then stalls
costs at most a few multiples of it, never a hang.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

from ldap3 import ANONYMOUS, NO_ATTRIBUTES, SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.protocol.sasl.sasl import validate_simple_password
from ldap3.utils.conv import escape_filter_chars

from services.auth.realms import RealmUnavailable, RealmVerdict
from services.config import LdapRealmConfig

log = logging.getLogger(__name__)

INVALID_CREDENTIALS = 49  # RFC 4511 resultCode
SEARCH_SIZE_LIMIT = 2  # enough to tell "exactly one" from "more than one"


class LdapRealm:
    kind = "ldap"

    def __init__(self, settings: LdapRealmConfig, config_dir: Path) -> None:
        self.name = settings.name
        self.settings = settings
        self.ca_file = str(config_dir / settings.ca_file) if settings.ca_file else None

    def authenticate(self, user: str, password: str) -> RealmVerdict:
        if not password:
            return RealmVerdict(False, "empty password")
        if not user:
            return RealmVerdict(False, "empty user name")
        try:
            prepared = validate_simple_password(password)  # SASLprep (RFC 4013), as RFC 4513 section 5.1.2 asks
        except LDAPException:
            return RealmVerdict(False, "password refused by SASLprep: prohibited characters, or none left")
        if not prepared:  # a password of characters SASLprep maps to nothing is an empty password too
            return RealmVerdict(False, "empty password")
        try:
            with self._connect() as conn:
                if not conn.bind():
                    raise RealmUnavailable(f"LDAP realm {self.name}: service bind refused: {_describe(conn)}")
                found = self._find(conn, user)
                if isinstance(found, RealmVerdict):
                    return found
                return self._bind_as(conn, found, prepared)
        except LDAPException as exc:
            raise RealmUnavailable(f"LDAP realm {self.name}: {type(exc).__name__}: {exc}") from None

    def search_filter(self, user: str) -> str:
        """The filter that finds *user*: the operator's filter AND the escaped name (RFC 4515 section 3)."""
        escaped = escape_filter_chars(user)
        return f"(&{self.settings.user_filter}({self.settings.user_attribute}={escaped}))"

    def _find(self, conn: Connection, user: str) -> str | RealmVerdict:
        """The one DN whose entry matches *user*, or a rejection."""
        conn.search(
            self.settings.base_dn,
            self.search_filter(user),
            search_scope=SUBTREE,
            attributes=[NO_ATTRIBUTES],
            size_limit=SEARCH_SIZE_LIMIT,
            time_limit=max(1, int(self.settings.timeout)),
        )
        code = conn.result.get("result", 0)
        if code not in (0, 4, 32):  # success, sizeLimitExceeded (more than one), noSuchObject (no base)
            raise RealmUnavailable(f"LDAP realm {self.name}: search failed: {_describe(conn)}")
        dns = [item["dn"] for item in conn.response or () if item.get("type") == "searchResEntry"]
        if not dns:
            return RealmVerdict(False, "no such user")
        if len(dns) > 1:
            return RealmVerdict(False, "ambiguous user name: more than one entry matches")
        return dns[0]

    def _bind_as(self, conn: Connection, dn: str, password: bytes) -> RealmVerdict:
        """Bind the search connection again, as *dn*; *password* is SASLprep'ed bytes, sent as they are."""
        if not dn or not password:  # empty: ldap3 would keep the service identity, or bind unauthenticated
            return RealmVerdict(False, "refused: empty DN or password")
        if conn.rebind(user=dn, password=password, authentication=SIMPLE):
            return RealmVerdict(True, "accepted")
        if conn.result.get("result") == INVALID_CREDENTIALS:
            return RealmVerdict(False, "rejected: invalid credentials")
        return RealmVerdict(False, f"rejected: {_describe(conn)}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Connection]:
        """An open connection (StartTLS done when configured) set up for the service bind, not bound yet.

        Closed (unbind, which also closes an unbound socket) on the way out, whatever happened; ldap3's
        own context manager is not used because it reopens a connection that was open on entry.
        """
        conn = Connection(
            _server(self.settings, self.ca_file),
            user=self.settings.bind_dn or None,
            password=self.settings.bind_password or None,
            authentication=SIMPLE if self.settings.bind_dn else ANONYMOUS,
            auto_bind=False,
            auto_referrals=False,  # a referral must not take the service password (or the user's) elsewhere
            read_only=True,
            raise_exceptions=False,
            receive_timeout=math.ceil(self.settings.timeout),  # ldap3 packs it into SO_RCVTIMEO as whole seconds
        )
        try:
            conn.open()
            # Small request after the TLS handshake's last flight: without NODELAY, Nagle waits for the
            # delayed ACK and each TLS login costs ~40 ms more (measured: bench/realm_latency.py).
            conn.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.settings.starttls and not conn.start_tls():
                raise RealmUnavailable(f"LDAP realm {self.name}: StartTLS refused: {_describe(conn)}")
            yield conn
        finally:
            with contextlib.suppress(LDAPException, OSError):
                conn.unbind()


def _server(settings: LdapRealmConfig, ca_file: str | None) -> Server:
    """A fresh ldap3 Server per connection: TLS verifies the certificate and host name whenever TLS is used.

    Fresh because an ldap3 Server remembers a failed address as unavailable for a while and resolves the
    host name once; a login right after the directory comes back must reach it, at its current address.
    """
    use_ssl = settings.url.lower().startswith("ldaps://")
    tls = None
    if use_ssl or settings.starttls:
        tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
    return Server(settings.url, use_ssl=use_ssl, tls=tls, get_info="NO_INFO", connect_timeout=settings.timeout)


def _describe(conn: Connection) -> str:
    result = conn.result or {}
    return f"{result.get('description', 'no result')} ({result.get('message', '') or conn.last_error or ''})"
