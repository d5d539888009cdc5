"""Messages every bus participant speaks: errors, ping, health, worker registration."""

from __future__ import annotations

from pydantic import Field

from bus.constants import MAX_SERVICE_NAME, MAX_WORKER_CAPACITY
from bus.identity import Role
from bus.messages import Message, register

SERVICE_NAME_PATTERN = r"^[a-z][a-z0-9_-]*$"


@register
class Error(Message):
    """Reply: the request failed. ``code`` is one of bus.errors' codes."""

    KIND = "error"
    code: str
    message: str


@register
class Ping(Message):
    """Request to any service; answered by Pong. Errors: none beyond the bus's."""

    KIND = "ping"
    payload: bytes = b""


@register
class Pong(Message):
    """Reply to Ping, echoing its payload."""

    KIND = "pong"
    payload: bytes = b""
    service: str


@register
class HealthRequest(Message):
    """Request to any service (and to the broker); answered by Health."""

    KIND = "health.request"


@register
class Health(Message):
    """Reply: the process's own view of itself."""

    KIND = "health"
    service: str
    version: str
    pid: int
    uptime: float
    counters: dict[str, int] = Field(default_factory=dict)


@register
class WorkerReady(Message):
    """Worker -> broker, once per connection: the service it serves and who may call it.

    ``allow`` lists the caller roles the broker lets through to this service;
    a service that accepts anonymous callers (login, enrollment) says so here.

    ``kinds``, when not empty, makes this worker serve only requests of those
    message kinds (its own lane in the broker: the fanout's heartbeats never
    queue behind its snapshots); other workers of the service serve the rest,
    and serve those kinds too while no such worker is registered.
    ``capacity`` is how many requests the broker may hand this worker before
    its first reply (1: Majordomo's one at a time; more pipelines small
    requests instead of paying a broker round trip each).
    """

    KIND = "worker.ready"
    service: str = Field(pattern=SERVICE_NAME_PATTERN, max_length=MAX_SERVICE_NAME)
    allow: list[Role]
    version: str
    pid: int
    kinds: list[str] = Field(default_factory=list, max_length=32)
    capacity: int = Field(default=1, ge=1, le=MAX_WORKER_CAPACITY)


@register
class ServiceEntry(Message):
    """One service in the broker's directory (part of BrokerHealth)."""

    KIND = "broker.service"
    name: str
    workers: int
    pids: list[int]
    allow: list[Role]


@register
class BrokerHealth(Message):
    """Reply from the broker's own ``broker`` service to HealthRequest."""

    KIND = "broker.health"
    health: Health
    services: list[ServiceEntry]
