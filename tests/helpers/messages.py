"""Messages that exist only for tests: a slow request, a push trigger and a push."""

from __future__ import annotations

from bus.messages import Message, register


@register
class Sleep(Message):
    """Request: sleep *seconds*, first writing this worker's pid to *marker* (if given)."""

    KIND = "test.sleep"
    seconds: float
    marker: str = ""


@register
class Slept(Message):
    KIND = "test.slept"
    pid: int


@register
class PushTo(Message):
    """Request: make the worker push a Note with *text* to the client with *key*."""

    KIND = "test.push_to"
    key: str
    text: str


@register
class Note(Message):
    """Push: a line of text."""

    KIND = "test.note"
    text: str


@register
class Ack(Message):
    KIND = "test.ack"
