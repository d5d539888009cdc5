"""Textual messages the server link posts to the App (messages flow up, from the link's thread)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual.message import Message

from tui.app.state import ServerState


class LinkUp(Message):
    """The server answered: the state was read and the watch is in place."""

    def __init__(self, endpoint: str) -> None:
        super().__init__()
        self.endpoint = endpoint


class LinkDown(Message):
    """The server stopped answering; the link retries after ``retry_in`` seconds."""

    def __init__(self, reason: str, retry_in: float) -> None:
        super().__init__()
        self.reason = reason
        self.retry_in = retry_in


class StateLoaded(Message):
    def __init__(self, state: ServerState) -> None:
        super().__init__()
        self.state = state


class Reply(Message):
    """The answer to a request the UI submitted: a bus message, or the BusError it raised."""

    def __init__(self, callback: Callable[[Any], None], result: Any) -> None:
        super().__init__()
        self.callback = callback
        self.result = result
