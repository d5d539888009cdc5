#!/usr/bin/env python3
"""Password logins: argon2id cost at the chosen parameters, logins per second, and a legitimate user's
login time while a bad-login flood runs (B3, and the figure issue 4 asks for).

Rows:
  argon2id verify     one verification in this process (the floor of a login)
  verify, N threads   verifications per second with HASH_SLOTS threads (libsodium releases the GIL)
  login (server)      full logins through the real server (broker, auth, SQLite, a node created),
                      several clients at once, each from its own loopback address
  legit, idle         one user's sequential logins, nothing else running
  legit, flood 1 src  the same while one address floods one account with wrong passwords (pipelined)
  legit, flood many   the same while attackers try other accounts, each from its own address

Every login creates a node, so each sample is a real first login. Medians and 99th percentiles;
the machine is shared and noisy, so compare rows of one run.

    python bench/auth_login.py [--samples 40] [--seconds 10]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bus.client import Client  # noqa: E402
from bus.errors import BusError, RemoteError  # noqa: E402
from bus.keys import KeyPair, load_public_key  # noqa: E402
from bus.messages.auth import Login, UserAdd, UserAllow  # noqa: E402
from bus.messages.datastore import VpnCreate  # noqa: E402
from services.auth import passwords  # noqa: E402
from services.auth.service import HASH_SLOTS, WORKERS  # noqa: E402
from tests.helpers.server import CoterieServer  # noqa: E402

PASSWORD = "bench password 1"
_names = itertools.count()


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(label: str, samples: list[float], extra: str = "") -> None:
    ms = [s * 1000 for s in samples]
    print(f"{label:<22} {len(ms):>6} {statistics.median(ms):>9.1f} {pct(ms, 0.99):>9.1f}  {extra}")


def verify_floor(count: int) -> list[float]:
    stored = passwords.hash_password(PASSWORD)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        passwords.verify_password(stored, PASSWORD)
        samples.append(time.perf_counter() - started)
    return samples


def verify_rate(seconds: float, threads: int) -> float:
    stored = passwords.hash_password(PASSWORD)
    done = Counter[str]()
    deadline = time.monotonic() + seconds

    def spin() -> None:
        while time.monotonic() < deadline:
            passwords.verify_password(stored, PASSWORD)
            done["n"] += 1

    workers = [threading.Thread(target=spin) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return done["n"] / seconds


def client(server: CoterieServer, source: str, timeout: float = 30.0) -> Client:
    endpoint = f"tcp://{source}:0;127.0.0.1:{server.port}"
    key = load_public_key(server.home / "keys" / "server.pub")
    return Client(endpoint, KeyPair.generate(), key, timeout=timeout, retries=3)


def one_login(server: CoterieServer, user: str, source: str) -> float:
    """One first login with a fresh key, retried while the server says "busy"; returns seconds, retries included."""
    started = time.perf_counter()
    with client(server, source) as c:
        for _ in range(50):
            try:
                c.request("auth", Login(user=user, password=PASSWORD, node_name=f"n{next(_names)}"))
                break
            except RemoteError as exc:
                if not exc.retriable:
                    raise
    return time.perf_counter() - started


def server_rate(server: CoterieServer, users: list[str], seconds: float) -> tuple[float, list[float]]:
    samples: list[float] = []
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def run(index: int) -> None:
        while time.monotonic() < deadline:
            took = one_login(server, users[index], f"127.3.{index}.1")
            with lock:
                samples.append(took)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(users))]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(samples) / (time.monotonic() - started), samples


def legit(server: CoterieServer, count: int, source: str) -> list[float]:
    return [one_login(server, "legit", source) for _ in range(count)]


def flood_one_source(server: CoterieServer, stop: threading.Event, sent: Counter[str]) -> None:
    with client(server, "127.0.0.2", timeout=60) as c:
        c.retries = 0
        while not stop.is_set():
            batch = [("auth", Login(user="victim", password=f"guess{i}")) for i in range(200)]
            for result in c.request_many(batch, timeout=60):
                sent[
                    "throttled"
                    if "too many" in str(result)
                    else "refused"
                    if isinstance(result, RemoteError)
                    else "other"
                ] += 1


def flood_many(server: CoterieServer, stop: threading.Event, sent: Counter[str], index: int) -> None:
    for attempt in itertools.count():
        if stop.is_set():
            return
        try:
            with client(server, f"127.4.{index}.{attempt % 250 + 1}", timeout=10) as c:
                c.retries = 0
                c.request("auth", Login(user=f"ghost{index}-{attempt}", password="guess"))
        except (RemoteError, BusError) as exc:
            sent["busy" if "busy" in str(exc) else "refused"] += 1


def under(server: CoterieServer, samples: int, flooder, threads: int) -> tuple[list[float], Counter[str], float]:  # type: ignore[no-untyped-def]
    stop, sent = threading.Event(), Counter[str]()
    workers = [
        threading.Thread(target=flooder, args=(server, stop, sent, *([i] if threads > 1 else [])))
        for i in range(threads)
    ]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    time.sleep(2.0)  # let the flood reach its steady state (and the source its lockout)
    try:
        times = legit(server, samples, "127.0.0.3")
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
    return times, sent, sent.total() / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=40, help="legitimate logins per row")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the rate measurements")
    args = parser.parse_args()
    p = passwords.CURRENT
    print(f"argon2id m={p.m_kib // 1024} MiB t={p.t} p={p.p}; auth: {WORKERS} workers, {HASH_SLOTS} hash slots")
    print(f"{'row':<22} {'n':>6} {'p50 ms':>9} {'p99 ms':>9}  notes")
    row("argon2id verify", verify_floor(20))
    rate = verify_rate(args.seconds / 2, HASH_SLOTS)
    print(f"{f'verify, {HASH_SLOTS} threads':<22} {'':>6} {'':>9} {'':>9}  {rate:.1f} verifications/s")
    with tempfile.TemporaryDirectory() as tmp:
        server = CoterieServer(Path(tmp)).start()
        try:
            server.mutate(VpnCreate, name="bench", subnet="10.99.0.0/16")
            users = ["legit", "victim"] + [f"load{i}" for i in range(HASH_SLOTS * 2)]
            for user in users:
                server.request(UserAdd(name=user, password=PASSWORD), service="auth")
                server.request(UserAllow(name=user, vpn="bench"), service="auth")
            rate, samples = server_rate(server, users[2:], args.seconds)
            row("login (server)", samples, f"{rate:.1f} logins/s with {len(users) - 2} clients")
            row("legit, idle", legit(server, args.samples, "127.0.0.3"))
            times, sent, flood_rate = under(server, args.samples, flood_one_source, 1)
            row("legit, flood 1 src", times, f"flood {flood_rate:.0f} attempts/s: {dict(sent)}")
            times, sent, flood_rate = under(server, args.samples, flood_many, 8)
            row("legit, flood many", times, f"flood {flood_rate:.0f} attempts/s from 8 attackers: {dict(sent)}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
