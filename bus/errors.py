"""Errors the bus raises, and the codes that travel in error replies.

A code is part of the wire contract: clients branch on it, so codes are
stable strings, never free text.
"""

from __future__ import annotations

# Error codes carried by bus.messages.common.Error.
MALFORMED = "malformed"  # bytes that are not a message at all
UNKNOWN_KIND = "unknown_kind"
UNSUPPORTED_VERSION = "unsupported_version"
INVALID = "invalid"  # a known kind whose fields fail validation
TOO_LARGE = "too_large"
UNKNOWN_SERVICE = "unknown_service"
SERVICE_UNAVAILABLE = "service_unavailable"
WORKER_LOST = "worker_lost"
FORBIDDEN = "forbidden"
UNSUPPORTED_REQUEST = "unsupported_request"
INTERNAL = "internal"
NOT_FOUND = "not_found"  # the named VPN, node, rule... does not exist
CONFLICT = "conflict"  # the request clashes with what exists (a duplicate name, say)
REFUSED = "refused"  # a credential or token was refused (the reason is in the message)
BAD_SIGNATURE = "bad_signature"  # a signed key or record does not verify with the signer's identity key
STALE_EPOCH = "stale_epoch"  # an epoch key older than (or conflicting with) one already held
EXPIRED = "expired"  # a key or record whose validity has ended

#: Codes after which the same request may succeed when simply sent again.
RETRIABLE = frozenset({SERVICE_UNAVAILABLE, WORKER_LOST})


class BusError(Exception):
    """Base class of every error raised by bus/."""


class KeyFileError(BusError):
    """A CURVE key file is missing, unreadable or corrupt."""


class InsecureSocketError(BusError):
    """A CURVE server socket would admit clients without authentication."""


class DecodeError(BusError):
    """Bytes that do not decode to a valid, known message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteError(BusError):
    """The far side answered a request with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def retriable(self) -> bool:
        return self.code in RETRIABLE


class BusTimeout(BusError):
    """No reply within the deadline, after every retry."""
