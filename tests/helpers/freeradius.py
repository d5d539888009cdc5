"""A private FreeRADIUS 3 server for tests: loopback only, a free UDP port, a config written from scratch.

The config directory is written by :class:`FreeRadius` into a directory the
test owns (nothing from /etc/freeradius is read or changed): one radiusd.conf
with one client (127.0.0.1 and its secret, Message-Authenticator required, as
a BlastRADIUS-aware server is set up), the ``files`` and ``pap`` modules, and
a ``users`` file of Cleartext-Password entries, and a post-auth
section that makes every reply carry a Message-Authenticator. ``reject_delay`` is 0 so
that a rejection costs the tests no second each.

The server runs in the foreground (``-f``) with debug logging to a file, is
waited for by reading its log line "Ready to process requests" (bounded),
and is stopped by its PID. This module does not import pytest: a missing
package raises :class:`FreeRadiusUnavailable`, which the fixture turns into a
skip.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.helpers.server import free_port, stop_process

NOT_INSTALLED = "FreeRADIUS not installed (Debian package freeradius; .ci/run installs it)"
DICTIONARY_DIR = Path("/usr/share/freeradius")
MODULE_DIR = Path("/usr/lib/freeradius")
START_TIMEOUT = 30.0


class FreeRadiusUnavailable(RuntimeError):
    """The freeradius binary or its dictionaries are missing: skip, do not fail."""


class FreeRadiusError(RuntimeError):
    """FreeRADIUS is installed but did not start: a real failure, with its log."""


def find_binary() -> str:
    binary = shutil.which("freeradius", path="/usr/sbin:/usr/bin:/sbin") or shutil.which("radiusd")
    if binary is None or not (DICTIONARY_DIR / "dictionary").exists():
        raise FreeRadiusUnavailable(NOT_INSTALLED)
    return binary


def _free_udp_port() -> int:
    """A port free for UDP and TCP alike (free_port probes TCP; FreeRADIUS binds UDP)."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise FreeRadiusError("no free UDP port on loopback")


def _quote(value: str) -> str:
    """A FreeRADIUS double-quoted string (users file and radiusd.conf)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class FreeRadius:
    """One FreeRADIUS server with a given client secret and users (name -> cleartext password)."""

    def __init__(self, root: Path, secret: str, users: dict[str, str], *, sign_replies: bool = True) -> None:
        self.binary = find_binary()
        self.sign_replies = sign_replies
        self.root = root
        self.secret = secret
        self.users = users
        self.port = _free_udp_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "radiusd.log"

    def start(self) -> FreeRadius:
        self._write_config()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-f", "-xx", "-l", str(self.log_path), "-d", str(self.root), "-n", "radiusd"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if "Ready to process requests" in self._log():
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise FreeRadiusError(f"freeradius did not become ready:\n{self._log()[-4000:]}")

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is None:
            return
        stop_process(self.process)
        self.process = None

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _write_config(self) -> None:
        for sub in ("run", "log", "mods-config"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        users = "".join(
            f"{_quote(name)} Cleartext-Password := {_quote(password)}\n" for name, password in self.users.items()
        )
        (self.root / "users").write_text(users)
        (self.root / "radiusd.conf").write_text(RADIUSD_CONF.format(
            root=self.root,
            dictdir=DICTIONARY_DIR,
            libdir=MODULE_DIR,
            port=self.port,
            secret=_quote(self.secret),
            post_auth=POST_AUTH if self.sign_replies else "",
        ))


RADIUSD_CONF = """
prefix = /usr
localstatedir = {root}
logdir = {root}/log
run_dir = {root}/run
raddbdir = {root}
confdir = {root}
modconfdir = {root}/mods-config
dictdir = {dictdir}
libdir = {libdir}
pidfile = {root}/run/radiusd.pid
name = radiusd
max_request_time = 10
cleanup_delay = 2
max_requests = 1024
hostname_lookups = no

log {{
    destination = files
    file = {root}/radiusd.log
    auth = yes
    auth_badpass = no
    auth_goodpass = no
}}

security {{
    allow_core_dumps = no
    max_attributes = 200
    reject_delay = 0
    status_server = no
    require_message_authenticator = yes
}}

client loopback {{
    ipaddr = 127.0.0.1
    secret = {secret}
    require_message_authenticator = yes
    nas_type = other
}}

thread pool {{
    start_servers = 1
    max_servers = 4
    min_spare_servers = 1
    max_spare_servers = 2
    max_requests_per_server = 0
}}

modules {{
    files {{
        filename = {root}/users
    }}
    pap {{
        normalise = yes
    }}
}}

server default {{
    listen {{
        type = auth
        ipaddr = 127.0.0.1
        port = {port}
    }}
    authorize {{
        files
        pap
    }}
    authenticate {{
        Auth-Type PAP {{
            pap
        }}
    }}
{post_auth}
}}
"""

# FreeRADIUS before 3.2.5 signs a reply only when the reply list holds a Message-Authenticator
# (the BlastRADIUS advice for those versions); later versions sign every reply anyway.
POST_AUTH = """
    post-auth {
        update reply {
            Message-Authenticator := 0x00
        }
        Post-Auth-Type REJECT {
            update reply {
                Message-Authenticator := 0x00
            }
        }
    }
"""
