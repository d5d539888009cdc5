"""_admit decides once per flow in a run: the next packets of an admitted flow pass by one header compare.

A run (one inbound_udp call, one SA, consecutive numbers) mixes an admitted
TCP flow with packets that must each be decided and refused: another port
that the ACL denies, the same ports from an address that is not the peer's
(cryptokey routing), to an address outside this node (VPN isolation), and a
packet of the admitted flow too short to hold its ports. Each refusal is
counted, everything else arrives in order.
"""

from __future__ import annotations

from scapy.layers.inet import IP, TCP
from scapy.packet import raw

from nodeagent.constants import SEQ_FIRST
from nodeagent.esp import OutboundSA
from nodeagent.transport import MASQUERADE_MARKER
from tests.helpers.netviews import rule
from tests.helpers.planes import VIPS, make_pair, sa_material

A, B = VIPS["a"], VIPS["b"]


def ssh(seq: int, *, src: str = A, dst: str = B, dport: int = 22, ttl: int = 64) -> bytes:
    return raw(IP(src=src, dst=dst, ttl=ttl) / TCP(sport=40000, dport=dport, seq=seq, flags="A") / (b"s" * 100))


def test_a_run_admits_its_flow_once_and_still_refuses_each_stranger() -> None:
    pair = make_pair(acl=[rule("corp", "a", "b", "tcp", "22")])
    try:
        b = pair.planes["b"]
        first = raw(IP(src=A, dst=B) / TCP(sport=40000, dport=22, flags="S"))  # a starts ssh: allowed
        short = bytearray(ssh(900)[:22])  # the admitted flow's first bytes, cut before its ports
        short[2:4] = (22).to_bytes(2, "big")  # a length field that matches, as ESP's trailer check demands
        inners = [
            first,
            ssh(100),
            ssh(200),
            ssh(300, dport=80),  # the ACL denies this port
            ssh(400),
            ssh(500, src="10.1.0.99"),  # not a's address: cryptokey routing
            ssh(600, ttl=3),  # another TTL: not the same header bytes, the same summary
            ssh(700, dst="10.1.0.7"),  # not this node: VPN isolation
            bytes(short),
            ssh(800),
        ]
        sealer = OutboundSA(*sa_material("a", "b"), first_seq=SEQ_FIRST)
        datagrams = [(MASQUERADE_MARKER + packet, pair.address_of("a")) for packet in sealer.seal_many(inners)]
        delivered = b.inbound_udp(datagrams)
        assert [bytes(p) for p in delivered] == [inners[n] for n in (0, 1, 2, 4, 6, 9)]
        counters = b.counters
        assert counters["in_acl_denied"] == 2  # port 80, and the short packet (no ports: not the ssh flow)
        assert counters["in_source_not_allowed"] == 1 and counters["in_vpn_isolation"] == 1
        assert counters["in_packets"] == 6 and b.tunnels["a"].rx == len(inners)
    finally:
        pair.close()
