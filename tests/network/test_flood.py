"""A forged-packet flood from spoofed sources while a real transfer runs (RELIABILITY.md D16).

Host m sends 100,000 UDP datagrams to node y's port, from 10,000 spoofed
source addresses (10.250.0.0/16, which R routes back to m), each framed as
ESP with the SPI y really uses for x and a forged tag. Checked: the 20 MB
x -> y transfer running meanwhile arrives intact; y decrypted at most the
per-source allowance and dropped the rest before decryption; the limiter's
table stayed bounded; y answered none of it (nothing from y reached m's
spoofed range); y's memory did not grow beyond a bound. Throughput during
a flood is a benchmark figure, not asserted here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from compose.netns import Host, Lab
from nodeagent.sourcelimit import BURST, MAX_SOURCES, RATE
from tests.conftest import wait_until
from tests.helpers.traffic import read_result, tcp_send, tcp_sink
from tests.network.overlay import star, start_overlay

pytestmark = pytest.mark.timeout(600)

MB = 1 << 20
PACKETS, SOURCES = 100_000, 10_000

FLOOD = r"""
import random, socket, struct, sys, time, json
dst, port, spi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
packets, sources, hot, out = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL: we write the source
rng = random.Random(7)
dst_b = socket.inet_aton(dst)

def forged(k):
    src = bytes((10, 250, k >> 8, k & 255))
    esp = struct.pack("!II", spi, rng.randrange(1 << 20, 1 << 31)) + rng.randbytes(8 + 64 + 16)  # IV, data, tag
    payload = b"\x00\x00\x00\xfe" + esp  # the masquerade marker
    udp = struct.pack("!HHHH", 40000 + (k & 1023), port, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst_b) + udp

def send(count, pick, pps=0):
    start, sent = time.monotonic(), 0
    for n in range(count):
        if pps and n % 100 == 0:
            time.sleep(max(0.0, start + n / pps - time.monotonic()))
        try:
            raw.sendto(forged(pick()), (dst, 0)); sent += 1
        except OSError:
            time.sleep(0.001)
    return sent, time.monotonic() - start

spread = send(packets, lambda: rng.randrange(sources))
single = send(hot, lambda: 0xFFFF, pps=5000)  # 10.250.255.255: one source, at a rate y keeps up with
json.dump({"sent": spread[0], "seconds": spread[1], "hot_sent": single[0], "hot_seconds": single[1]}, open(out, "w"))
"""
HOT = 20_000  # then one source alone, to see its limit bite


def udp_receive_drops(host: Host) -> int:
    """Datagrams the kernel dropped in *host* because a socket's buffer was full (a flood outruns any reader)."""
    lines = [
        line.split() for line in host.run(["cat", "/proc/net/snmp"]).stdout.splitlines() if line.startswith("Udp:")
    ]
    return int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_forged_flood_from_spoofed_sources_is_limited_and_unanswered(lab: Lab) -> None:
    router, hosts = star(lab, ["x", "y", "m"])
    router.run(["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=0"])
    router.run(["ip", "route", "add", "10.250.0.0/16", "via", "10.201.3.2"])  # spoofed sources lead back to m
    m = hosts.pop("m")
    m.nft(
        "table inet watch {\n chain pre {\n  type filter hook prerouting priority -300; policy accept;\n"
        '  ip saddr 10.201.2.2 ip daddr 10.250.0.0/16 counter comment "answers"\n }\n}\n'
    )
    overlay = start_overlay(lab, hosts, router, "10.201.1.1", {"x": ["lab"], "y": ["lab"]})
    overlay.wait_synced("x", ["y"])
    vip_y = overlay.vip("y")
    overlay.wait_ping("x", vip_y)
    plane = overlay.dataplane("y")
    spi = int(plane["peers"]["x"]["spis_in"][-1], 16)
    port = int(plane["udp_port"])
    agent_pid = overlay.agents["y"].pid
    rss_before = rss_kib(agent_pid)
    drops_before = udp_receive_drops(hosts["y"])

    out = lab.workdir / "sink.json"
    tcp_sink(hosts["y"], vip_y, 5201, out, limit=300)
    flood_out = lab.workdir / "flood.json"
    argv = [sys.executable, "-c", FLOOD, *map(str, ("10.201.2.2", port, spi, PACKETS, SOURCES, HOT, flood_out))]
    flood = m.spawn(argv, "flood")
    sent = tcp_send(hosts["x"], vip_y, 5201, total=20 * MB, limit=300)
    assert flood.wait(timeout=300) == 0, flood.log_tail()
    flood_doc = json.loads(flood_out.read_text())
    print(
        f"flood: {flood_doc['sent']} packets in {flood_doc['seconds']:.1f} s, then {flood_doc['hot_sent']} "
        f"from one source in {flood_doc['hot_seconds']:.1f} s"
    )
    assert flood_doc["sent"] >= PACKETS * 0.99 and flood_doc["hot_sent"] >= HOT * 0.99
    total = flood_doc["sent"] + flood_doc["hot_sent"]

    assert wait_until(lambda: read_result(out) is not None, 30)
    received = read_result(out)
    assert received is not None and received["sha256"] == sent["sha256"] and received["bytes"] == 20 * MB

    def counted() -> dict[str, int]:
        return overlay.counters("y")

    # every forged packet was either refused by the limiter or decrypted and refused (status is periodic)
    def refused() -> int:
        found = counted()
        return found.get("in_rate_limited", 0) + found.get("in_auth_failed", 0)

    def accounted() -> int:  # every forged packet: refused by y, or dropped by y's kernel before y read it
        return refused() + udp_receive_drops(hosts["y"]) - drops_before

    assert wait_until(lambda: accounted() >= 0.99 * total, 20), counted()
    counters = counted()
    dropped = udp_receive_drops(hosts["y"]) - drops_before
    print(
        f"y: {counters.get('in_auth_failed')} decrypted and refused, {counters.get('in_rate_limited')} limited, "
        f"{dropped} dropped by the kernel (socket buffer full)"
    )
    # the one hot source got its burst and RATE a second, no more; the rest of its packets were never decrypted
    hot_allowance = BURST + RATE * (flood_doc["hot_seconds"] + 1)
    assert counters["in_rate_limited"] >= flood_doc["hot_sent"] - hot_allowance - dropped - 0.01 * total
    assert counters["in_auth_failed"] <= flood_doc["sent"] + hot_allowance
    assert overlay.dataplane("y")["rate_limited_sources"] <= MAX_SOURCES
    assert m.nft_counter("watch", "answers") == 0, "y answered unauthenticated packets"
    growth = rss_kib(agent_pid) - rss_before
    print(f"y's agent RSS grew by {growth} KiB")
    assert growth < 64 * 1024, f"RSS grew by {growth} KiB"
    assert hosts["x"].ping(vip_y, count=3, timeout=5)
