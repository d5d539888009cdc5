#!/usr/bin/env python3
"""Request round-trip through the Coterie broker on loopback, beside raw ZeroMQ in the same run.

Three paths, each a client in this process and servers in their own processes:

  zmq-plain   DEALER -> ROUTER echo, no security            (the floor)
  zmq-curve   the same with CURVE                           (what encryption costs)
  coterie     client -> broker -> auth worker -> broker -> client, CURVE, ZAP,
              MessagePack + pydantic on both ends           (what we ship)

Figures are medians and 99th percentiles of sequential round trips, so
compare the ratios: this machine is shared and noisy.

    python bench/bus_rtt.py [--requests 5000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bus.client import Client  # noqa: E402
from bus.keys import KeyPair, load_keypair, load_public_key  # noqa: E402
from bus.messages.common import Ping  # noqa: E402


def _echo_server(endpoint: str, secret: bytes | None, ready: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    if secret is not None:
        sock.curve_server = True
        sock.curve_secretkey = secret
    sock.bind(endpoint)
    ready.set()
    while True:
        sock.send_multipart(sock.recv_multipart())


def _measure(send_and_wait, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(min(200, count)):  # warm up: handshakes, caches
        send_and_wait()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        send_and_wait()
        samples.append(time.perf_counter() - start)
    return samples


def bench_raw(count: int, curve: bool) -> list[float]:
    server = KeyPair.generate() if curve else None
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    ready = multiprocessing.Event()
    proc = multiprocessing.Process(
        target=_echo_server, args=(endpoint, server.secret if server else None, ready), daemon=True
    )
    proc.start()
    ready.wait(10)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    if server is not None:
        client = KeyPair.generate()
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server.public, client.public, client.secret
    sock.connect(endpoint)
    payload = b"x" * 64

    def round_trip() -> None:
        sock.send_multipart([payload])
        sock.recv_multipart()

    try:
        return _measure(round_trip, count)
    finally:
        sock.close(linger=0)
        context.term()
        proc.terminate()
        proc.join(5)


def bench_coterie(count: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        port = _free_port()
        subprocess.run(
            [sys.executable, "-m", "tui.cli", "init", "--dir", tmp, "--port", str(port)],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        env = {**os.environ, "COTERIE_LOG_LEVEL": "WARNING"}
        procs = [
            subprocess.Popen([sys.executable, "-m", "services", name, "--dir", tmp], cwd=ROOT, env=env)
            for name in ("broker", "auth")
        ]
        try:
            client = Client(
                f"tcp://127.0.0.1:{port}",
                load_keypair(home / "keys" / "admin.key"),
                load_public_key(home / "keys" / "server.pub"),
                timeout=10.0,
                retries=0,
            )
            request = Ping(payload=b"x" * 64)
            _wait_for(lambda: client.request("auth", request))
            samples = _measure(lambda: client.request("auth", request), count)
            client.close()
            return samples
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(10)


def _wait_for(call, attempts: int = 50) -> None:  # type: ignore[no-untyped-def]
    for _ in range(attempts):
        try:
            call()
            return
        except Exception:
            time.sleep(0.2)
    raise SystemExit("the Coterie server did not come up")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    results = {
        "zmq-plain": bench_raw(args.requests, curve=False),
        "zmq-curve": bench_raw(args.requests, curve=True),
        "coterie": bench_coterie(args.requests),
    }
    floor = statistics.median(results["zmq-curve"])
    print(f"request round trip on loopback, {args.requests} sequential requests, 64-byte payload")
    print(f"{'path':<12}{'p50 µs':>10}{'p99 µs':>10}{'req/s':>10}{'p50 / zmq-curve':>18}")
    for name, samples in results.items():
        samples.sort()
        p50 = statistics.median(samples)
        p99 = samples[int(len(samples) * 0.99) - 1]
        print(
            f"{name:<12}{p50 * 1e6:>10.0f}{p99 * 1e6:>10.0f}{1 / statistics.mean(samples):>10.0f}{p50 / floor:>18.2f}"
        )


if __name__ == "__main__":
    main()
