#!/usr/bin/env python3
"""Per-packet cost of the data plane's whole pipeline stages, in one process, without TUN devices.

Two real DataPlanes keyed for each other on loopback (tests/helpers/planes.py,
the pair the stage tests use): what plane a seals goes out of its real UDP
socket; plane b opens batches of prebuilt sealed segments as a GRO read hands
them over. So this measures nodeagent/dataplane.py with esp.py, packets.py and
offload.py per packet, not the kernel (bench/dataplane.py measures the whole).

Figures are ns of this process's CPU time per packet (per segment for
super-packets), the best of ``--repeat`` rounds. On this shared machine count
instructions instead (they do not move with the load): run one stage under
callgrind with --repeat 1 and --repeat 3 and divide the difference by
2 x --count:

    python bench/pipeline_micro.py [--count 4500] [--repeat 5]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/pipeline_micro.py --only inbound_udp --count 900 --repeat 1   # then --repeat 3
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.esp_micro import best  # noqa: E402  (best-of-N CPU ns per item, the cyclic GC off)
from nodeagent.offload import GSO_TCPV4, SuperPacket, coalesce  # noqa: E402
from nodeagent.packets import summarize  # noqa: E402
from nodeagent.transport import MASQUERADE_MARKER  # noqa: E402
from tests.helpers.planes import VIPS, Pair, make_pair  # noqa: E402

MSS = 1348
SEGMENTS = 45  # what one GSO send or GRO read carries at overlay MTU 1400
SMALL_BATCH = 32


def tcp_segment(seq: int, payload: int = MSS) -> bytes:
    """An IPv4/TCP packet from a to b (20 + 32 header bytes, like iperf3's with timestamps)."""
    addresses = bytes(map(int, VIPS["a"].split("."))) + bytes(map(int, VIPS["b"].split(".")))
    header = struct.pack("!BBHHHBBH8s", 0x45, 0, 52 + payload, 1, 0x4000, 64, 6, 0, addresses)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 555, 8 << 4, 0x10, 512, 0, 0) + bytes(12)
    return header + tcp + bytes(payload)


def udp_small(payload: int = 64) -> bytes:
    addresses = bytes(map(int, VIPS["a"].split("."))) + bytes(map(int, VIPS["b"].split(".")))
    header = struct.pack("!BBHHHBBH8s", 0x45, 0, 28 + payload, 1, 0x4000, 64, 17, 0, addresses)
    return header + struct.pack("!HHHH", 5001, 40000, 8 + payload, 0) + bytes(payload)


def stages(pair: Pair, count: int, repeat: int) -> dict[str, Callable[[], int]]:
    a, b = pair.planes["a"], pair.planes["b"]
    a.tunnels["b"].takes_partial = True  # as between two offloading agents (CAP_CSUM)
    source = pair.address_of("a")
    segments = [tcp_segment(1000 + n * MSS) for n in range(SEGMENTS)]
    super_packet = SuperPacket(tcp_segment(1000, SEGMENTS * MSS))
    super_packet.gso = (GSO_TCPV4, MSS, 20, False)
    small = [udp_small()] * SMALL_BATCH
    sealer = a.tunnels["b"].outbound
    assert sealer is not None
    # Fresh sealed segments for every round of inbound_udp: the replay window refuses a second copy.
    # At least 3 rounds whatever --repeat, so that the setup is the same for --repeat 1 and 3 and the
    # callgrind difference counts the stages only (it used to count 2 x --count seals as well).
    sealed = [
        [MASQUERADE_MARKER + sealer.seal(segments[n % SEGMENTS]) for n in range(count)] for _ in range(max(repeat, 3))
    ]
    rounds = iter([[(packet, source) for packet in batch] for batch in sealed])

    def inbound_udp() -> int:
        batch = next(rounds)
        delivered = 0
        for start in range(0, len(batch), SEGMENTS):
            delivered += len(b.inbound_udp(batch[start : start + SEGMENTS]))
        if delivered != len(batch):  # a figure for packets dropped would mean nothing
            raise RuntimeError(f"inbound_udp delivered {delivered} of {len(batch)}: {dict(b.counters)}")
        return len(batch)

    def outbound_super_packet() -> int:
        for _ in range(count // SEGMENTS):
            a.outbound_batch([super_packet])
        return count // SEGMENTS * SEGMENTS

    def outbound_small() -> int:
        for _ in range(count // SMALL_BATCH):
            a.outbound_batch(small)
        return count // SMALL_BATCH * SMALL_BATCH

    def coalesce_segments() -> int:
        for _ in range(count // SEGMENTS):
            coalesce(segments)
        return count // SEGMENTS * SEGMENTS

    def summarize_one() -> int:
        packet = segments[0]
        for _ in range(count):
            summarize(packet)
        return count

    return {
        "inbound_udp": inbound_udp,
        "outbound_super_packet": outbound_super_packet,
        "outbound_64B": outbound_small,
        "coalesce": coalesce_segments,
        "summarize": summarize_one,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=4500, help="packets per round (default 4500)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best is shown (default 5)")
    parser.add_argument("--only", help="run only the stage of this exact name, e.g. inbound_udp (for callgrind)")
    args = parser.parse_args()
    if args.count < SEGMENTS or args.repeat < 1:
        parser.error(f"need --count >= {SEGMENTS} and --repeat >= 1")
    pair = make_pair()
    try:
        table = stages(pair, args.count, args.repeat)
        if args.only and args.only not in table:
            parser.error(f"--only: no stage {args.only!r}; stages: {', '.join(table)}")
        print(f"{'stage':28} {'ns/packet':>10}   (1348-byte TCP segments in runs of {SEGMENTS}, best of {args.repeat})")
        for name, run in table.items():
            if args.only and name != args.only:
                continue
            print(f"{name:28} {best(run, args.repeat):10.0f}", flush=True)
    finally:
        pair.close()


if __name__ == "__main__":
    main()
