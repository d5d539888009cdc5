"""Authentication: credentials, enrollment tokens, LDAP and RADIUS realms.

Anonymous callers are allowed here and nowhere else: a node that has not
enrolled yet has no known key, and login/enrollment is how it gets one.
The foundation answers ping and health only; credentials come with their issue.
"""

from __future__ import annotations

from bus.identity import Role
from bus.worker import Worker


class AuthService(Worker):
    service = "auth"
    allow = (Role.ANONYMOUS, Role.NODE, Role.OPERATOR, Role.SERVICE)
