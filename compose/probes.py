"""Tiny traffic probes run inside lab namespaces with ``python3 -c``: what address and port did the far side see?

They are source text rather than importable functions because they run in a
fresh interpreter inside another namespace, which needs nothing from this
checkout. Every probe ends by itself (bounded by a packet count and a timeout).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from compose.netns import Host, LabProcess

# Answers each datagram with "ip:port" of its sender; stops after COUNT datagrams or TIMEOUT seconds.
UDP_ECHO = """
import socket, sys, time
port, count, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
deadline = time.monotonic() + timeout
print("ready", flush=True)
while count > 0 and time.monotonic() < deadline:
    s.settimeout(max(0.05, deadline - time.monotonic()))
    try:
        data, peer = s.recvfrom(2048)
    except socket.timeout:
        break
    s.sendto(f"{peer[0]}:{peer[1]}".encode(), peer)
    print(f"{peer[0]}:{peer[1]}", flush=True)
    count -= 1
"""

# Sends one datagram from SPORT (0: any) to HOST:PORT, retrying up to 5 times; prints the answer or exits 1.
UDP_ASK = """
import socket, sys
host, port, sport, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", sport))
s.settimeout(timeout / 5)
for _ in range(5):
    s.sendto(b"who am i", (host, port))
    try:
        print(s.recvfrom(2048)[0].decode())
        sys.exit(0)
    except socket.timeout:
        pass
sys.exit(1)
"""

# Accepts TCP connections on PORT and answers each with "ip:port" of the client; COUNT connections or TIMEOUT s.
TCP_ECHO = """
import socket, sys, time
port, count, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(8)
deadline = time.monotonic() + timeout
print("ready", flush=True)
while count > 0 and time.monotonic() < deadline:
    s.settimeout(max(0.05, deadline - time.monotonic()))
    try:
        conn, peer = s.accept()
    except socket.timeout:
        break
    with conn:
        conn.sendall(f"{peer[0]}:{peer[1]}".encode())
    count -= 1
"""

# Connects to HOST:PORT and prints what the server says; exit 1 if it cannot connect within TIMEOUT.
TCP_ASK = """
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((host, port), timeout=timeout) as c:
        print(c.recv(2048).decode())
except OSError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
"""


def _py(code: str, args: Sequence[object]) -> list[str]:
    return [sys.executable, "-c", code, *(str(a) for a in args)]


def udp_echo(host: Host, port: int, count: int = 10, timeout: float = 30) -> LabProcess:
    """Start a UDP echo in *host*; returns once its socket is bound (or raises with its log)."""
    return _ready(host.spawn(_py(UDP_ECHO, [port, count, timeout]), f"udp-echo-{port}"))


def tcp_echo(host: Host, port: int, count: int = 10, timeout: float = 30) -> LabProcess:
    return _ready(host.spawn(_py(TCP_ECHO, [port, count, timeout]), f"tcp-echo-{port}"))


def udp_ask(host: Host, addr: str, port: int, sport: int = 0, timeout: float = 3) -> str | None:
    """The "ip:port" the echo at *addr*:*port* saw for a datagram from *host* (None: no answer)."""
    proc = host.run(_py(UDP_ASK, [addr, port, sport, timeout]), check=False, timeout=timeout + 10)
    return proc.stdout.strip() if proc.returncode == 0 else None


def tcp_ask(host: Host, addr: str, port: int, timeout: float = 3) -> str | None:
    """The "ip:port" the TCP echo at *addr*:*port* saw for a connection from *host* (None: no connection)."""
    proc = host.run(_py(TCP_ASK, [addr, port, timeout]), check=False, timeout=timeout + 10)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _ready(proc: LabProcess, timeout: float = 10) -> LabProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "ready" in proc.log_path.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"probe {proc.name} did not start; log {proc.log_path}:\n{proc.log_tail()}")
