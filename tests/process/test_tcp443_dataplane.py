"""The data plane on the tcp443 path, on loopback: DataPlane -> TcpPaths -> TLS stream -> TcpPaths -> DataPlane.

Two planes without TUN devices (the test hands packets in and reads what
comes out), with real TLS streams between real TcpPaths: b is firewalled and
dials a; a answers on the stream b opened. Checked: the routes each end
builds from its view, the seal/send/open round trip both ways, the binding
of the stream once a packet authenticated, the counters, and that a packet
is held (not lost, not sealed for nothing) while no stream exists yet.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.packet import raw

from bus.messages.sync import NodeView
from nodeagent.cli import _tcp_paths
from nodeagent.dataplane import DataPlane
from nodeagent.tcp443 import Route, TcpPaths
from nodeagent.transport import Wire
from nodeagent.tunnels import stream_routes
from tests.conftest import wait_until
from tests.helpers.netviews import peer, view, vpn
from tests.helpers.planes import VIPS, inbound_sa, outbound_sa

CLASSES = {"a": "public", "b": "firewalled"}


def ping(src: str, dst: str, seq: int = 1) -> bytes:
    return raw(IP(src=src, dst=dst) / ICMP(type=8, id=7, seq=seq) / b"over-tls")


def _view(node: str, path: str = "tcp443") -> NodeView:
    other = "b" if node == "a" else "a"
    entry = peer(other, {"corp": VIPS[other]}, endpoints=("127.0.0.1:7871",))
    entry = entry.model_copy(update={"path": path, "nat_class": CLASSES[other], "endpoint": "127.0.0.1:7871"})
    return view(node, [vpn("corp", VIPS[node])], [entry])


class Planes:
    def __init__(self) -> None:
        self.paths = {"a": TcpPaths(node="a", listen=("127.0.0.1", 0)), "b": TcpPaths(node="b")}
        self.planes: dict[str, DataPlane] = {}
        for node, other in (("a", "b"), ("b", "a")):
            plane = DataPlane(Wire(0, raw_esp=False))
            plane.tcp = self.paths[node]
            plane.apply_view(_view(node))
            plane.install(other, outbound_sa(node, other), [inbound_sa(other, node)])
            self.planes[node] = plane

    def route(self, node: str) -> dict[str, Route]:
        routes = stream_routes(list(self.planes[node].tunnels.values()), tcp_port=self.paths["a"].port or 0)
        self.paths[node].set_routes(routes)
        return routes

    def deliver(self, node: str, count: int) -> list[bytes]:
        """Wait for *count* ESP packets on *node*'s streams and open them in its plane."""
        frames: list[tuple[bytes, int]] = []
        assert wait_until(lambda: bool(frames.extend(self.paths[node].recv_batch(64))) or len(frames) >= count, 10)
        return [bytes(p) for p in self.planes[node].inbound_stream(frames)]

    def close(self) -> None:
        for plane in self.planes.values():
            plane.close()
        for paths in self.paths.values():
            paths.close()


@pytest.fixture
def planes() -> Iterator[Planes]:
    made = Planes()
    try:
        yield made
    finally:
        made.close()


def test_routes_follow_the_classes_in_the_view(planes: Planes) -> None:
    port = planes.paths["a"].port
    assert planes.route("b") == {"a": Route(address=("127.0.0.1", port))}, "b dials the public a"
    assert planes.route("a") == {"b": Route()}, "a waits for the firewalled b to dial"
    relay = DataPlane(Wire(0, raw_esp=False))
    try:
        relay.apply_view(_view("a", path="relay"))
        assert stream_routes(list(relay.tunnels.values())) == {"b": Route(relay=True)}
        relay.apply_view(_view("a", path="esp"))
        assert stream_routes(list(relay.tunnels.values())) == {}, "UDP paths need no stream"
    finally:
        relay.close()


def test_packets_cross_the_stream_both_ways_and_bind_it(planes: Planes) -> None:
    a, b = planes.planes["a"], planes.planes["b"]
    planes.route("a")
    # a cannot send before b dials: the packet is held (queued), not sealed and lost
    assert a.outbound_batch([ping(VIPS["a"], VIPS["b"])]) == []
    assert a.counters["out_tcp443_waiting"] == 1 and a.counters["out_queued"] == 1
    planes.route("b")  # b dials a; its HELLO names it, so a may answer on that stream at once
    assert wait_until(lambda: planes.paths["a"].can_send("b"), 10), planes.paths["a"].status()
    assert a.flush_queues(0.0) == [] and a.counters["out_queue_sent"] == 1 and a.counters["out_tcp443"] == 1
    assert planes.deliver("b", 1) == [ping(VIPS["a"], VIPS["b"])]
    dialled = planes.paths["b"].status()["streams"]
    assert [s["dialled"] for s in dialled] == [True]
    assert planes.paths["b"].status()["bound"] == {"a": dialled[0]["id"]}, "b answers on the stream it dialled"

    answers = [ping(VIPS["b"], VIPS["a"], seq) for seq in range(1, 51)]
    assert b.outbound_batch(answers) == []
    assert b.counters["out_tcp443"] == 50 and b.counters["out_packets"] == 50
    assert planes.deliver("a", 50) == answers
    assert a.counters["in_packets"] == 50 and a.counters["in_stream_packets"] == 50
    bound = planes.paths["a"].status()["bound"]
    assert set(bound) == {"b"} and planes.paths["a"].loop.streams[bound["b"]].tag == "b"
    assert a.status()["peers"]["b"]["stream"].startswith(f"stream {bound['b']} accepted")
    assert b.status()["peers"]["a"]["stream"].startswith("stream ") and "dialled" in b.status()["peers"]["a"]["stream"]


def test_forged_esp_on_a_stream_binds_nothing(planes: Planes) -> None:
    a = planes.planes["a"]
    planes.route("a")
    planes.route("b")
    assert wait_until(lambda: planes.paths["a"].can_send("b"), 10)
    (stream,) = planes.paths["b"].loop.streams.values()  # the one b dialled
    sealed = bytearray(outbound_sa("b", "a").seal(ping(VIPS["b"], VIPS["a"])))
    sealed[-1] ^= 1  # a flipped ICV bit: does not authenticate
    stream.enqueue(bytes(sealed))
    assert planes.deliver("a", 1) == []
    assert a.counters["in_packets"] == 0 and a.counters["in_auth_failed"] == 1
    assert planes.paths["a"].status()["bound"] == {}, "only an authenticated packet binds a stream"


def test_without_tcp_paths_the_packet_is_held_and_counted() -> None:
    plane = DataPlane(Wire(0, raw_esp=False))
    try:
        plane.apply_view(_view("a"))
        plane.install("b", outbound_sa("a", "b"), [inbound_sa("b", "a")])
        assert plane.outbound_batch([ping(VIPS["a"], VIPS["b"])]) == []
        assert plane.counters["out_path_unavailable"] == 1 and plane.counters["out_queued"] == 1
        assert plane.status()["peers"]["b"]["stream"] == "no TCP paths"
    finally:
        plane.close()


def test_a_taken_tcp_port_costs_only_the_listener() -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("0.0.0.0", 0))
    taken.listen(1)
    try:
        with pytest.raises(OSError):
            TcpPaths(node="n", listen=("0.0.0.0", taken.getsockname()[1]))
        paths = _tcp_paths("n", taken.getsockname()[1])  # what `agent up` does: warn, run without a listener
        try:
            assert paths.port is None and paths.status()["listen_port"] is None
        finally:
            paths.close()
    finally:
        taken.close()


def test_the_dialling_end_introduces_itself_so_the_stream_binds_before_data(planes: Planes) -> None:
    a, b = planes.planes["a"], planes.planes["b"]
    b.apply_view(_view("b"))
    planes.route("a")
    planes.route("b")
    assert wait_until(lambda: planes.paths["b"].can_send("a"), 10)
    b.introduce_streams(time.monotonic())
    assert b.counters["out_introduce_stream"] == 1 and b.counters["out_packets"] == 0, "a dummy, not data"
    assert planes.deliver("a", 1) == [], "nothing for the TUN"
    assert a.counters["in_dummy"] == 1 and planes.paths["a"].is_bound("b"), "but a knows b's stream now"
    b.introduce_streams(time.monotonic())
    assert b.counters["out_introduce_stream"] == 1, "at most one a second"


def test_forged_tags_on_one_stream_do_not_limit_another(planes: Planes) -> None:
    """D16 on streams: a stream that sends forged tags gets limited; the peer's real stream is not."""
    a = planes.planes["a"]
    planes.route("a")
    planes.route("b")
    assert wait_until(lambda: planes.paths["a"].can_send("b"), 10)
    forged = bytearray(outbound_sa("b", "a").seal(ping(VIPS["b"], VIPS["a"], 99)))
    forged[-1] ^= 1
    frames = [(bytes(forged), 999_999)] * 50  # as if from another stream, one that never authenticated
    assert a.inbound_stream(frames) == []
    assert a.counters["in_rate_limited"] > 0, dict(a.counters)
    b = planes.planes["b"]
    answers = [ping(VIPS["b"], VIPS["a"], seq) for seq in range(1, 21)]
    assert b.outbound_batch(answers) == []
    assert planes.deliver("a", 20) == answers, "the real stream is not limited"

