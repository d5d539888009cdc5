"""The RADIUS realm: one Access-Request with a PAP User-Password (RFC 2865), answered Accept or Reject.

What one ``authenticate`` does, and why:

1. Refuse an empty password locally (RFC 2865 hides it, but an empty secret
   is never a credential here, as in the LDAP realm), and one holding a NUL:
   PAP pads with NULs (section 5.2), so the password followed by NULs is the
   same ciphertext as the password, and some servers read only up to the
   first NUL: a password with a NUL in it does not mean what it says.
2. Build the Access-Request: a random Identifier and a Request Authenticator
   of 16 bytes from ``os.urandom`` (RFC 2865 section 3 asks it to be
   unpredictable and unique; the password hiding of section 5.2 depends on
   it), then a Message-Authenticator as the *first* attribute (RFC 3579
   section 3.2; BlastRADIUS, CVE-2024-3596, and RFC 9765's guidance put it
   first so that a chosen-prefix collision cannot move it), User-Name,
   User-Password and NAS-Identifier.
3. Send it from a fresh connected UDP socket (only datagrams from the
   server's address and port reach it; a refused port shows up as an error
   at once), wait ``timeout`` seconds, and retransmit the very same bytes
   ``retries`` times (RFC 5080 section 2.2.1: same Identifier and
   authenticator, so the server's duplicate cache answers once).
4. Believe a datagram only if it is a well-formed reply to *this* request:
   right Identifier, right Response Authenticator (MD5 over the reply, the
   Request Authenticator and the secret), a Message-Authenticator present
   and right (HMAC-MD5; ``require_message_authenticator = false`` admits an
   old server's unsigned replies, still checked by Response Authenticator),
   and no Proxy-State we did not send. Anything else is
   dropped and counted by reason (``drops``), and the wait goes on: a forged
   or stray datagram can neither accept nor reject a login.
5. Access-Accept accepts; Access-Reject and Access-Challenge (no multi-round
   methods here) reject.

A wrong shared secret makes every reply fail step 4 (or makes the server
drop our request for its bad Message-Authenticator, as FreeRADIUS does), so
it ends as :class:`RealmUnavailable`, not as a rejection: it is an operator's
configuration error, and reporting it as "wrong password" would hide it
behind user failures and feed the lockout counters with logins that might be
right. Server down ends the same way, after the retries.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections import Counter

from pyrad import packet
from pyrad.dictionary import Dictionary

from services.auth.realms import RealmUnavailable, RealmVerdict
from services.config import RadiusRealmConfig

log = logging.getLogger(__name__)

HEADER = 20  # code, identifier, length, authenticator (RFC 2865 section 3)
MAX_PACKET = 4096
MESSAGE_AUTHENTICATOR = 80
PROXY_STATE = 33
MAX_PASSWORD = 128  # octets, RFC 2865 section 5.2
MAX_STRING = 253  # octets in one attribute value
REPLY_CODES = {packet.AccessAccept, packet.AccessReject, packet.AccessChallenge}

# The only attributes this client sends or reads; no dictionary files to install.
DICTIONARY = """
ATTRIBUTE User-Name 1 string
ATTRIBUTE User-Password 2 octets
ATTRIBUTE Reply-Message 18 string
ATTRIBUTE NAS-Identifier 32 string
ATTRIBUTE Proxy-State 33 octets
ATTRIBUTE Message-Authenticator 80 octets
"""


def dictionary() -> Dictionary:
    return Dictionary(io.StringIO(DICTIONARY))


class RadiusRealm:
    kind = "radius"

    def __init__(self, settings: RadiusRealmConfig) -> None:
        self.name = settings.name
        self.settings = settings
        self.secret = settings.secret.encode()
        self.dict = dictionary()
        self.drops: Counter[str] = Counter()  # replies dropped, by reason (for logs and tests)
        self._drops_lock = threading.Lock()  # the auth service calls one realm from several threads

    def authenticate(self, user: str, password: str) -> RealmVerdict:
        if not password:
            return RealmVerdict(False, "empty password")
        if not user:
            return RealmVerdict(False, "empty user name")
        if len(password.encode()) > MAX_PASSWORD or len(user.encode()) > MAX_STRING:
            return RealmVerdict(False, "user name or password too long for RADIUS")
        if "\x00" in password:  # PAP pads with NULs: the password plus NULs would pass for the password
            return RealmVerdict(False, "NUL in password")
        request = self.build_request(user, password)
        reply = self._exchange(request)
        if reply.code == packet.AccessAccept:
            return RealmVerdict(True, "accepted")
        message = " ".join(str(m) for m in reply.get("Reply-Message", []))
        what = "rejected" if reply.code == packet.AccessReject else "challenge (unsupported), rejected"
        return RealmVerdict(False, f"{what}: {message}" if message else what)

    def build_request(self, user: str, password: str) -> packet.AuthPacket:
        """An Access-Request with a fresh random Identifier and Request Authenticator, Message-Authenticator first."""
        request = packet.AuthPacket(
            code=packet.AccessRequest,
            id=secrets.randbelow(256),
            secret=self.secret,
            authenticator=os.urandom(16),
            dict=self.dict,
        )
        request.add_message_authenticator()
        request["User-Name"] = user
        request["User-Password"] = request.PwCrypt(password)
        request["NAS-Identifier"] = self.settings.nas_identifier
        return request

    def _exchange(self, request: packet.AuthPacket) -> packet.AuthPacket:
        """The first valid reply to *request*, after up to ``retries`` retransmissions; else RealmUnavailable."""
        raw = request.RequestPacket()
        address = (self.settings.server, self.settings.port)
        failures: list[str] = []
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(*address, type=socket.SOCK_DGRAM)[0]
        except OSError as exc:
            raise RealmUnavailable(f"RADIUS realm {self.name}: cannot resolve {address[0]}: {exc}") from None
        with socket.socket(family, kind, proto) as sock:
            sock.connect(sockaddr)
            for _ in range(self.settings.retries + 1):
                try:
                    sock.send(raw)
                    reply = self._await_reply(sock, request)
                except OSError as exc:  # ECONNREFUSED from an ICMP port unreachable, and the like
                    failures.append(type(exc).__name__)
                    continue
                if reply is not None:
                    return reply
                failures.append("timeout")
        raise RealmUnavailable(
            f"RADIUS realm {self.name}: no valid reply from {address[0]}:{address[1]} after "
            f"{self.settings.retries + 1} tries ({', '.join(failures)}); dropped replies: {dict(self.drops) or 'none'}"
        )

    def _await_reply(self, sock: socket.socket, request: packet.AuthPacket) -> packet.AuthPacket | None:
        """Read datagrams until one is a valid reply or ``timeout`` passes (None); invalid ones are dropped."""
        deadline = time.monotonic() + self.settings.timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(MAX_PACKET)
            except TimeoutError:
                return None
            reply, reason = self.check_reply(request, data)
            if reply is not None:
                return reply
            with self._drops_lock:
                self.drops[reason] += 1
            log.warning("RADIUS realm %s: dropped a reply from %s: %s", self.name, self.settings.server, reason)
        return None

    def check_reply(self, request: packet.AuthPacket, data: bytes) -> tuple[packet.AuthPacket | None, str]:
        """(the decoded reply, "") if *data* is a valid reply to *request*, else (None, why it is dropped)."""
        if len(data) < HEADER:
            return None, "short packet"
        code, ident, length = struct.unpack("!BBH", data[:4])
        if not HEADER <= length <= len(data):
            return None, "bad length"
        data = data[:length]  # octets past Length are padding (RFC 2865 section 3)
        if code not in REPLY_CODES:
            return None, f"unexpected code {code}"
        if ident != request.id:
            return None, "wrong identifier"
        try:
            reply = request.CreateReply(packet=data)
        except packet.PacketError:
            return None, "malformed attributes"
        attributes = dict.keys(reply)  # raw codes, whatever the dictionary knows
        required = self.settings.require_message_authenticator
        if MESSAGE_AUTHENTICATOR not in attributes and required:
            return None, "no message-authenticator"
        if MESSAGE_AUTHENTICATOR in attributes and len(dict.__getitem__(reply, MESSAGE_AUTHENTICATOR)) != 1:
            return None, "several message-authenticators"
        if PROXY_STATE in attributes:
            return None, "unsolicited proxy-state"
        if not request.VerifyReply(reply, data, enforce_ma=required):  # checks any Message-Authenticator present
            return None, "bad authenticator"
        return reply, ""
