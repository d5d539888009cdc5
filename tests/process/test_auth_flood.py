"""A2: login floods. One address hammering one account is locked out without costing hashes, and the real
user, from elsewhere, logs in once the account's short backoff has passed; a flood across many accounts
and addresses runs at most HASH_SLOTS hashes at once (the auth process's peak memory shows it).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.errors import BusError, RemoteError
from bus.messages.auth import Enrolled, Login, UserAdd, UserAllow
from bus.messages.datastore import VpnCreate
from services.auth import limiter
from services.auth.service import HASH_SLOTS, REFUSED, WORKERS
from tests.helpers.server import CoterieServer
from tests.process.auth_helpers import PASSWORD, START_TIMEOUT, anonymous_client, audit_entries

pytestmark = pytest.mark.timeout(300)

FLOOD = 2000
HASH_MIB = 64


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoterieServer]:
    srv = CoterieServer(tmp_path).start(timeout=START_TIMEOUT)
    srv.mutate(VpnCreate, name="office", subnet="10.5.0.0/24")
    srv.request(UserAdd(name="alice", password=PASSWORD), service="auth")
    srv.request(UserAllow(name="alice", vpn="office"), service="auth")
    yield srv
    srv.stop()


def _flood(server: CoterieServer, count: int, stop: threading.Event | None = None) -> Counter[str]:
    """*count* wrong-password logins for alice from 127.0.0.2, pipelined on one connection."""
    outcomes: Counter[str] = Counter()
    with anonymous_client(server, source="127.0.0.2", timeout=60) as client:
        sent = 0
        while sent < count and not (stop and stop.is_set()):
            batch = min(250, count - sent)
            requests = [("auth", Login(user="alice", password=f"guess {sent + i}")) for i in range(batch)]
            for result in client.request_many(requests, timeout=60):
                if isinstance(result, Enrolled):
                    outcomes["accepted"] += 1
                elif isinstance(result, RemoteError) and result.message == REFUSED:
                    outcomes["refused"] += 1
                elif isinstance(result, RemoteError) and result.message.startswith("too many failed attempts"):
                    outcomes["throttled"] += 1
                else:
                    outcomes[f"other: {result}"[:80]] += 1
            sent += batch
    return outcomes


def test_flood_locks_the_source_out_and_the_real_user_still_gets_in(server: CoterieServer) -> None:
    outcomes = _flood(server, FLOOD)
    assert outcomes["accepted"] == 0, outcomes
    # Checked (hashed) guesses stop at the source lockout, give or take the requests already in flight.
    assert outcomes["refused"] <= limiter.SOURCE_LOCKOUT_AFTER + WORKERS, outcomes
    assert outcomes["throttled"] >= FLOOD - limiter.SOURCE_LOCKOUT_AFTER - WORKERS, outcomes
    entries = audit_entries(server)
    lockouts = [e for e in entries if e.event == "lockout" and e.source == "127.0.0.2"]
    assert any("source:127.0.0.2" in e.detail for e in lockouts), [e.detail for e in lockouts]
    assert len([e for e in entries if e.event == "login.fail"]) == outcomes["refused"]
    assert len([e for e in entries if e.event == "login.throttled"]) < 50, "refusals are audited in sums"

    # The flood goes on; the real user, from another address, gets in once alice's backoff has passed.
    stop = threading.Event()
    flooder = threading.Thread(target=_flood, args=(server, 10**6, stop), daemon=True)
    flooder.start()
    try:
        started, seen, node = time.monotonic(), Counter[str](), None
        with anonymous_client(server, source="127.0.0.3", timeout=20) as client:
            while node is None and time.monotonic() - started < limiter.USER_MAX_DELAY + 30:
                try:
                    reply = client.request("auth", Login(user="alice", password=PASSWORD, node_name="real"))
                except RemoteError as exc:
                    seen[exc.message.split(";")[0]] += 1
                    time.sleep(0.5)
                    continue
                except BusError as exc:
                    seen[str(exc)[:40]] += 1
                    continue
                assert isinstance(reply, Enrolled)
                node = reply.node
        waited = time.monotonic() - started
    finally:
        stop.set()
        flooder.join(timeout=90)
    assert node == "real", seen
    assert set(seen) <= {"too many failed attempts"}, seen  # held back, never refused as a wrong password
    assert waited < limiter.USER_MAX_DELAY + 30
    ok = [e for e in audit_entries(server) if e.event == "login.ok"]
    assert [(e.identity, e.source) for e in ok] == [("alice", "127.0.0.3")]


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_flood_across_accounts_and_addresses_hashes_at_most_hash_slots_at_once(server: CoterieServer) -> None:
    pid = server.pids()["auth"]
    base = Path(f"/proc/{pid}/status").read_text()
    rss_now = next(int(x.split()[1]) for x in base.splitlines() if x.startswith("VmRSS:")) / 1024
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def attacker(index: int) -> None:
        for attempt in range(3):  # each its own address and account: no throttle helps here
            source = f"127.1.{index}.{attempt + 1}"
            try:
                with anonymous_client(server, source=source, timeout=60) as client:
                    client.request("auth", Login(user=f"acct{index}-{attempt}", password="guess"))
            except RemoteError as exc:
                with lock:
                    outcomes[exc.message[:40]] += 1

    threads = [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    # Each attempt is refused, or answered "busy, retry" (retriable) when no hash slot frees up within
    # HASH_WAIT, or left waiting at the broker past its SERVICE_WAIT: never accepted, never a hang.
    answers = {REFUSED[:40], "the auth service is busy; retry", "no auth worker is available"}
    assert outcomes.total() == 72 and set(outcomes) <= answers, outcomes
    assert outcomes[REFUSED[:40]] >= HASH_SLOTS, outcomes
    peak = _peak_rss_mib(pid)
    # Unbounded, WORKERS hashes would run at once (WORKERS x 64 MiB over the resting size).
    assert peak <= rss_now + (HASH_SLOTS + 1) * HASH_MIB, (rss_now, peak)
    assert HASH_SLOTS < WORKERS
