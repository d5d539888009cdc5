"""Real traffic between lab namespaces: TCP transfers checked by SHA-256, UDP streams timed by the receiver.

Each end is a short ``python3 -c`` program run inside a namespace, so what
crosses the tunnel is ordinary kernel TCP and UDP from ordinary sockets.
Results come back as JSON on stdout or in a file the test names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from compose.netns import Host, LabProcess

TCP_SINK = r"""
import hashlib, json, socket, sys, time
addr, port, out, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((addr, port)); s.listen(1)
s.settimeout(limit)
print("listening", flush=True)
c, peer = s.accept(); c.settimeout(limit)
h, n, start = hashlib.sha256(), 0, time.monotonic()
while True:
    d = c.recv(1 << 16)
    if not d: break
    h.update(d); n += len(d)
open(out + ".tmp", "w").write(json.dumps({"bytes": n, "sha256": h.hexdigest(), "seconds": time.monotonic() - start}))
import os; os.replace(out + ".tmp", out)
"""

TCP_SEND = r"""
import hashlib, json, os, socket, sys, time
addr, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seconds, limit = float(sys.argv[4]), float(sys.argv[5])
s = socket.create_connection((addr, port), timeout=limit)
h, n, chunk, start = hashlib.sha256(), 0, 1 << 16, time.monotonic()
while (n < total) if seconds <= 0 else (time.monotonic() - start < seconds):
    d = os.urandom(chunk if seconds > 0 else min(chunk, total - n))
    s.sendall(d); h.update(d); n += len(d)
    if seconds > 0: time.sleep(0.002)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(json.dumps({"bytes": n, "sha256": h.hexdigest(), "seconds": time.monotonic() - start}))
"""

TCP_CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close(); print("connected")
except OSError as e:
    print("failed", e)
"""

UDP_SINK = r"""
import json, os, socket, sys, time
addr, port, out, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, port)); s.settimeout(0.5)
print("listening", flush=True)
n, last, end = 0, None, time.monotonic() + limit
while time.monotonic() < end:
    try:
        s.recv(2048); n += 1; last = time.time()
    except socket.timeout:
        pass
    if n and n % 20 == 0 or last is None or time.time() - (last or 0) > 0.4:
        open(out + ".tmp", "w").write(json.dumps({"packets": n, "last": last}))
        os.replace(out + ".tmp", out)
"""

UDP_SEND = r"""
import socket, sys, time
addr, port, seconds, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + seconds
while time.monotonic() < end:
    try: s.sendto(b"x" * 100, (addr, port))
    except OSError: pass
    time.sleep(1 / rate)
"""


def _py(code: str, *args: object) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def tcp_sink(host: Host, addr: str, port: int, out: Path, limit: float = 90) -> LabProcess:
    proc = host.spawn(_py(TCP_SINK, addr, port, out, limit), f"tcp-sink-{port}")
    _wait_listening(proc)
    return proc


def tcp_send(host: Host, addr: str, port: int, total: int = 0, seconds: float = 0, limit: float = 90) -> dict:
    """Send *total* random bytes (or for *seconds*); returns what was sent: bytes and SHA-256."""
    proc = host.run(_py(TCP_SEND, addr, port, total, seconds, limit), timeout=limit + 30)
    return dict(json.loads(proc.stdout))


def tcp_connects(host: Host, addr: str, port: int, timeout: float = 3) -> bool:
    return host.run(_py(TCP_CONNECT, addr, port, timeout), timeout=timeout + 10).stdout.startswith("connected")


def udp_sink(host: Host, addr: str, port: int, out: Path, limit: float = 60) -> LabProcess:
    proc = host.spawn(_py(UDP_SINK, addr, port, out, limit), f"udp-sink-{port}")
    _wait_listening(proc)
    return proc


def udp_send(host: Host, addr: str, port: int, seconds: float, rate: float = 50) -> LabProcess:
    return host.spawn(_py(UDP_SEND, addr, port, seconds, rate), f"udp-send-{port}")


def read_result(path: Path) -> dict | None:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _wait_listening(proc: LabProcess, timeout: float = 10) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "listening" in Path(proc.log_path).read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args} did not start listening:\n{proc.log_tail()}")
