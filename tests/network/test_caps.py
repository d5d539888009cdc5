"""Data-plane capabilities between real agents: the path and the inner checksums follow them (issue 8).

Two public sites (compose/topologies.py sites_behind: R is the internet, the
server listens on R's loopback, each node on its own /24 behind R).

- Both agents offload (the default): each reports "csum" and "gso", the
  server gives the pair ``udp`` instead of raw ESP (which has no GSO/GRO),
  `coterie agent status` says so, inner checksums stay partial between
  them, and a 20 MB TCP transfer arrives whole.
- One agent runs with ``--no-offload``: it reports nothing, so the pair
  keeps raw ESP and the offloading agent completes every inner checksum
  toward it. A TUN without the virtio_net_hdr takes packets as they are: a
  partial checksum would make its kernel drop every TCP segment, so the
  20 MB transfer both ways is what shows the completion works.
"""

from __future__ import annotations

import pytest

from compose.coterie_lab import coterie
from compose.netns import Lab
from compose.topologies import sites_behind
from tests.conftest import wait_until
from tests.helpers.traffic import read_result, tcp_send, tcp_sink
from tests.network.overlay import Overlay, start_overlay

pytestmark = pytest.mark.timeout(600)  # real processes in namespaces, on a shared 2-core machine

MB = 1 << 20


def _public_pair(lab: Lab, y_args: list[str]) -> Overlay:
    sites = sites_behind(lab, ["public", "public"])
    hosts = {"x": sites[0].hosts[0], "y": sites[1].hosts[0]}
    overlay = start_overlay(
        lab, hosts, sites.r, sites.server_addr, {"x": ["lab"], "y": ["lab"]}, per_node_args={"y": y_args}
    )
    overlay.wait_synced("x", ["y"])
    return overlay


def _reported(overlay: Overlay) -> dict[str, tuple[str, list[str]]]:
    return {n["name"]: (n["nat_class"], n.get("caps", [])) for n in overlay.server.nodes()}


def _transfer(overlay: Overlay, sender: str, receiver: str, total: int, port: int = 5201) -> None:
    vip = overlay.vip(receiver)
    out = overlay.lab.workdir / f"sink-{sender}-{receiver}.json"
    tcp_sink(overlay.hosts[receiver], vip, port, out)
    sent = tcp_send(overlay.hosts[sender], vip, port, total=total)
    received = read_result(out)
    assert received is not None and received["bytes"] == total, received
    assert received["sha256"] == sent["sha256"]


def test_offloading_public_agents_take_udp_and_leave_checksums_partial(lab: Lab) -> None:
    overlay = _public_pair(lab, [])
    both = ("public", ["csum", "gso"])
    assert wait_until(lambda: _reported(overlay) == {"x": both, "y": both}, 60, interval=1.0), _reported(overlay)
    for me, peer in (("x", "y"), ("y", "x")):
        assert wait_until(lambda me=me, peer=peer: overlay.status(me)["peers"][peer]["path"] == "udp", 30)
        assert overlay.status(me)["peers"][peer]["caps"] == ["csum", "gso"]
        assert wait_until(lambda me=me, peer=peer: overlay.dataplane(me)["peers"][peer]["path"] == "udp", 10)
    overlay.wait_ping("x", overlay.vip("y"))
    _transfer(overlay, "x", "y", 20 * MB)

    shown = coterie(overlay.hosts["x"], "agent", "status", "--state-dir", str(overlay.state_dir("x"))).stdout
    assert "udp (peer public)" in shown and "partial checksums" in shown and "offloads: csum, gso" in shown, shown
    assert "offloads: csum, gso" in overlay.server.cli("node", "show", "y").stdout

    def batched() -> bool:  # the point of udp: many datagrams per system call (status: every heartbeat)
        batching = overlay.dataplane("x")["batching"]
        return batching["udp_datagrams_sent"] > max(1000, batching["udp_sends"])

    assert wait_until(batched, 10), overlay.dataplane("x")["batching"]


def test_an_agent_without_offloads_keeps_raw_esp_and_gets_complete_checksums(lab: Lab) -> None:
    overlay = _public_pair(lab, ["--no-offload"])
    expected = {"x": ("public", ["csum", "gso"]), "y": ("public", [])}
    assert wait_until(lambda: _reported(overlay) == expected, 60, interval=1.0), _reported(overlay)
    for me, peer in (("x", "y"), ("y", "x")):
        assert wait_until(lambda me=me, peer=peer: overlay.dataplane(me)["peers"][peer]["path"] == "esp", 30)
    assert overlay.dataplane("x")["peers"]["y"]["inner_checksums"] == "complete"
    assert overlay.dataplane("x")["caps"] == ["csum", "gso"] and overlay.dataplane("y")["caps"] == []
    overlay.wait_ping("x", overlay.vip("y"))
    _transfer(overlay, "x", "y", 20 * MB)  # x's super-packets and partial checksums, completed for y
    _transfer(overlay, "y", "x", 2 * MB, port=5202)
