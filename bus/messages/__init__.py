"""Every message schema of Coterie, and the one registry that maps wire kinds to them.

A message is a pydantic model with a ``KIND`` (a dotted, stable name) and a
``VERSION``. Each service's messages live in one module here, named after the
service; each class's docstring says whether it is a request, a reply or a
push, and which errors answer it. Receivers validate everything they decode.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict


class Message(BaseModel):
    """Base of every bus message: typed, versioned, closed to unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1


#: kind -> version -> class. Filled by @register as the modules import.
REGISTRY: dict[str, dict[int, type[Message]]] = {}

M = TypeVar("M", bound=type[Message])


def register(cls: M) -> M:
    """Add a message class to the registry; two classes may not share a kind and version."""
    versions = REGISTRY.setdefault(cls.KIND, {})
    if cls.VERSION in versions and versions[cls.VERSION] is not cls:
        raise ValueError(f"message {cls.KIND} v{cls.VERSION} is registered twice")
    versions[cls.VERSION] = cls
    return cls


# The registry is explicit: importing the package imports every schema module.
from bus.messages import auth as auth  # noqa: E402
from bus.messages import common as common  # noqa: E402
from bus.messages import datastore as datastore  # noqa: E402
from bus.messages import events as events  # noqa: E402
from bus.messages import keys as keys  # noqa: E402
from bus.messages import services as services  # noqa: E402
from bus.messages import sync as sync  # noqa: E402
