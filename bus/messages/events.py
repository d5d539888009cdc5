"""Operator event stream: a leased watch on the change log, answered by pushed notices.

An operator client (the TUI) sends WatchRequest to the fanout and gets
WatchLease; from then until the lease runs out, every batch of committed
changes the fanout reads is pushed to the operator's CURVE key as one
ChangeNotice. The client renews well before expiry (the TUI every 10 s), so
a client that vanished costs the server nothing after ``lease`` seconds.
Pushes may be lost (a reconnect, a second client with the same key): each
notice carries the revisions it covers and the lease reply the head, so a
client that sees a gap re-reads the state instead of trusting the stream.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from bus.messages import Message, register

#: Seconds a watch lasts without renewal; clients renew at a third of it.
WATCH_LEASE = 30.0


@register
class WatchRequest(Message):
    """Operator -> fanout: push me change notices for ``lease`` seconds (renewal: send it again).

    ``stop`` ends the watch at once (a TUI that quits). Reply: WatchLease.
    Errors: ``forbidden`` for callers that are not operators or services.
    """

    KIND = "events.watch"
    lease: float = Field(default=WATCH_LEASE, gt=0, le=300)
    stop: bool = False


@register
class WatchLease(Message):
    """Fanout -> operator: the watch holds until ``lease`` seconds from now; ``head`` is the newest revision."""

    KIND = "events.watch_lease"
    lease: float
    head: int


class ChangeEvent(Message):
    """One change-log row as an operator sees it (part of ChangeNotice)."""

    KIND = "events.change"
    revision: int
    at: datetime
    kind: str
    summary: str
    actor: str


@register
class ChangeNotice(Message):
    """Fanout -> operator (push): the changes committed after ``prev_revision``, up to ``revision``."""

    KIND = "events.notice"
    prev_revision: int
    revision: int
    changes: list[ChangeEvent] = Field(default_factory=list)
