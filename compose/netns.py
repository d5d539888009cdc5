"""Network namespaces as a disposable lab: hosts, veth links, processes, and a cleanup that is always bounded.

Why a class of its own: every network test and demo needs the same three
promises, and getting them right once is cheaper than in every test:

1. Names are unique per Lab (``cot-<6 hex>-<host>``), so several labs (and
   several helpers' test runs) share one machine without colliding.
2. Everything the Lab creates it records, and on exit it removes exactly
   that: its processes by PID (TERM, then KILL after a bounded wait), then
   whatever still runs inside its namespaces (started there by its users),
   then the namespaces. It never touches anything outside what it created.
3. Every wait is bounded in time.

Links are created inside the namespaces (``ip -n NS link add ... peer ...
netns OTHER``), so no interface ever appears in the root namespace and
device names only need to be unique per namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

PREFIX = "cot"
OWNER_DIR = Path("/run/coterie-lab")  # <tag>.owner: the owner's PID; <tag>.json: a published lab (publish())
TERM_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
ROOT = Path(__file__).resolve().parent.parent  # this checkout: what processes in a lab import


def checkout_env() -> dict[str, str]:
    """The environment for Python processes in a lab: this checkout first on the import path, unbuffered."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def _sh(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise LabError(f"exit {proc.returncode}: {' '.join(argv)}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def pid_alive(pid: int) -> bool:
    """True if *pid* runs (a zombie counts as ended: it only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def kill_pids(pids: Sequence[int], grace: float = TERM_GRACE) -> None:
    """SIGTERM each PID, wait at most *grace* seconds, then SIGKILL the rest (bounded, never waits forever)."""
    pids = [p for p in pids if p > 1 and p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def ns_pids(ns: str) -> list[int]:
    proc = _sh(["ip", "netns", "pids", ns], check=False, timeout=10)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


class LabProcess(subprocess.Popen):  # type: ignore[type-arg]
    """A process started inside a host's namespace; its output goes to ``log_path``."""

    name: str
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no log at {self.log_path})"


class Host:
    """One network namespace of a lab: run commands in it, start processes in it, ask it about its addresses."""

    def __init__(self, lab: Lab, name: str, ns: str) -> None:
        self.lab = lab
        self.name = name
        self.ns = ns

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r})"

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def run(
        self, cmd: Sequence[str], check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run *cmd* in this namespace and wait for it (at most *timeout* s); LabError if it fails and *check*."""
        return _sh(self.argv(cmd), check=check, timeout=timeout, input=input)

    def spawn(
        self, cmd: Sequence[str], name: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> LabProcess:
        """Start *cmd* in the background in this namespace; the lab stops it on exit.

        ``ip netns exec`` execs the command, so the PID is the process itself.
        """
        log_path = self.lab.workdir / f"{self.name}-{name}.log"
        with open(log_path, "ab") as log:
            proc = LabProcess(
                self.argv(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        proc.name, proc.log_path = name, log_path
        self.lab.processes.append(proc)
        return proc

    def ping(self, addr: str, count: int = 1, timeout: float = 2) -> bool:
        """True if *addr* answers at least one of *count* pings within *timeout* seconds."""
        deadline = max(1, round(timeout))
        proc = self.run(
            ["ping", "-n", "-q", "-c", str(count), "-W", str(deadline), "-w", str(deadline), addr],
            check=False,
            timeout=timeout + 5,
        )
        return proc.returncode == 0

    def addr(self, dev: str) -> str:
        """The first IPv4 address of *dev* (without prefix length); LabError if it has none."""
        addrs = self.addrs(dev)
        if not addrs:
            raise LabError(f"{self.name}: {dev} has no IPv4 address")
        return addrs[0]

    def addrs(self, dev: str) -> list[str]:
        """Every IPv4 address of *dev*, in the kernel's order."""
        proc = self.run(["ip", "-j", "-4", "addr", "show", "dev", dev])
        return [str(i["local"]) for link in json.loads(proc.stdout or "[]") for i in link.get("addr_info", [])]

    def sysctl(self, key: str, value: str | int) -> None:
        self.run(["sysctl", "-qw", f"{key}={value}"])

    def route(self, dst: str, via: str) -> None:
        self.run(["ip", "route", "replace", dst, "via", via])

    def nft(self, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -`` syntax) into this namespace."""
        self.run(["nft", "-f", "-"], input=ruleset)

    def nft_counter(self, table: str, comment: str, family: str = "inet") -> int:
        """Packets counted by the rules of *table* whose comment is *comment*."""
        proc = self.run(["nft", "-j", "list", "table", family, table])
        total = 0
        for item in json.loads(proc.stdout).get("nftables", []):
            rule = item.get("rule")
            if rule and rule.get("comment") == comment:
                total += sum(e["counter"]["packets"] for e in rule.get("expr", []) if "counter" in e)
        return total


class Lab:
    """A set of namespaces and processes with one owner; use it as a context manager."""

    def __init__(self, workdir: Path | None = None, prefix: str = PREFIX) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError("prefix: 1-8 lowercase letters/digits, starting with a letter")
        self.tag = secrets.token_hex(3)
        self.prefix = f"{prefix}-{self.tag}-"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"coterie-lab-{self.tag}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hosts: dict[str, Host] = {}
        self.processes: list[LabProcess] = []
        self._owner_file: Path | None = None
        self.closed = False

    def __enter__(self) -> Lab:
        self._mark_owner()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _mark_owner(self) -> None:
        """Record our PID so that ``cleanup_stale`` leaves a live lab alone."""
        with contextlib.suppress(OSError):
            OWNER_DIR.mkdir(parents=True, exist_ok=True)
            self._owner_file = OWNER_DIR / f"{self.tag}.owner"
            self._owner_file.write_text(str(os.getpid()))

    def add_host(self, name: str, forward: bool = False) -> Host:
        """A new namespace ``<prefix><name>`` with loopback up (and IPv4 forwarding if *forward*)."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", name):
            raise ValueError(f"host name {name!r}: 1-16 lowercase letters/digits, starting with a letter")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists already")
        if self.closed:
            raise LabError("the lab is closed")
        if self._owner_file is None:
            self._mark_owner()
        ns = self.prefix + name
        _sh(["ip", "netns", "add", ns])
        host = self.hosts[name] = Host(self, name, ns)
        _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        if forward:
            host.sysctl("net.ipv4.ip_forward", 1)
        return host

    def link(
        self,
        a: Host,
        a_dev: str,
        b: Host,
        b_dev: str,
        a_addr: str | None = None,
        b_addr: str | None = None,
        mtu: int = 1500,
    ) -> None:
        """A veth pair between *a* and *b*, addresses (CIDR) assigned and both ends up."""
        _sh(
            [
                "ip",
                "-n",
                a.ns,
                "link",
                "add",
                a_dev,
                "mtu",
                str(mtu),
                "type",
                "veth",
                "peer",
                "name",
                b_dev,
                "mtu",
                str(mtu),
                "netns",
                b.ns,
            ]
        )
        for host, dev, cidr in ((a, a_dev, a_addr), (b, b_dev, b_addr)):
            if cidr:
                ipaddress.ip_interface(cidr)  # ValueError for a typo, before ip says something vaguer
                _sh(["ip", "-n", host.ns, "addr", "add", cidr, "dev", dev])
            _sh(["ip", "-n", host.ns, "link", "set", dev, "up"])

    def bridge(self, host: Host, dev: str, cidr: str | None = None) -> None:
        """A Linux bridge *dev* in *host* (for a LAN with several hosts), address assigned and up."""
        host.run(["ip", "link", "add", dev, "type", "bridge"])
        if cidr:
            host.run(["ip", "addr", "add", cidr, "dev", dev])
        host.run(["ip", "link", "set", dev, "up"])

    def enslave(self, host: Host, dev: str, bridge: str) -> None:
        host.run(["ip", "link", "set", dev, "master", bridge])

    def namespaces(self) -> list[str]:
        """This lab's namespaces that exist now (asks the kernel, not our records)."""
        return [ns for ns in list_namespaces() if ns.startswith(self.prefix)]

    def close(self) -> None:
        """Stop our processes, then anything left in our namespaces, then delete the namespaces."""
        if self.closed:
            return
        self.closed = True
        kill_pids([p.pid for p in self.processes if p.poll() is None])
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        hosts = list(self.hosts.values())
        for host in hosts:
            kill_pids(ns_pids(host.ns))
        for host in reversed(hosts):
            _sh(["ip", "netns", "del", host.ns], check=False)
        if self._owner_file is not None:
            with contextlib.suppress(OSError):
                self._owner_file.unlink()
            with contextlib.suppress(OSError):
                self._owner_file.with_suffix(".json").unlink()

    def publish(self, **extra: object) -> Path:
        """Describe this running lab in ``/run/coterie-lab/<tag>.json`` so other commands can find it.

        What ``python3 -m compose down|exec|list`` read: owner PID, work
        directory, {host: namespace}, and whatever *extra* the launcher adds.
        """
        path = OWNER_DIR / f"{self.tag}.json"
        doc = {
            "tag": self.tag,
            "pid": os.getpid(),
            "workdir": str(self.workdir),
            "hosts": {name: host.ns for name, host in self.hosts.items()},
            **extra,
        }
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))
        return path

    def remove_workdir(self) -> None:
        """Delete the work directory (logs) if the Lab made it; call after a passing test."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def list_namespaces() -> list[str]:
    proc = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.split()]


def cleanup_stale(prefix: str = PREFIX, force: bool = False) -> list[str]:
    """Delete namespaces ``<prefix>-<tag>-*`` left by a killed lab, with the processes inside them.

    A lab whose owner process still runs is left alone unless *force*: other
    test runs on the same machine may be using theirs. Returns the deleted names.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}-([0-9a-f]{{6}})-[a-z][a-z0-9]*$")
    removed = []
    for ns in list_namespaces():
        match = pattern.match(ns)
        if not match or (not force and _owner_alive(match.group(1))):
            continue
        kill_pids(ns_pids(ns))
        _sh(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    for tag in {pattern.match(ns).group(1) for ns in removed}:  # type: ignore[union-attr]
        for suffix in (".owner", ".json"):
            with contextlib.suppress(OSError):
                (OWNER_DIR / f"{tag}{suffix}").unlink()
    return removed


def _owner_alive(tag: str) -> bool:
    try:
        pid = int((OWNER_DIR / f"{tag}.owner").read_text().strip())
    except (OSError, ValueError):
        return False
    return pid_alive(pid)
