"""First contact by password (``agent up --user``) and password change (``agent passwd``).

A login is an enrollment that proves a user's password instead of a join
secret: the node's own keys are made here and never leave; the server takes
the connection's CURVE key as the node's key, so the next ``agent up`` needs
no password. The server's signing key comes back over the CURVE channel,
which the given server key authenticates.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from bus.client import Client, Context
from bus.errors import BusError, KeyFileError, RemoteError
from bus.keys import load_public_key, validate_public_key
from bus.messages.auth import Enrolled, Login, PasswordChange, PasswordChangeAck, PasswordChanged
from nodeagent.agent import VERSION, EnrollmentError
from nodeagent.state import ServerInfo, StateDir

log = logging.getLogger(__name__)


def server_key_from(text: str) -> str:
    """A server key given as Z85 text or as the path of a .pub file; KeyFileError says what is wrong."""
    path = Path(text)
    if len(text) != 40 and path.exists():
        return load_public_key(path).decode("ascii")
    return validate_public_key(text).decode("ascii")


def hostname() -> str:
    return socket.gethostname().split(".")[0][:63]


def login(
    state: StateDir,
    endpoint: str,
    server_key: str,
    user: str,
    password: str,
    *,
    node_name: str = "",
    timeout: float = 10.0,
    context: Context | None = None,
) -> ServerInfo:
    """Log this node in as *user*; EnrollmentError carries the server's refusal as it is."""
    keypair = state.keypair()
    request = Login(
        user=user,
        password=password,
        node_name=node_name,
        hostname=hostname(),
        sign_key=state.identity_public(),
        agent_version=VERSION,
    )
    # Retries resend only after silence for *timeout* or a retriable "busy" answer (a hash slot was not free).
    with Client(endpoint, keypair, server_key.encode(), timeout=timeout, retries=2, context=context) as client:
        try:
            reply = client.request("auth", request, expect=Enrolled)
        except RemoteError as exc:
            raise EnrollmentError(exc.message) from None
        except BusError as exc:
            raise EnrollmentError(f"no answer from the server at {endpoint}: {exc}") from None
    assert isinstance(reply, Enrolled)
    info = ServerInfo([endpoint], server_key, reply.server_sign_key, reply.node)
    state.save_server(info)
    log.info("logged in as user %s: node %s at %s", user, reply.node, endpoint)
    return info


def change_password(
    state: StateDir, old: str, new: str, *, user: str = "", timeout: float = 10.0, context: Context | None = None
) -> PasswordChanged:
    """Change the password of the user that logged this node in (or *user*); acknowledge the server's answer."""
    server = state.server()
    with Client(
        server.endpoints[0], state.keypair(), server.server_key.encode(), timeout=timeout, retries=0, context=context
    ) as client:
        try:
            reply = client.request("auth", PasswordChange(user=user, old_password=old, new_password=new))
        except RemoteError as exc:
            raise EnrollmentError(exc.message) from None
        except BusError as exc:
            raise EnrollmentError(f"no answer from the server: {exc}") from None
        assert isinstance(reply, PasswordChanged)
        log.info("password of %s changed (change #%d)", reply.user, reply.change_id)
        client.notify("auth", PasswordChangeAck(change_id=reply.change_id))
        client.heartbeat(timeout=1.0)  # let the acknowledgement leave before the socket closes
    return reply


__all__ = ["EnrollmentError", "KeyFileError", "change_password", "login", "server_key_from"]
