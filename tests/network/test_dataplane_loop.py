"""The data plane's one packet thread (DataPlane._loop), with real TUN devices in two namespaces.

Two DataPlanes run in the test process; each one's TUN, UDP socket and netlink
socket are opened inside its own namespace (a short-lived thread enters it
with setns), so the planes are real and the test can look at their threads.
Covered: one thread per plane serves both directions (pings each way), the
responder reads the kernel's answer in the pass that wrote the request (no
wake-up in between), periodic work runs with no traffic at all (keepalives),
a packet held for keys leaves once ``install`` wakes the thread, and
``stop()`` joins the thread, after which nothing is carried.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from compose.netns import Host, Lab
from nodeagent.dataplane import DataPlane
from nodeagent.transport import Wire
from nodeagent.tun import Tun
from tests.conftest import wait_until
from tests.helpers.netviews import peer, view, vpn
from tests.helpers.planes import VIPS, inbound_sa, outbound_sa

pytestmark = pytest.mark.timeout(300)

CLONE_NEWNET = 0x40000000
UNDERLAY = {"a": "10.77.0.1", "b": "10.77.0.2"}
PORT = 7871
KEEPALIVE = 1  # seconds: short, so that the periodic work shows while no packet flows


def in_namespace(ns: str, build: Any) -> Any:
    """Call *build* in a thread that entered namespace *ns*: the sockets and devices it opens live there."""
    result: dict[str, Any] = {}

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {ns}")
            result["value"] = build()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, name=f"enter-{ns}")
    thread.start()
    thread.join(60)
    if "error" in result:
        raise result["error"]
    return result["value"]


def make_plane(host: Host, node: str) -> DataPlane:
    other = "b" if node == "a" else "a"
    mine = vpn("corp", VIPS[node]).model_copy(update={"keepalive": KEEPALIVE})
    netmap = view(node, [mine], [peer(other, {"corp": VIPS[other]}, endpoints=(f"{UNDERLAY[other]}:{PORT}",))])

    def build() -> DataPlane:
        plane = DataPlane(Wire(PORT, raw_esp=False), Tun(f"cot{node}", 1400), path="udp")
        plane.apply_view(netmap)
        return plane

    return in_namespace(host.ns, build)


def key(plane: DataPlane, node: str) -> None:
    other = "b" if node == "a" else "a"
    plane.install(other, outbound_sa(node, other), [inbound_sa(other, node)])


@pytest.fixture
def planes(lab: Lab) -> Iterator[tuple[dict[str, Host], dict[str, DataPlane]]]:
    hosts = {name: lab.add_host(name) for name in ("a", "b")}
    lab.link(hosts["a"], "eth0", hosts["b"], "eth0", f"{UNDERLAY['a']}/24", f"{UNDERLAY['b']}/24")
    built: dict[str, DataPlane] = {}
    try:
        for name, host in hosts.items():
            built[name] = make_plane(host, name)
        yield hosts, built
    finally:
        for plane in built.values():
            plane.close()


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dataplane"]


def test_one_thread_carries_both_directions_and_answers_without_a_wake_up(planes: Any) -> None:
    hosts, built = planes
    for name, plane in built.items():
        key(plane, name)
        plane.start()
    assert len(loop_threads()) == 2, "one packet thread per plane, not one per direction"
    assert all(len(plane._threads) == 1 for plane in built.values())

    assert wait_until(lambda: hosts["a"].ping(VIPS["b"], timeout=2), 30), "a -> b through the tunnel"
    assert hosts["b"].ping(VIPS["a"], count=3, timeout=5), "b -> a through the tunnel"
    for name, plane in built.items():
        assert plane.counters["in_packets"] >= 1 and plane.counters["out_packets"] >= 1, name
        # The echo reply was queued on the TUN while the request was written: read in that same pass.
        assert plane.counters["tun_read_after_write"] >= 1, f"{name}: {dict(plane.counters)}"


def test_periodic_work_runs_with_no_traffic(planes: Any) -> None:
    _, built = planes
    for name, plane in built.items():
        key(plane, name)
        plane.start()
    # Nobody sends through the tunnel: only the periodic pass seals and sends these authenticated dummies.
    assert wait_until(
        lambda: all(p.counters["out_keepalive"] + p.counters["out_introduce"] >= 3 for p in built.values()), 30
    ), {name: dict(p.counters) for name, p in built.items()}
    assert all(p.counters["in_dummy"] >= 1 for p in built.values()), "each plane's dummies reached the other"


def test_a_packet_held_for_keys_leaves_when_install_wakes_the_thread(planes: Any) -> None:
    hosts, built = planes
    key(built["b"], "b")
    for plane in built.values():
        plane.start()
    pinger = hosts["a"].spawn(["ping", "-n", "-c", "1", "-W", "20", VIPS["b"]], "held-ping")
    assert wait_until(lambda: built["a"].counters["out_queued"] >= 1, 20), dict(built["a"].counters)
    key(built["a"], "a")
    assert pinger.wait(30) == 0, "the held echo request left once the keys came, and was answered"
    assert built["a"].counters["out_queue_sent"] >= 1


def test_stop_joins_the_thread_and_nothing_is_carried_after(planes: Any) -> None:
    hosts, built = planes
    for name, plane in built.items():
        key(plane, name)
        plane.start()
    assert wait_until(lambda: hosts["a"].ping(VIPS["b"], timeout=2), 30)
    thread = built["b"]._threads[0]
    built["b"].stop()
    assert not thread.is_alive(), "stop() joined the packet thread"
    assert built["b"]._threads == []
    received = built["b"].counters["in_packets"]
    assert not hosts["a"].ping(VIPS["b"], count=2, timeout=3), "a stopped plane carries nothing"
    assert built["b"].counters["in_packets"] == received
