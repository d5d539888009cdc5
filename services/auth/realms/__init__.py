"""Proxy authentication realms: a user ``alice@corp`` is checked by the directory the realm ``corp`` names.

The auth service owns users, lockout and audit; a realm only answers one
question, "is this password right for this user?", against an external
server (an LDAP directory, ldap.py; a RADIUS server, radius.py). It answers
with a :class:`RealmVerdict` (accepted or not, with a reason for the logs and
the audit that is never sent to the client, so that a caller cannot tell an
unknown user from a wrong password), or raises :class:`RealmUnavailable` when
the server could not be asked at all: down, timing out, or answering with
nothing trustworthy. ``authenticate`` blocks, but every wait in it is bounded
by the realm's configured timeouts and retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import services.config


@dataclass(frozen=True)
class RealmVerdict:
    ok: bool
    reason: str  # for logs and the audit only, never sent to the client: "accepted", "rejected", "empty password", ...


class RealmUnavailable(Exception):
    """The realm's server is down, timed out or gave no valid answer, after the realm's own retries."""


class Realm(Protocol):
    name: str  # the part after '@' in alice@corp
    kind: str  # "ldap" | "radius"

    def authenticate(self, user: str, password: str) -> RealmVerdict: ...  # blocking, bounded by its timeouts


def load_realms(config: services.config.ServerConfig) -> dict[str, Realm]:
    """The realms of config.toml's ``[realms.NAME]`` tables (already validated by load_config), by name."""
    from services.auth.realms.ldap import LdapRealm
    from services.auth.realms.radius import RadiusRealm
    from services.config import LdapRealmConfig

    realms: dict[str, Realm] = {}
    for settings in config.realms:
        if isinstance(settings, LdapRealmConfig):
            realms[settings.name] = LdapRealm(settings, config.directory)
        else:
            realms[settings.name] = RadiusRealm(settings)
    return realms
