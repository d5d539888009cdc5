#!/usr/bin/env python3
"""Time for one change to reach every agent, and server memory per connected agent.

Real server processes (`coterie server up`, SQLite) and N simulated agents:
each enrolled with its own CURVE key and holding its own connection, running
the real sync logic (nodeagent.sync.Replica: deltas, gaps, digests), but all
multiplexed in one thread of this process and writing no files, so that
what is measured is the server, not 200 agents sharing one interpreter.
All agents are in one VPN; each change adds or removes a route behind one
node, which changes every other agent's view. For each change we record
when each agent applied it. Beside it, in the same run, the floor: the same number of raw CURVE
DEALER sockets receiving one 300-byte message from one ROUTER (no broker,
no database, no views), as ../shared/PERFORMANCE.md measured.

    python bench/sync_latency.py [--agents 200] [--changes 30]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bus.client import Client, Context  # noqa: E402
from bus.keys import KeyPair  # noqa: E402
from bus.messages.auth import JoinString  # noqa: E402
from bus.messages.datastore import RouteAdd, RouteRemove, VpnCreate  # noqa: E402
from bus.messages.sync import Snapshot, SnapshotRequest, SyncHeartbeat, Update  # noqa: E402
from nodeagent.agent import enroll  # noqa: E402
from nodeagent.state import StateDir  # noqa: E402
from nodeagent.sync import Outcome, Replica  # noqa: E402
from tests.conftest import wait_until  # noqa: E402
from tests.helpers.server import CoterieServer, shared  # noqa: E402


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class SimAgents:
    """Many agents in one thread: real keys and connections, the real Replica, no files."""

    def __init__(self, server: CoterieServer, joins: list[str], base: Path, context: Context) -> None:
        self.clients: list[Client] = []
        self.replicas: list[Replica] = []
        self.applied: list[dict[int, float]] = []
        self.counters: Counter[str] = Counter()
        for i, join in enumerate(joins):
            state = StateDir(base / f"a{i}")
            info = enroll(state, JoinString.decode(join), context=context)
            server_key = info.server_key.encode()
            self.clients.append(Client(info.endpoints[0], state.keypair(), server_key, timeout=10.0, context=context))
            self.replicas.append(Replica())
            self.applied.append({})
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)
        for client in self.clients:
            client.close()

    def synced(self, peers: int) -> bool:
        return all(r.view is not None and len(r.view.peers) == peers for r in self.replicas)

    def applied_at(self, index: int, revision: int) -> float | None:
        return next((t for r, t in self.applied[index].items() if r >= revision), None)

    def _snapshot(self, index: int) -> None:
        snapshot = self.clients[index].request("fanout", SnapshotRequest(), expect=Snapshot)
        assert isinstance(snapshot, Snapshot) and self.replicas[index].load(snapshot)
        self.applied[index][snapshot.revision] = time.monotonic()
        self.counters["snapshots"] += 1

    def _run(self) -> None:
        for index in range(len(self.clients)):
            self._snapshot(index)
        poller = zmq.Poller()
        by_socket = {}
        for index, client in enumerate(self.clients):
            poller.register(client.socket, zmq.POLLIN)
            by_socket[client.socket] = index
        next_beat = time.monotonic()
        while not self._stop.is_set():
            for sock, _ in poller.poll(100):
                index = by_socket[sock]
                while (push := self.clients[index].next_push(0)) is not None:
                    self._on_push(index, push[1])
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + 2.0
                for client, replica in zip(self.clients, self.replicas, strict=True):
                    client.notify("fanout", SyncHeartbeat(revision=replica.revision, digest=replica.digest))

    def _on_push(self, index: int, message: object) -> None:
        if not isinstance(message, Update):
            return
        outcome = self.replicas[index].apply(message)
        self.counters[outcome.value] += 1
        if outcome is Outcome.APPLIED:
            self.applied[index][message.revision] = time.monotonic()
        elif outcome in (Outcome.GAP, Outcome.MISMATCH):
            self._snapshot(index)


def bench_coterie(agents_n: int, changes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = CoterieServer(Path(tmp), presence_timeout=60.0).start()
        context = shared()
        sims: SimAgents | None = None
        try:
            server.mutate(VpnCreate, name="all", subnet="10.60.0.0/20")
            pids = server.pids()
            before = {name: rss_kb(pids[name]) for name in ("broker", "fanout")}
            joins = [server.add_node(f"n{i}", ["all"]) for i in range(agents_n)]
            sims = SimAgents(server, joins, Path(tmp) / "agents", context)
            sims.start()
            if not wait_until(lambda: sims is not None and sims.synced(agents_n - 1), 300, interval=0.5):
                raise SystemExit("agents did not all synchronise")
            time.sleep(3)  # let the online announcements settle
            after = {name: rss_kb(pids[name]) for name in ("broker", "fanout")}
            everyone, each = [], []
            for i in range(changes):
                kind = RouteAdd if i % 2 == 0 else RouteRemove
                started = time.monotonic()
                reply = server.mutate(kind, node="n0", vpn="all", cidr="192.168.99.0/24")
                others = range(1, agents_n)
                if not wait_until(
                    lambda rev=reply.revision, others=others: all(sims.applied_at(a, rev) for a in others),
                    30,
                    interval=0.002,
                ):
                    raise SystemExit(f"change {reply.revision} did not reach every agent")
                times = [sims.applied_at(a, reply.revision) - started for a in others]  # type: ignore[operator]
                everyone.append(max(times))
                each += times
                time.sleep(0.2)
            print(f"simulated agents' counters over the run: {dict(sims.counters)}", file=sys.stderr)
            return {
                "all_p50": statistics.median(everyone) * 1e3,
                "all_p99": percentile(everyone, 99) * 1e3,
                "each_p50": statistics.median(each) * 1e3,
                "each_p99": percentile(each, 99) * 1e3,
                "kb_per_agent_broker": (after["broker"] - before["broker"]) / agents_n,
                "kb_per_agent_fanout": (after["fanout"] - before["fanout"]) / agents_n,
            }
        finally:
            if sims is not None:
                sims.stop()
            server.stop()
            context.term()


def bench_raw_curve(receivers: int, rounds: int) -> dict[str, float]:
    """The floor: one ROUTER sends 300 bytes to each of N CURVE DEALERs; time until all have it."""
    context = zmq.Context(io_threads=2)
    server_keys, client_keys = KeyPair.generate(), KeyPair.generate()
    router = context.socket(zmq.ROUTER)
    router.curve_server, router.curve_secretkey = True, server_keys.secret
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealers = []
    for i in range(receivers):
        dealer = context.socket(zmq.DEALER)
        dealer.curve_serverkey, dealer.curve_publickey, dealer.curve_secretkey = (
            server_keys.public,
            client_keys.public,
            client_keys.secret,
        )
        dealer.routing_id = f"d{i}".encode()
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealers.append(dealer)
    for dealer in dealers:
        dealer.send(b"hello")
    for _ in dealers:
        router.recv_multipart()
    poller = zmq.Poller()
    for dealer in dealers:
        poller.register(dealer, zmq.POLLIN)
    everyone = []
    payload = b"x" * 300
    for _ in range(rounds):
        started = time.monotonic()
        for i in range(receivers):
            router.send_multipart([f"d{i}".encode(), payload])
        got = 0
        while got < receivers:
            for sock, _ in poller.poll(5000):
                sock.recv()
                got += 1
        everyone.append(time.monotonic() - started)
    context.destroy(linger=0)
    return {"all_p50": statistics.median(everyone) * 1e3, "all_p99": percentile(everyone, 99) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--changes", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    threading.current_thread().name = "bench"
    raw = bench_raw_curve(args.agents, args.changes)
    ours = bench_coterie(args.agents, args.changes)
    print(f"one change that concerns every agent, {args.agents} agents, {args.changes} changes")
    print(f"{'path':<28}{'all applied p50 ms':>20}{'p99 ms':>10}{'each p50 ms':>13}{'each p99 ms':>13}")
    print(f"{'zmq-curve broadcast floor':<28}{raw['all_p50']:>20.1f}{raw['all_p99']:>10.1f}{'-':>13}{'-':>13}")
    print(
        f"{'coterie (datastore->agent)':<28}{ours['all_p50']:>20.1f}{ours['all_p99']:>10.1f}"
        f"{ours['each_p50']:>13.1f}{ours['each_p99']:>13.1f}"
    )
    print(
        f"server memory per connected agent: broker {ours['kb_per_agent_broker']:.1f} KB,"
        f" fanout {ours['kb_per_agent_fanout']:.1f} KB"
    )


if __name__ == "__main__":
    main()
