#!/usr/bin/env python3
"""Control-plane benchmark: real server processes and N simulated agents with real CURVE connections.

    python3 bench/control.py --agents 1000 [--db sqlite|postgres] [--dsn URL] [--json PATH]

The server is the real one (`coterie server up`: broker, datastore, auth,
keydist, fanout, relay) on loopback, SQLite in a temporary directory by
default; ``--db postgres`` starts a throwaway PostgreSQL cluster
(tests/helpers/postgres.py, Debian package postgresql) unless ``--dsn``
names an existing database. The agents (bench/control_agents.py) run in
worker processes, up to ``--per-process`` each, every one with its own key,
connection, snapshot, heartbeat every 2 s and the real replica.

Setup: one hub-spoke VPN ``all`` whose hub (``hub``, never connected) sees
everyone and whose spokes (the agents) see the hub, so that a view stays
small at 10,000 nodes; and a VPN ``solo`` holding only agent ``b0``. The N
nodes are written into the datastore in one transaction with one change-log
row (enrolling 10,000 nodes one by one through auth would take longer than
the benchmark); everything after that goes through the operator's requests.

Measured, in this order:
  a. a change that concerns every node (a route behind the hub, added and
     removed in turn): per agent, time from the request until it applied it;
  b. a change that concerns one node (a route behind b0 in ``solo``): its
     time, and how many updates the other N-1 agents received (should be 0);
  c. server RSS per connected agent (broker, fanout, datastore; /proc), and
     the server's CPU while nothing changes, with the agents connected
     (their heartbeats) and before they connect (its own timers);
  e. a burst of --burst changes within one second (routes behind the hub):
     time until every agent holds the view the database gives it, and how
     the fanout batched them;
  d. a full server restart: time from stopping the server until every agent
     has reconnected and been told by the new server that its view is current
     (resumed from its own revision, or after a new snapshot).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.control_agents import AgentSpec, worker_main  # noqa: E402
from bus.keys import KeyPair, load_keypair  # noqa: E402
from bus.messages.common import Health, HealthRequest  # noqa: E402
from bus.messages.datastore import MemberAdd, Mutated, NodeAdd, RouteAdd, RouteRemove, VpnCreate  # noqa: E402
from nodeagent.sync import RECEIPT_DELAY  # noqa: E402
from tests.conftest import wait_until  # noqa: E402
from tests.helpers.server import CoterieServer  # noqa: E402

HUB_ROUTE = "192.168.99.0/24"
SOLO_ROUTE = "192.168.98.0/24"
SUBNET = "10.64.0.0/16"  # room for 65,000 agents
SERVER_PROCESSES = ("broker", "fanout", "datastore")
WINDOW = 16  # burst requests unanswered at once
# After the agents have sent the receipts of a change to all, a moment for the server to take them in before the next
# change, so that each change is measured alone (see changes_to_all).
RECEIPTS_SETTLE = RECEIPT_DELAY


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/control.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=1000, help="simulated agents (default 1000)")
    ap.add_argument("--per-process", type=int, default=2500, help="agents per worker process (default 2500)")
    ap.add_argument("--changes", type=int, default=10, help="changes timed in a and in b (even; default 10)")
    ap.add_argument("--burst", type=int, default=1000, help="changes in the one-second burst (0: skip; default 1000)")
    ap.add_argument("--no-restart", action="store_true", help="skip the server restart (d)")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite", help="the datastore (default sqlite)")
    ap.add_argument("--dsn", default="", help="an existing PostgreSQL database URL (with --db postgres)")
    ap.add_argument("--heartbeat", type=float, default=2.0, help="agents' heartbeat interval, s (default 2, real)")
    ap.add_argument("--timeout", type=float, default=300.0, help="s any one phase may take (default 300)")
    ap.add_argument(
        "--idle-window", type=float, default=10.0, help="s over which the idle server's CPU is measured (default 10)"
    )
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    ap.add_argument("--log", type=Path, help="keep the server's log here")
    args = ap.parse_args(argv)
    if not 1 <= args.agents <= 15_000:
        ap.error("--agents must be 1..15000 (one broker process; the file limit is 20,000 here)")
    if not 100 <= args.per_process <= 5000:
        ap.error("--per-process must be 100..5000")
    if args.changes < 2 or args.changes % 2 or args.changes > 1000:
        ap.error("--changes must be even, 2..1000")
    if not 0 <= args.burst <= 10_000:
        ap.error("--burst must be 0..10000")
    if not 0.2 <= args.heartbeat <= 60:
        ap.error("--heartbeat must be 0.2..60 s")
    if not 1 <= args.idle_window <= 120:
        ap.error("--idle-window must be 1..120 s")
    if args.dsn and args.db != "postgres":
        ap.error("--dsn needs --db postgres")
    return args


# ---------------------------------------------------------------------- figures
def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def spread(values: list[float], scale: float = 1e3) -> dict[str, float]:
    """p50, p99 and max of *values* (seconds), in milliseconds by default."""
    return {
        "p50": statistics.median(values) * scale if values else float("nan"),
        "p99": percentile(values, 99) * scale,
        "max": max(values) * scale if values else float("nan"),
    }


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------- the agents' processes
@dataclass
class Workers:
    """The worker processes and their pipes; every call asks all of them and gathers the answers."""

    conns: list[Any]
    processes: list[multiprocessing.Process]
    names: list[str]

    @classmethod
    def start(cls, server: CoterieServer, specs: list[AgentSpec], per_process: int, heartbeat: float) -> Workers:
        endpoint = f"tcp://127.0.0.1:{server.port}"
        public = load_keypair(server.home / "keys" / "server.key").public
        ctx = multiprocessing.get_context("spawn")
        conns, processes = [], []
        for start in range(0, len(specs), per_process):
            parent, child = ctx.Pipe()
            chunk = specs[start : start + per_process]
            process = ctx.Process(target=worker_main, args=(child, endpoint, public, chunk, heartbeat), daemon=True)
            process.start()
            conns.append(parent)
            processes.append(process)
        workers = cls(conns, processes, [s.name for s in specs])
        for conn in conns:
            if not conn.poll(120) or conn.recv() != "ready":
                raise SystemExit("a worker process did not start")
        return workers

    def ask(self, *request: object) -> list[Any]:
        for conn in self.conns:
            conn.send(request)
        answers = []
        for conn in self.conns:
            if not conn.poll(60):
                raise SystemExit(f"a worker process did not answer {request[0]!r}")
            answers.append(conn.recv())
        return answers

    def flat(self, *request: object) -> list[Any]:
        return [item for answer in self.ask(*request) for item in answer]

    def total(self, *request: object) -> int:
        return sum(self.ask(*request))

    def counters(self) -> dict[str, int]:
        merged: dict[str, int] = {}
        for state in self.ask("state"):
            for key, value in state["counters"].items():
                merged[key] = merged.get(key, 0) + value
        return merged

    def stop(self) -> None:
        for conn, process in zip(self.conns, self.processes, strict=True):
            try:
                conn.send(("stop",))
                conn.poll(20) and conn.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
            process.join(timeout=20)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


# ---------------------------------------------------------------------- setup
def populate(server: CoterieServer, count: int) -> list[AgentSpec]:
    """The hub, the VPNs, and *count* agent nodes written in one transaction (one change-log row)."""
    from sqlalchemy import insert, select

    from services.datastore import repo
    from services.datastore.db import make_engine, transaction
    from services.datastore.models import Membership, Node, Vpn, utcnow

    server.mutate(VpnCreate, name="all", subnet=SUBNET, topology="hub-spoke")
    server.mutate(VpnCreate, name="solo", subnet="10.65.0.0/24")
    server.mutate(NodeAdd, name="hub", vpns=[])
    server.mutate(MemberAdd, node="hub", vpn="all", role="hub")
    keys = [KeyPair.generate() for _ in range(count)]
    specs = [AgentSpec(f"b{i}", k.public, k.secret) for i, k in enumerate(keys)]
    engine = make_engine(server.database_url)
    try:
        with transaction(engine) as session:
            vpn_id = session.execute(select(Vpn.id).where(Vpn.name == "all")).scalar_one()
            now = utcnow()
            rows = [
                {"name": s.name, "curve_key": k.public_text, "tags": [], "endpoints": [], "created_at": now}
                for s, k in zip(specs, keys, strict=True)
            ]
            session.execute(insert(Node), rows)
            ids = dict(session.execute(select(Node.name, Node.id).where(Node.name.in_([s.name for s in specs]))).all())
            hosts = ipaddress.ip_network(SUBNET).hosts()
            for _ in range(16):
                next(hosts)  # the first addresses are left to members added by operators (the hub)
            members = [
                {"node_id": ids[s.name], "vpn_id": vpn_id, "vip": str(next(hosts)), "role": "member"} for s in specs
            ]
            session.execute(insert(Membership), members)
            repo.record(session, "node.add", f"bench: added {count} nodes to all", "bench", [vpn_id], [])
    finally:
        engine.dispose()
    server.mutate(MemberAdd, node="b0", vpn="solo", role="member")
    return specs


def expected_digests(server: CoterieServer) -> dict[str, str]:
    """Each node's view digest as the database gives it now (what a converged agent holds)."""
    from services.datastore.db import make_engine, reading
    from services.datastore.netmap import World

    engine = make_engine(server.database_url)
    try:
        with reading(engine) as session:
            world = World.load(session)
            return {n.name: world.view(i).digest() for i, n in world.nodes.items() if n.curve_key}
    finally:
        engine.dispose()


def fanout_counters(server: CoterieServer) -> dict[str, int]:
    """The fanout's counters; a busy fanout may answer `service_unavailable` a few times first."""
    from bus.errors import BusError

    for _ in range(10):
        try:
            reply = server.request(HealthRequest(), service="fanout")
            return dict(reply.counters) if isinstance(reply, Health) else {}
        except BusError:
            time.sleep(1.0)
    return {}


def server_rss(server: CoterieServer) -> dict[str, int]:
    pids = server.pids()
    return {name: rss_kb(pids[name]) for name in SERVER_PROCESSES if name in pids}


# ---------------------------------------------------------------------- measurements
def wait_reached(workers: Workers, revision: int, count: int, timeout: float) -> None:
    if not wait_until(lambda: workers.total("count_reached", revision) >= count, timeout, interval=0.01):
        raise SystemExit(f"revision {revision} did not reach every agent within {timeout:.0f}s")


def cpu_by_role(pids: dict[str, int], workers: Workers) -> dict[str, float]:
    """CPU seconds so far of the server's processes (*pids*: server.pids()) and of all the agents' together."""
    used = {name: cpu_s(pids[name]) for name in SERVER_PROCESSES if name in pids}
    used["agents"] = sum(cpu_s(p.pid) for p in workers.processes if p.pid is not None)
    return used


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Percent of one core each server process used over *seconds* while nothing changed, and their total.

    With agents connected that is their heartbeats (the fanout's presence, the broker's relaying) and the
    server's own timers; without, the timers alone: what an operator's idle server costs.
    """
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    used = {name: round(100 * (cpu_s(pid) - before[name]) / seconds, 2) for name, pid in pids.items()}
    used["total"] = round(sum(used.values()), 2)
    return used


def settle_receipts(workers: Workers, timeout: float) -> None:
    """Wait until every agent has sent the receipt of what it applied, and the server a moment more.

    An agent's receipt waits 0.5-1 s after its update, 2.5-5 s at 10,000 nodes (a quarter of the longer
    heartbeat interval asked there: nodeagent/sync.py receipt_delay). A fixed gap between changes left
    10,000 receipts of one change arriving in the middle of the next one's batch.
    """
    wait_until(lambda: workers.total("receipts_waiting") == 0, timeout, interval=0.1)
    time.sleep(RECEIPTS_SETTLE)


def changes_to_all(server: CoterieServer, workers: Workers, n: int, changes: int, timeout: float) -> dict[str, Any]:
    """(a) route behind the hub added and removed in turn; every agent's time to apply each change.

    Also the CPU each process spent: while the change spread (from the request until the last agent applied
    it) and per change in all (its receipts and the heartbeats meanwhile included). On a machine whose cores
    the agents share with the server, that is where a change's time goes."""
    pids = server.pids()  # asked once: a request through the broker per reading would add to what is measured
    cpu_before = cpu_by_role(pids, workers)
    spreading: dict[str, float] = dict.fromkeys(cpu_before, 0.0)  # CPU seconds while changes spread
    each: list[float] = []
    everyone: list[float] = []
    fanout_ms: list[float] = []  # the fanout's own time for the batch: load the world, compute, seal and send
    revision = 0
    for i in range(changes):
        kind = RouteAdd if i % 2 == 0 else RouteRemove
        cpu_start = cpu_by_role(pids, workers)
        started = time.monotonic()
        reply = server.mutate(kind, node="hub", vpn="all", cidr=HUB_ROUTE)
        revision = reply.revision
        wait_reached(workers, reply.revision, n, timeout)
        for role, used in cpu_by_role(pids, workers).items():
            spreading[role] += used - cpu_start[role]
        times = [t - started for t in workers.flat("reached", reply.revision)]
        each += times
        everyone.append(max(times))
        counters = fanout_counters(server)
        if counters.get("last_batch_updates") == n:
            fanout_ms.append(counters["last_batch_ms"] / 1e3)
        settle_receipts(workers, timeout)
    at_last = workers.total("count_reached", revision)
    cpu_after = cpu_by_role(pids, workers)
    return {
        "cpu_ms_per_change": {k: round((cpu_after[k] - v) * 1e3 / changes) for k, v in cpu_before.items()},
        "cpu_ms_while_spreading": {k: round(v * 1e3 / changes) for k, v in spreading.items()},
        "each_ms": spread(each),
        "all_applied_ms": spread(everyone),
        "fanout_batch_ms": spread(fanout_ms),
        "changes": changes,
        "at_last_revision": at_last,
    }


def change_to_one(server: CoterieServer, workers: Workers, changes: int, timeout: float) -> dict[str, Any]:
    """(b) route behind b0 in solo; b0's time to apply it, and the updates everyone else received."""
    before = workers.flat("pushes")
    times = []
    for i in range(changes):
        kind = RouteAdd if i % 2 == 0 else RouteRemove
        started = time.monotonic()
        reply = server.mutate(kind, node="b0", vpn="solo", cidr=SOLO_ROUTE)
        if not wait_until(lambda r=reply.revision: workers.ask("reached", r)[0][0] is not None, timeout, 0.005):
            raise SystemExit(f"revision {reply.revision} did not reach b0")
        times.append(workers.ask("reached", reply.revision)[0][0] - started)
        time.sleep(0.2)
    time.sleep(1.0)  # anything misrouted would have arrived by now
    after = workers.flat("pushes")
    others = sum(a - b for a, b in zip(after[1:], before[1:], strict=True))
    return {"ms": spread(times), "changes": changes, "updates_to_others": others, "updates_to_b0": after[0] - before[0]}


def burst(server: CoterieServer, workers: Workers, n: int, count: int, timeout: float) -> dict[str, Any]:
    """(e) *count* route changes behind the hub sent within one second; then every agent must converge."""
    fanout_before, pushes_before = fanout_counters(server), sum(workers.flat("pushes"))
    requests = {}
    for i in range(count):  # 8 routes, added and removed in rounds: at the end all 8 exist when rounds are odd
        kind = RouteAdd if (i // 8) % 2 == 0 else RouteRemove
        requests[i] = kind(idempotency_key=uuid.uuid4().hex, node="hub", vpn="all", cidr=f"172.31.{i % 8}.0/24")
    started = time.monotonic()
    sent, committed, rejected, retried = _submit(server.operator, requests, started, timeout)
    last_commit = time.monotonic()
    expected = expected_digests(server)
    converged = lambda: all(expected.get(name) == digest for name, digest, _ in workers.flat("digests"))  # noqa: E731
    if not wait_until(converged, timeout, interval=0.05):
        raise SystemExit("the agents did not converge after the burst")
    done = max(t for _, _, t in workers.flat("digests") if t is not None)
    fanout_after = fanout_counters(server)
    pushes = sum(workers.flat("pushes")) - pushes_before
    return {
        "changes": count,
        "sent_s": sent,
        "committed": committed,
        "rejected": rejected,
        "retried": retried,
        "committed_s": last_commit - started,
        "converged_s": max(done, last_commit) - started,
        "lag_after_last_commit_s": max(0.0, done - last_commit),
        "fanout_batches": fanout_after.get("batches", 0) - fanout_before.get("batches", 0),
        "updates_per_agent": pushes / n,
    }


def _submit(operator, requests: dict[int, Any], started: float, timeout: float) -> tuple[float, int, int, int]:  # type: ignore[no-untyped-def]
    """Offer the requests at len(requests) per second, at most WINDOW unanswered; retry the retriable after 0.5 s.

    The window keeps requests from queueing in the broker beyond its SERVICE_WAIT (they would come back
    `service_unavailable`); the datastore's commit rate decides how fast they really go.
    """
    from bus.messages.common import Error

    count, pending, retry = len(requests), {}, []  # request id -> index; (when, index) to resend
    committed = rejected = retried = 0
    sent_all, following, deadline = 0.0, 0, time.monotonic() + timeout
    while (following < count or pending or retry) and time.monotonic() < deadline:
        now = time.monotonic()
        due = [i for when, i in retry if when <= now]
        retry = [(when, i) for when, i in retry if when > now]
        while len(pending) < WINDOW and (due or (following < count and now >= started + following / count)):
            if due:
                i = due.pop()
            else:
                i, following = following, following + 1
            request_id = operator.start("datastore", requests[i])  # same idempotency key: done at most once
            if request_id is None:
                retry.append((now + 0.5, i))
            else:
                pending[request_id] = i
        retry += [(now, i) for i in due]
        if following == count and not sent_all:
            sent_all = time.monotonic() - started
        for incoming in _incoming(operator, 0.005):
            i = pending.pop(incoming.request_id, None)
            if i is None:
                continue
            if incoming.error is not None and incoming.error.retriable:
                retried += 1
                retry.append((time.monotonic() + 0.5, i))
            elif incoming.error is not None or isinstance(incoming.message, Error):
                rejected += 1
            elif isinstance(incoming.message, Mutated):
                committed += 1
    return sent_all, committed, rejected, retried


def _incoming(operator, timeout: float):  # type: ignore[no-untyped-def]
    if operator.socket.poll(int(timeout * 1000)):
        yield from operator.incoming()


def restart(server: CoterieServer, workers: Workers, n: int, timeout: float) -> dict[str, Any]:
    """(d) stop every server process, start them again, time until every agent is resynchronised.

    The server is started without waiting for `coterie status` to show it up: under a reconnect storm
    the status request queues behind the agents' snapshots, and the agents' resync is what is measured.
    """
    server.stop()
    down = time.monotonic()
    with open(server.log_path, "ab") as log:
        argv = [sys.executable, "-m", "tui.cli", "server", "up", "--dir", str(server.home)]
        server.process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=log)
    # Resynchronised: the new server answered a heartbeat "in sync" (it holds a stream that agrees with the agent).
    if not wait_until(lambda: workers.total("resynced", down) >= n, timeout, interval=0.2):
        resynced = workers.total("resynced", down)
        raise SystemExit(f"only {resynced} of {n} agents resynchronised within {timeout:.0f}s of the restart")
    took = time.monotonic() - down
    counters = fanout_counters(server)
    return {
        "all_resynced_s": took,
        "snapshots_after": workers.total("snapshots_since", down),
        "resumed": counters.get("resumed", 0),
    }


# ---------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the broker inherits it: one descriptor per agent
    results: dict[str, Any] = {
        "agents": args.agents,
        "processes": -(-args.agents // args.per_process),
        "db": args.db,
        "heartbeat_s": args.heartbeat,
        "machine": f"{os.cpu_count()} CPU, {platform.machine()}, Python {platform.python_version()}",
        "load_avg": os.getloadavg()[0],
    }
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cot-bench-")))
        url = database_url(args, stack)
        server = CoterieServer(tmp, presence_timeout=15.0, database=url).start(timeout=120)
        if args.log:
            stack.callback(lambda: server.log_path.exists() and shutil.copy(server.log_path, args.log))
        stack.callback(server.stop)
        specs = populate(server, args.agents)
        idle = server_rss(server)
        pids = server.pids()
        results["idle_cpu_pct_no_agents"] = idle_cpu(pids, args.idle_window)
        started = time.monotonic()
        workers = Workers.start(server, specs, args.per_process, args.heartbeat)
        stack.callback(workers.stop)
        if not wait_until(lambda: workers.total("count_reached", 1) >= args.agents, args.timeout, interval=0.5):
            synced = workers.total("count_reached", 1)
            raise SystemExit(
                f"only {synced} of {args.agents} agents took a snapshot within {args.timeout:.0f}s;"
                f" agents' counters: {workers.counters()}"
            )
        results["connect_and_sync_s"] = time.monotonic() - started
        time.sleep(3 * args.heartbeat)  # presence (online) changes settle
        loaded = server_rss(server)
        results["rss_kb_per_agent"] = {k: (loaded[k] - idle[k]) / args.agents for k in loaded}
        results["rss_kb_per_agent"]["total"] = sum(loaded[k] - idle[k] for k in loaded) / args.agents
        results["idle_cpu_pct"] = idle_cpu(pids, args.idle_window)
        _progress(
            "connect",
            {
                "connect_and_sync_s": results["connect_and_sync_s"],
                "rss": results["rss_kb_per_agent"],
                "idle_cpu_pct": results["idle_cpu_pct"],
                "idle_cpu_pct_no_agents": results["idle_cpu_pct_no_agents"],
            },
        )
        to_all = changes_to_all(server, workers, args.agents, args.changes, args.timeout)
        results["to_all"] = _progress("to_all", to_all)
        results["to_one"] = _progress("to_one", change_to_one(server, workers, args.changes, args.timeout))
        if args.burst:
            results["burst"] = _progress("burst", burst(server, workers, args.agents, args.burst, args.timeout))
        if not args.no_restart:
            results["restart"] = _progress("restart", restart(server, workers, args.agents, args.timeout))
        results["agent_counters"] = workers.counters()
        results["fanout_counters"] = fanout_counters(server)
    return results


def _progress(phase: str, figures: dict[str, Any]) -> dict[str, Any]:
    """Each phase's figures go to stderr as they come, so a run cut short still tells what it measured."""
    print(f"{phase}: {json.dumps(figures)}", file=sys.stderr, flush=True)
    return figures


def database_url(args: argparse.Namespace, stack: ExitStack) -> str:
    if args.db == "sqlite":
        return ""
    if args.dsn:
        return args.dsn
    from tests.helpers.postgres import PostgresCluster, PostgresUnavailable

    try:
        cluster = stack.enter_context(PostgresCluster())
    except PostgresUnavailable as exc:
        raise SystemExit(f"--db postgres: {exc}; or give an existing database with --dsn") from None
    return cluster.url


def table(r: dict[str, Any]) -> str:
    def row(name: str, fig: dict[str, float] | None = None, note: str = "") -> str:
        fig = fig or {}
        cells = [f"{fig[k]:.1f}" if k in fig else "" for k in ("p50", "p99", "max")]
        return f"| {name} | {' | '.join(cells)} | {note} |"

    rss = r["rss_kb_per_agent"]
    lines = [
        f"Coterie control plane: {r['agents']} agents in {r['processes']} process(es), {r['db']},"
        f" heartbeat {r['heartbeat_s']} s; {r['machine']}, load {r['load_avg']:.1f}",
        "",
        "| measure | p50 | p99 | max | note |",
        "|---|---|---|---|---|",
        row("connect + first snapshot, all agents (s)", note=f"{r['connect_and_sync_s']:.1f} s"),
        row("a. change to every node: per agent, ms", r["to_all"]["each_ms"], f"{r['to_all']['changes']} changes"),
        row("a. change to every node: last agent, ms", r["to_all"]["all_applied_ms"]),
        row("a. change to every node: the fanout's batch, ms", r["to_all"].get("fanout_batch_ms")),
        row(
            "a. CPU per change to every node, ms",
            note=", ".join(f"{k} {v}" for k, v in r["to_all"].get("cpu_ms_per_change", {}).items())
            + " (while it spread: "
            + ", ".join(f"{k} {v}" for k, v in r["to_all"].get("cpu_ms_while_spreading", {}).items())
            + ")",
        ),
        row(
            "b. change to one node, ms",
            r["to_one"]["ms"],
            f"updates to the other {r['agents'] - 1}: {r['to_one']['updates_to_others']}",
        ),
        row(
            "c. server RSS per agent, KB",
            note=f"total {rss['total']:.1f} (broker {rss.get('broker', 0):.1f}, fanout {rss.get('fanout', 0):.1f},"
            f" datastore {rss.get('datastore', 0):.1f})",
        ),
    ]
    if "idle_cpu_pct" in r:
        busy, empty = r["idle_cpu_pct"], r["idle_cpu_pct_no_agents"]
        lines.append(
            row(
                "c. server CPU while nothing changes, % of a core",
                note=f"{busy['total']:.1f} with the agents connected (heartbeats), {empty['total']:.1f} without;"
                f" with: {', '.join(f'{k} {v:.1f}' for k, v in busy.items() if k != 'total')}",
            )
        )
    if "burst" in r:
        b = r["burst"]
        lines.append(
            row(
                f"e. burst of {b['changes']} changes",
                note=f"sent in {b['sent_s']:.2f} s, committed by {b['committed_s']:.2f} s"
                f" ({b['committed']} ok, {b['rejected']} refused, {b['retried']} retried),"
                f" all converged at {b['converged_s']:.2f} s"
                f" (lag after last commit {b['lag_after_last_commit_s']:.2f} s),"
                f" {b['fanout_batches']} fanout batches, {b['updates_per_agent']:.1f} updates per agent",
            )
        )
    if "restart" in r:
        d = r["restart"]
        lines.append(
            row(
                "d. server restart",
                note=f"all agents resynced {d['all_resynced_s']:.1f} s after the stop"
                f" ({d['resumed']} resumed their streams, {d['snapshots_after']} took snapshots)",
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    results = run(args)
    print(table(results))
    print(f"agents' counters: {results['agent_counters']}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
