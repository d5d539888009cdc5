"""ACL policy and flow table: who may start a conversation, and which answers pass.

Packets are built by scapy and read by ``summarize``, so the rules are
checked on the very fields the data plane decides on.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.packet import Packet, raw

from nodeagent.acl import FlowTable, Policy, parse_ports
from nodeagent.packets import Summary, summarize
from tests.helpers.netviews import peer, rule, view, vpn

ME, ALICE, BOB = "10.1.0.1", "10.1.0.2", "10.1.0.3"


def s(packet: Packet) -> Summary:
    return summarize(raw(packet))


def tcp(dport: int, src: str = ALICE, dst: str = ME, sport: int = 40000) -> Summary:
    return s(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S"))


def udp(dport: int, src: str = ALICE, dst: str = ME, sport: int = 40000) -> Summary:
    return s(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport))


def ping(src: str = ALICE, dst: str = ME, ident: int = 77, reply: bool = False) -> Summary:
    return s(IP(src=src, dst=dst) / ICMP(type=0 if reply else 8, id=ident))


def policy(*rules, tags: tuple[str, ...] = (), alice_tags: tuple[str, ...] = (), bob_tags: tuple[str, ...] = ()):
    return Policy(
        view(
            "me",
            [vpn("corp", ME), vpn("lab", "10.2.0.1")],
            [
                peer("alice", {"corp": ALICE}, tags=alice_tags),
                peer("bob", {"corp": BOB, "lab": "10.2.0.3"}, tags=bob_tags),
            ],
            acl=list(rules),
            tags=tags,
        )
    )


def test_no_rules_means_unrestricted() -> None:
    open_policy = policy()
    assert not open_policy.restricted("corp") and not open_policy.restricted("lab")
    one = policy(rule("corp", "alice", "me", "tcp", "22"))
    assert one.restricted("corp")
    assert not one.restricted("lab")  # rules of one VPN do not restrict another


def test_parse_ports() -> None:
    assert parse_ports("") == ()
    assert parse_ports("22") == ((22, 22),)
    assert parse_ports("22, 80,8000-8100") == ((22, 22), (80, 80), (8000, 8100))


def test_tcp_port_ranges() -> None:
    p = policy(rule("corp", "alice", "me", "tcp", "22,8000-8100"))
    for port in (22, 8000, 8050, 8100):
        assert p.allows_inbound("corp", "alice", tcp(port)) is not None, port
    for port in (21, 23, 7999, 8101, 443):
        assert p.allows_inbound("corp", "alice", tcp(port)) is None, port
    assert p.allows_inbound("corp", "alice", udp(22)) is None  # tcp rule, udp packet
    assert p.allows_inbound("corp", "alice", ping()) is None
    assert p.allows_inbound("corp", "bob", tcp(22, src=BOB)) is None  # another sender
    assert p.allows_inbound("lab", "alice", tcp(22)) is None  # another VPN's rules


def test_udp_ports_and_the_matching_rule_is_returned() -> None:
    p = policy(rule("corp", "any", "me", "udp", "53", id=7), rule("corp", "bob", "any", "tcp", "", id=8))
    found = p.allows_inbound("corp", "alice", udp(53))
    assert found is not None and found.id == 7
    assert p.allows_inbound("corp", "alice", udp(54)) is None
    assert p.allows_inbound("corp", "alice", tcp(53)) is None
    by_bob = p.allows_inbound("corp", "bob", tcp(5432, src=BOB))
    assert by_bob is not None and by_bob.id == 8  # tcp with no ports: every port


def test_any_protocol_without_ports_allows_everything_from_the_sender() -> None:
    p = policy(rule("corp", "alice", "any"))
    assert p.allows_inbound("corp", "alice", tcp(1)) is not None
    assert p.allows_inbound("corp", "alice", udp(65535)) is not None
    assert p.allows_inbound("corp", "alice", ping()) is not None
    assert p.allows_inbound("corp", "bob", ping(src=BOB)) is None


def test_icmp_rules_cover_icmpv6_too_and_nothing_else() -> None:
    p = policy(rule("corp", "alice", "me", "icmp"))
    assert p.allows_inbound("corp", "alice", ping()) is not None
    v6 = s(IPv6(src="fd00::2", dst="fd00::1") / ICMPv6EchoRequest(id=5))
    assert p.allows_inbound("corp", "alice", v6) is not None
    assert p.allows_inbound("corp", "alice", tcp(22)) is None
    assert p.allows_inbound("corp", "alice", udp(22)) is None


@pytest.mark.parametrize("proto", ["sctp", "TCP", "icmp6", ""])
def test_an_unknown_protocol_allows_nothing(proto: str) -> None:
    """A rule this agent does not understand must fail closed, not turn into 'any protocol'."""
    p = policy(rule("corp", "alice", "me", proto))
    assert p.restricted("corp")
    for packet in (tcp(22), udp(53), ping()):
        assert p.allows_inbound("corp", "alice", packet) is None


def test_tag_selectors_on_both_sides() -> None:
    # src tag: the sender's tags (PeerView.tags); dst tag: this node's own tags (NodeView.tags).
    rules = (rule("corp", "tag:dev", "tag:db", "tcp", "5432"),)
    both = policy(*rules, tags=("db",), alice_tags=("dev", "x"))
    assert both.allows_inbound("corp", "alice", tcp(5432)) is not None
    assert both.allows_inbound("corp", "bob", tcp(5432, src=BOB)) is None  # bob has no dev tag
    assert policy(*rules, tags=("web",), alice_tags=("dev",)).allows_inbound("corp", "alice", tcp(5432)) is None
    assert policy(*rules, tags=(), alice_tags=("dev",)).allows_inbound("corp", "alice", tcp(5432)) is None
    assert policy(*rules, tags=("db",), alice_tags=("devops",)).allows_inbound("corp", "alice", tcp(5432)) is None
    # A node name is not a tag, and a tag is not a node name.
    assert policy(rule("corp", "tag:alice", "me")).allows_inbound("corp", "alice", ping()) is None
    assert policy(rule("corp", "alice", "tag:me"), tags=("me",)).allows_inbound("corp", "alice", ping()) is not None
    assert policy(rule("corp", "alice", "other-node")).allows_inbound("corp", "alice", ping()) is None
    assert policy(rule("corp", "alice", "any")).allows_inbound("corp", "stranger", ping()) is None


# -- flow table ---------------------------------------------------------------------------------


def reply_of(request: Summary) -> Summary:
    """The answer a peer sends to *request*, as the inbound stage sees it."""
    src, dst = str_ip(request.dst), str_ip(request.src)
    if request.proto == 6:
        return s(IP(src=src, dst=dst) / TCP(sport=request.dport, dport=request.sport, flags="SA"))
    if request.proto == 17:
        return s(IP(src=src, dst=dst) / UDP(sport=request.dport, dport=request.sport))
    return ping(src=src, dst=dst, ident=request.sport, reply=True)


def str_ip(value: int) -> str:
    return ".".join(str(b) for b in value.to_bytes(4, "big"))


@pytest.mark.parametrize(
    "outgoing",
    [
        tcp(443, src=ME, dst=ALICE, sport=51000),
        udp(53, src=ME, dst=ALICE, sport=51000),
        ping(src=ME, dst=ALICE, ident=999),
    ],
    ids=["tcp", "udp", "icmp"],
)
def test_replies_of_an_outbound_flow_pass_until_it_expires(outgoing: Summary) -> None:
    flows = FlowTable(idle=10.0)
    answer = reply_of(outgoing)
    assert not flows.known(flows.key_inbound(answer), now=100.0)
    flows.note(flows.key_outbound(outgoing), now=100.0)
    assert flows.key_inbound(answer) == flows.key_outbound(outgoing)
    assert flows.known(flows.key_inbound(answer), now=105.0)
    assert flows.known(flows.key_inbound(answer), now=110.0)
    assert not flows.known(flows.key_inbound(answer), now=110.5)
    flows.note(flows.key_outbound(outgoing), now=109.0)  # traffic keeps it alive
    assert flows.known(flows.key_inbound(answer), now=118.0)
    assert flows.sweep(now=118.0) == 0 and len(flows) == 1
    assert flows.sweep(now=119.5) == 1 and len(flows) == 0
    assert not flows.known(flows.key_inbound(answer), now=119.5)


def test_a_flow_does_not_open_other_conversations() -> None:
    flows = FlowTable(idle=10.0)
    outgoing = tcp(443, src=ME, dst=ALICE, sport=51000)
    flows.note(flows.key_outbound(outgoing), now=0.0)
    others = [
        tcp(51000, src=ALICE, dst=ME, sport=444),  # another remote port
        tcp(51001, src=ALICE, dst=ME, sport=443),  # another local port
        tcp(51000, src=BOB, dst=ME, sport=443),  # another peer
        udp(51000, src=ALICE, dst=ME, sport=443),  # another protocol
        ping(src=ALICE, dst=ME, ident=51000, reply=True),
    ]
    for packet in others:
        assert not flows.known(flows.key_inbound(packet), now=1.0)
    echo = ping(src=ME, dst=ALICE, ident=5)
    flows.note(flows.key_outbound(echo), now=0.0)
    assert not flows.known(flows.key_inbound(ping(src=ALICE, dst=ME, ident=6, reply=True)), now=1.0)
    v6_reply = s(IPv6(src="fd00::2", dst="fd00::1") / ICMPv6EchoReply(id=7))
    v6_request = s(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=7))
    flows.note(flows.key_outbound(v6_request), now=0.0)
    assert flows.known(flows.key_inbound(v6_reply), now=1.0)


def test_a_full_table_refuses_new_flows_and_counts_them() -> None:
    flows = FlowTable(idle=10.0, limit=3)
    keys = [flows.key_outbound(udp(53, src=ME, dst=ALICE, sport=port)) for port in range(1000, 1005)]
    for key in keys:
        flows.note(key, now=0.0)
    assert len(flows) == 3 and flows.refused == 2
    assert all(flows.known(k, now=1.0) for k in keys[:3])
    assert not any(flows.known(k, now=1.0) for k in keys[3:])
    flows.note(keys[0], now=5.0)  # refreshing a known flow is not a new one
    assert flows.refused == 2 and flows.known(keys[0], now=14.0)
    assert flows.sweep(now=12.0) == 2  # the two not refreshed
    flows.note(keys[4], now=12.0)  # room again
    assert flows.known(keys[4], now=13.0) and flows.refused == 2
