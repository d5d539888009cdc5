#!/usr/bin/env python3
"""Per-packet cost of ESP seal and open and of TSO segmentation, beside the AES-GCM floor, in one run.

Everything runs in this process on prebuilt packets (no sockets): what is
measured is nodeagent/esp.py and nodeagent/offload.py per packet, and, as
the floor, ``cryptography``'s AESGCM alone on the same sizes. The difference
between a stage and its floor is what the interpreter costs there.

Figures are ns of this process's CPU time per packet (per segment for
``segment``), the best of ``--repeat`` rounds: this machine is shared and
noisy, so CPU time rather than wall time, and the minimum. For counts that do not move with the load, run one stage
under callgrind (instructions, not seconds) with --repeat 1 and --repeat 3:
the difference over 2 x count is instructions per packet, without the setup.

    python bench/esp_micro.py [--size 1400] [--count 20000] [--repeat 7]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python bench/esp_micro.py --only open --count 2000 --repeat 1   # then --repeat 3
"""

from __future__ import annotations

import argparse
import gc
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from nodeagent import esp, offload  # noqa: E402
from nodeagent.replay import ReplayWindow  # noqa: E402

KEY = bytes(range(32))
SALT = b"\x01\x02\x03\x04"
SPI = 0x1000_0001
MSS = 1348
SEGMENTS = 45  # what one GSO send or GRO read carries at overlay MTU 1400
BATCH = SEGMENTS


def inner_packet(size: int) -> bytes:
    """An IPv4/TCP packet of *size* bytes (20 + 32 header bytes, like iperf3's with timestamps)."""
    addresses = bytes((100, 64, 0, 1, 100, 64, 0, 2))
    header = struct.pack("!BBHHHBBH8s", 0x45, 0, size, 1, 0x4000, 64, 6, 0, addresses)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 555, 8 << 4, 0x10, 512, 0, 0) + bytes(12)
    return header + tcp + bytes(size - len(header) - len(tcp))


def super_packet(segments: int) -> bytes:
    """A TSO read's IP packet: one 52-byte header and *segments* MSS-sized payloads."""
    return inner_packet(52 + segments * MSS)


def best(run: Callable[[], int], repeat: int) -> float:
    """Best-of-*repeat* ns per item; *run* returns how many items it did.

    The cyclic GC is off for all rounds (the stages make no cycles; refcounts
    free everything), so neither the times nor callgrind's counts include a
    collection of the whole heap.
    """
    figures = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.process_time_ns()
            items = run()
            figures.append((time.process_time_ns() - start) / items)
    finally:
        gc.enable()
    return min(figures)


def stages(size: int, count: int) -> dict[str, Callable[[], int]]:
    """Each stage as a function that does *count* packets and returns how many it did."""
    inner = inner_packet(size)
    outbound = esp.OutboundSA(SPI, KEY, SALT)
    sealed = [memoryview(outbound.seal(inner)) for _ in range(count)]  # the data plane opens views of its reads
    aead = AESGCM(KEY)
    nonce, aad = SALT + bytes(8), bytes(12)
    plaintext = inner + b"\x01\x02\x02\x04"
    ciphertext = aead.encrypt(nonce, plaintext, aad)
    trailer_plain = bytes(plaintext)
    spare = bytearray(len(ciphertext))

    def floor_encrypt() -> int:
        encrypt = aead.encrypt
        for _ in range(count):
            encrypt(nonce, plaintext, aad)
        return count

    def floor_decrypt() -> int:
        decrypt = aead.decrypt
        for _ in range(count):
            decrypt(nonce, ciphertext, aad)
        return count

    def floor_decrypt_into() -> int:
        decrypt_into = aead.decrypt_into
        out = spare[: len(plaintext)]
        for _ in range(count):
            decrypt_into(nonce, ciphertext, aad, out)
        return count

    def seal() -> int:
        sa = esp.OutboundSA(SPI, KEY, SALT)
        for _ in range(count):
            sa.seal(inner)
        return count

    def seal_many() -> int:
        sa = esp.OutboundSA(SPI, KEY, SALT)
        batch = [inner] * BATCH
        rounds = count // BATCH
        for _ in range(rounds):
            sa.seal_many(batch)
        return rounds * BATCH

    def open_one() -> int:
        sa = esp.InboundSA(SPI, KEY, SALT)
        for packet in sealed:
            sa.open(packet)
        return count

    def open_many() -> int:
        sa = esp.InboundSA(SPI, KEY, SALT)
        batches = [sealed[i : i + BATCH] for i in range(0, count, BATCH)]
        for batch in batches:
            sa.open_many(batch)
        return count

    def header() -> int:
        parse = esp.parse_header
        for packet in sealed:
            parse(packet)
        return count

    def replay() -> int:
        window = ReplayWindow()
        infer, check, accept = window.infer, window.check, window.accept
        for seq in range(1, count + 1):
            candidate = infer(seq & 0xFFFFFFFF)
            check(candidate)
            accept(candidate)
        return count

    def trailer() -> int:
        read = esp.read_trailer
        for _ in range(count):
            read(trailer_plain)
        return count

    def segment() -> int:
        found = offload.unpack_read(offload.VNET.pack(1, 1, 52, MSS, 20, 16) + super_packet(SEGMENTS), complete=False)
        rounds = max(1, count // SEGMENTS)
        for _ in range(rounds):
            found.segments()
        return rounds * SEGMENTS

    found = {
        "aes-gcm encrypt (floor)": floor_encrypt,
        "aes-gcm decrypt (floor)": floor_decrypt,
        "aes-gcm decrypt_into (floor)": floor_decrypt_into,
        "seal": seal,
        "seal_many (45)": seal_many,
        "open": open_one,
        "open_many (45)": open_many,
        "  open: header parse": header,
        "  open: ESN infer + replay check + accept": replay,
        "  open: trailer + inner length check": trailer,
        "segment (45 x 1348)": segment,
    }
    if not hasattr(esp.OutboundSA, "seal_many"):
        del found["seal_many (45)"]
    if not hasattr(esp.InboundSA, "open_many"):
        del found["open_many (45)"]
    if not hasattr(esp, "read_trailer"):
        del found["  open: trailer + inner length check"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1400, help="inner packet bytes (default 1400)")
    parser.add_argument("--count", type=int, default=20000, help="packets per round (default 20000)")
    parser.add_argument("--repeat", type=int, default=7, help="rounds; the best is shown (default 7)")
    parser.add_argument("--only", help="run only the stage of this exact name, e.g. open (for callgrind)")
    args = parser.parse_args()
    if args.size < 60 or args.count < BATCH:
        parser.error(f"need --size >= 60 and --count >= {BATCH}")
    table = stages(args.size, args.count)
    print(f"{'stage':44} {'ns/packet':>10}   ({args.size}-byte inner packets, best of {args.repeat})")
    for name, run in table.items():
        if args.only and name.strip() != args.only:
            continue
        print(f"{name:44} {best(run, args.repeat):10.0f}", flush=True)


if __name__ == "__main__":
    main()
