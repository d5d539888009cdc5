"""A delaying relay for a router namespace: link delay without ``tc netem`` (which these kernels lack).

How: policy routing in the router sends every packet it forwards from the
given devices into a TUN device; this process reads each packet, holds it
for the delay, and writes it back into the same TUN. The kernel then sees it
arrive from the TUN, and a rule that ranks first (``iif TUN lookup main``)
forwards it normally. Packets keep their order; nothing is dropped unless the
queue would exceed ``--max-queue`` packets.

Run inside the router namespace (``add_delay`` in topologies.py does that)::

    python3 -m compose.delay --tun dly0 --ms 50
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
MAX_PACKET = 65535


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def relay(fd: int, delay: float, max_queue: int, stop: list[bool]) -> None:
    """Hold every packet read from *fd* for *delay* seconds, then write it back, in order."""
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not stop[0]:
        wait = 0.2 if not queue else max(0.0, queue[0][0] - time.monotonic())
        if poller.poll(wait * 1000):
            for _ in range(256):  # drain what is there, bounded per round
                try:
                    packet = os.read(fd, MAX_PACKET)
                except BlockingIOError:
                    break
                if len(queue) < max_queue:
                    queue.append((time.monotonic() + delay, packet))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            with contextlib.suppress(OSError):  # a packet the kernel refuses is lost, as on a real link
                os.write(fd, queue.popleft()[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m compose.delay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tun", required=True, help="TUN device to create and relay through")
    ap.add_argument("--ms", type=float, required=True, help="one-way delay in milliseconds")
    ap.add_argument("--max-queue", type=int, default=10000, help="packets held at most (default 10000)")
    args = ap.parse_args(argv)
    if not 0 <= args.ms <= 10000:
        ap.error("--ms must be 0..10000")
    fd = open_tun(args.tun)
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__(0, True))
    print(f"relaying through {args.tun} with {args.ms:g} ms delay", flush=True)
    relay(fd, args.ms / 1000, args.max_queue, stop)
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
