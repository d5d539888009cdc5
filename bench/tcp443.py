"""Throughput of the TCP/443 paths on loopback: a direct stream (TcpPaths to TcpPaths) and the relay.

``python -m bench.tcp443 [--mb 50] [--size 1400]``. The relay runs in this
process with a hand-made trust snapshot (two peers), so no server is needed.
Senders back off while a stream's buffer is full, so the figure is what the
path carries, not how fast packets can be dropped.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nacl.signing import SigningKey

from nodeagent.tcp443 import RelayClient, RelaySettings, Route, TcpPaths
from nodeagent.tlsstream import Loop, ensure_certificate, server_context
from services.relay.relay import RelayServer
from services.relay.trust import Trust


def pump(send: Callable[[bytes], bool], poll: Callable[[], int], count: int, size: int) -> tuple[float, int]:
    """Seconds until the last packet arrived, and how many arrived (a full receive queue drops, as UDP would).

    The receiver runs in its own thread, as the data plane's inbound thread does.
    """
    packet = b"\x00\x00\x30\x03" + os.urandom(size - 4)
    received = [0, time.perf_counter()]
    done = threading.Event()

    def receive() -> None:
        while not done.is_set():
            got = poll()
            if got:
                received[0] += got
                received[1] = time.perf_counter()

    reader = threading.Thread(target=receive, daemon=True)
    start = time.perf_counter()
    reader.start()
    sent = 0
    while sent < count:
        if send(packet):
            sent += 1
        else:
            time.sleep(0.0005)  # the stream's buffer is full: wait for the socket to drain
    while received[0] < count and time.perf_counter() - received[1] < 1.0:
        time.sleep(0.05)
    done.set()
    reader.join()
    return received[1] - start, received[0]


def direct(count: int, size: int) -> tuple[float, int]:
    a, b = TcpPaths(listen=("127.0.0.1", 0)), TcpPaths()
    try:
        b.set_routes({"a": Route(address=("127.0.0.1", a.port or 0))})

        def poll() -> int:
            return len(a.recv_batch(256)) if select.select([a], [], [], 0.05)[0] else 0

        return pump(lambda p: b.send("a", p), poll, count, size)
    finally:
        a.close()
        b.close()


def relayed(count: int, size: int, tmp: str) -> tuple[float, int]:
    keys = {"a": SigningKey.generate(), "b": SigningKey.generate()}
    loop = Loop("relay").start()
    relay = RelayServer(loop)
    relay.trust = Trust(
        0,
        Trust.empty().world,
        {n: k.verify_key.encode().hex() for n, k in keys.items()},
        {},
        {"a": frozenset("b"), "b": frozenset("a")},
    )
    cert, key = f"{tmp}/c.pem", f"{tmp}/k.pem"
    ensure_certificate(Path(cert), Path(key))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    loop.call_soon(lambda: loop.listen(listener, server_context(Path(cert), Path(key)), lambda: relay))
    began = time.monotonic()
    a = RelayClient(RelaySettings("127.0.0.1", port, "a", keys["a"]))
    b = RelayClient(RelaySettings("127.0.0.1", port, "b", keys["b"]))
    try:
        while not (a.authenticated and b.authenticated) and time.monotonic() < began + 10:
            time.sleep(0.001)
        print(f"relay: connect + TLS + challenge/signature for two nodes in {(time.monotonic() - began) * 1000:.0f} ms")

        def poll() -> int:
            return len(b.receive(256)) if select.select([b], [], [], 0.05)[0] else 0

        return pump(lambda p: a.send_to("b", p), poll, count, size)
    finally:
        a.close()
        b.close()
        loop.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--size", type=int, default=1400)
    args = parser.parse_args()
    count = args.mb * 1_000_000 // args.size
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (
            ("direct", lambda: direct(count, args.size)),
            ("relay", lambda: relayed(count, args.size, tmp)),
        ):
            seconds, got = run()
            rate = got * args.size * 8 / seconds / 1e6
            print(f"{name}: {got}/{count} packets of {args.size} B in {seconds:.2f} s = {rate:.0f} Mbit/s")


if __name__ == "__main__":
    main()
