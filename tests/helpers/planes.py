"""Two DataPlanes without TUN devices, keyed for each other, with the peer's endpoint captured on loopback.

Each plane's view names its peer at ``127.0.0.1:PORT`` where PORT is a plain
UDP socket the test holds (``Pair.captures``), so whatever a plane sends is
read back by the test and handed to the other plane's ``inbound_udp``: the
stages run for real (real sockets, real AES-GCM), only the TUN side is the
test's own lists.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, field

from bus.messages.sync import AclView, NodeView
from nodeagent.dataplane import DataPlane
from nodeagent.esp import InboundSA, OutboundSA
from nodeagent.transport import Wire
from tests.helpers.netviews import peer, view, vpn

VIPS = {"a": "10.1.0.1", "b": "10.1.0.2"}
RECV_TIMEOUT = 5.0


def sa_material(sender: str, receiver: str) -> tuple[int, bytes, bytes]:
    digest = hashlib.sha512(f"dpunit|{sender}->{receiver}".encode()).digest()
    return 0x1000 + int.from_bytes(digest[:3], "big"), digest[8:40], digest[40:44]


def outbound_sa(sender: str, receiver: str) -> OutboundSA:
    return OutboundSA(*sa_material(sender, receiver))


def inbound_sa(sender: str, receiver: str) -> InboundSA:
    return InboundSA(*sa_material(sender, receiver))


@dataclass
class Pair:
    planes: dict[str, DataPlane] = field(default_factory=dict)
    captures: dict[str, socket.socket] = field(default_factory=dict)  # node -> the socket its peer sends to
    views: dict[str, NodeView] = field(default_factory=dict)

    def key(self, node: str) -> None:
        """Give *node* its SAs: outbound to the other node, inbound from it."""
        other = "b" if node == "a" else "a"
        self.planes[node].install(other, outbound_sa(node, other), [inbound_sa(other, node)])

    def received(self, node: str, count: int) -> list[tuple[bytes, tuple[str, int]]]:
        """The next *count* datagrams sent to *node* (by its peer's plane), with their source address."""
        sock = self.captures[node]
        return [sock.recvfrom(65536) for _ in range(count)]

    def address_of(self, node: str) -> tuple[str, int]:
        """Where the other plane believes *node* is: the capture socket its peer sends to."""
        host, port = self.captures[node].getsockname()
        return host, port

    def carry(self, sender: str, count: int) -> list[memoryview]:
        """Read *count* datagrams *sender* sent and hand them to the other plane, from *sender*'s address."""
        receiver = "b" if sender == "a" else "a"
        datagrams = [(data, self.address_of(sender)) for data, _ in self.received(receiver, count)]
        return self.planes[receiver].inbound_udp(datagrams)

    def nothing_sent_to(self, node: str) -> bool:
        sock = self.captures[node]
        sock.setblocking(False)
        try:
            sock.recvfrom(65536)
        except BlockingIOError:
            return True
        finally:
            sock.settimeout(RECV_TIMEOUT)
        return False

    def close(self) -> None:
        for plane in self.planes.values():
            plane.close()
        for sock in self.captures.values():
            sock.close()


def make_pair(
    *,
    keyed: bool = True,
    acl: list[AclView] | None = None,
    routes: dict[str, tuple[str, ...]] | None = None,
    exit_node: dict[str, str] | None = None,
    vips: dict[str, str] | None = None,
) -> Pair:
    """Planes a and b in VPN corp; *acl* goes into both views, *routes* are subnets a node is the gateway for."""
    routes, exit_node, vips = routes or {}, exit_node or {}, vips or VIPS
    pair = Pair()
    for node in ("a", "b"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(RECV_TIMEOUT)
        pair.captures[node] = sock
    for node, other in (("a", "b"), ("b", "a")):
        port = pair.captures[other].getsockname()[1]
        behind = tuple(("corp", cidr) for cidr in routes.get(other, ()))
        pair.views[node] = view(
            node,
            [vpn("corp", vips[node], routes=routes.get(node, ()))],
            [peer(other, {"corp": vips[other]}, routes=behind, endpoints=(f"127.0.0.1:{port}",))],
            acl=acl,
        )
        plane = DataPlane(Wire(0, raw_esp=False), exit_node=exit_node.get(node))
        plane.apply_view(pair.views[node])
        pair.planes[node] = plane
    if keyed:
        pair.key("a")
        pair.key("b")
    return pair
