"""A throwaway PostgreSQL cluster for tests: real server, Unix socket only, durable settings.

Why a cluster of our own rather than the machine's: tests must be able to
crash and restart the server (RELIABILITY S2) and must never touch a database
someone else uses. The cluster lives in a fresh temporary directory, listens
on no TCP port (``listen_addresses=''``), only on a Unix socket in that
directory, keeps ``fsync`` on (a crash test with fsync off proves nothing),
and trusts local connections so that no password is needed.

PostgreSQL refuses to run as root, so when the tests run as root (as CI does)
``initdb`` and ``pg_ctl`` are run as the ``postgres`` OS user through
``runuser``; otherwise they run as the current user. Every wait is bounded
(``pg_ctl -w -t 30`` plus a subprocess timeout), and the server is stopped by
its postmaster PID, never by process name.

This module does not import pytest: the fixture turns :class:`PostgresUnavailable`
into a skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg

BIN_GLOB = "/usr/lib/postgresql/*/bin"
NOT_INSTALLED = "PostgreSQL 15 server not installed (Debian package postgresql; .ci/run installs it)"
SUPERUSER = "postgres"  # the database superuser initdb creates (-U), whatever the OS user
WAIT = 30  # seconds pg_ctl may wait for a start or a stop (-t)
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; the socket file name adds ".s.PGSQL.NNNNN"


class PostgresUnavailable(RuntimeError):
    """The server binaries (or the OS user to run them as) are not on this machine: skip, do not fail."""


class PostgresError(RuntimeError):
    """The server is installed but would not initialise, start or stop: a real failure, with its log."""


def find_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb, pg_ctl and postgres."""
    found: list[tuple[int, Path]] = []
    for entry in glob.glob(BIN_GLOB):
        bindir = Path(entry)
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            version = bindir.parent.name
            found.append((int(version) if version.isdigit() else 0, bindir))
    if not found:
        raise PostgresUnavailable(NOT_INSTALLED)
    return max(found)[1]


def _alive(pid: int) -> bool:
    """Whether *pid* is a live process (a zombie, which nobody may reap in a container, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class PostgresCluster:
    """One PostgreSQL server in a temporary directory, with a database named ``coterie``.

    ``start()`` initialises the cluster on first use; ``stop()``, ``restart()``
    and ``cleanup()`` may be called in any state. Use it as a context manager
    (or call ``cleanup()`` in a ``finally``) so that the server never outlives
    the test session.
    """

    def __init__(self, database: str = "coterie", os_user: str = "postgres", port: int = 5432) -> None:
        self.bindir = find_bindir()
        self.database = database
        self.port = port
        self.root: Path | None = None
        self._initialised = False
        self._pid: int | None = None
        if os.geteuid() == 0:
            runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
            try:
                self._owner = pwd.getpwnam(os_user)
            except KeyError:
                raise PostgresUnavailable(f"{NOT_INSTALLED}: no OS user {os_user!r} to run it as") from None
            if runuser is None:
                raise PostgresUnavailable(f"{NOT_INSTALLED}: runuser not found to drop root")
            self._as_owner = [runuser, "-u", os_user, "--"]
        else:
            self._owner = pwd.getpwuid(os.geteuid())
            self._as_owner = []

    # ------------------------------------------------------------------ paths and URLs
    @property
    def data_dir(self) -> Path:
        return self._root() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._root()

    @property
    def log_path(self) -> Path:
        return self._root() / "server.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs, else None."""
        return self._pid if self._pid is not None and _alive(self._pid) else None

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the ``coterie`` database, over the Unix socket."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        port = "" if self.port == 5432 else f"&port={self.port}"
        return f"postgresql+psycopg://{SUPERUSER}@/{database}?host={self.socket_dir}{port}"

    def connect(self, database: str = "postgres") -> psycopg.Connection:
        """A plain psycopg connection in autocommit (CREATE/DROP DATABASE cannot run in a transaction)."""
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname=database,
            autocommit=True,
            connect_timeout=10,
        )

    def _root(self) -> Path:
        if self.root is None:
            raise PostgresError("the cluster has not been started")
        return self.root

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PostgresCluster:
        """Initialise the cluster if needed, then start the server and wait until it accepts connections."""
        if self.pid is not None:
            return self
        first = not self._initialised
        if first:
            self._initdb()
        self._pg_ctl("start", "-l", str(self.log_path))
        self._pid = self._read_pid()
        if first:
            with self.connect() as connection:
                connection.execute(f'CREATE DATABASE "{self.database}"')
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back sessions and checkpoint; ``immediate``: crash-like).

        If pg_ctl cannot stop it within its bounded wait, the postmaster is
        killed by PID so that a broken test never leaves a server behind.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        pid = self.pid
        if pid is None:
            self._pid = None
            return
        try:
            self._pg_ctl("stop", "-m", mode)
        except (PostgresError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            raise PostgresError(f"postmaster {pid} still runs {WAIT} s after stop -m {mode}")
        self._pid = None

    def restart(self, mode: str = "immediate", down_for: float = 0.0) -> None:
        """Stop the server with *mode*, leave it down for *down_for* seconds, and start it again.

        ``immediate`` is the crash case of RELIABILITY S2: no checkpoint, the
        next start runs WAL recovery, and clients see their connections die.
        """
        self.stop(mode)
        time.sleep(max(0.0, down_for))
        self.start()

    def cleanup(self) -> None:
        """Stop the server (by PID if need be) and delete its directory."""
        if self.root is None:
            return
        try:
            self.stop("fast")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            self._initialised = False

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ internals
    def _initdb(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="coterie-pg-"))
        if len(str(root)) > SOCKET_PATH_MAX:
            shutil.rmtree(root, ignore_errors=True)
            root = Path(tempfile.mkdtemp(prefix="coterie-pg-", dir="/tmp"))
        self.root = root
        os.chown(root, self._owner.pw_uid, self._owner.pw_gid)
        os.chmod(root, 0o700)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
            ]
        )
        settings = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "port": str(self.port),
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "max_connections": "100",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# coterie tests\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self._initialised = True

    def _pg_ctl(self, action: str, *options: str) -> None:
        self._run([str(self.bindir / "pg_ctl"), action, "-D", str(self.data_dir), "-w", "-t", str(WAIT), *options])

    def _run(self, argv: list[str]) -> None:
        result = subprocess.run(
            self._as_owner + argv,
            cwd=self._root(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=WAIT + 15,
            check=False,
        )
        if result.returncode != 0:
            raise PostgresError(
                f"{Path(argv[0]).name} {argv[1]} failed ({result.returncode}): "
                f"{result.stdout[-1500:]}{result.stderr[-1500:]}\n--- server log ---\n{self._log_tail()}"
            )

    def _read_pid(self) -> int:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError) as exc:
            raise PostgresError(f"pg_ctl started the server but postmaster.pid is unreadable: {exc}") from None

    def _log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except (OSError, PostgresError):
            return "(no log)"
