"""PeerTable: longest-prefix match, cryptokey routing (RELIABILITY.md D7), exit nodes, VPN isolation.

The lookup is checked against a brute-force longest-prefix match written
with nothing but ``ipaddress``, over random prefix sets (hypothesis).
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.peers import PeerTable
from tests.helpers.netviews import ip, peer, view, vpn

# corp 10.1.0.0/24: this node (me) 10.1.0.1, gw 10.1.0.2 routes 10.9.0.0/16, lan 10.1.0.3 routes 10.9.5.0/24
CORP = view(
    "me",
    [vpn("corp", "10.1.0.1")],
    [
        peer("gw", {"corp": "10.1.0.2"}, routes=(("corp", "10.9.0.0/16"),)),
        peer("lan", {"corp": "10.1.0.3"}, routes=(("corp", "10.9.5.0/24"),)),
        peer("host", {"corp": "10.1.0.4"}),
    ],
)


def test_destination_selects_the_peer_and_vpn() -> None:
    table = PeerTable(CORP)
    route = table.outbound(4, ip("10.1.0.4"))
    assert route is not None and (route.peer, route.vpn, route.prefix_length) == ("host", "corp", 32)
    assert table.outbound(4, ip("10.1.0.99")) is None  # in the subnet but nobody's
    assert table.outbound(4, ip("192.0.2.1")) is None
    assert table.conflicts == []


def test_more_specific_prefix_owned_by_another_peer_wins() -> None:
    table = PeerTable(CORP)
    wide = table.outbound(4, ip("10.9.1.1"))
    narrow = table.outbound(4, ip("10.9.5.200"))
    assert wide is not None and wide.peer == "gw" and wide.prefix_length == 16
    assert narrow is not None and narrow.peer == "lan" and narrow.prefix_length == 24
    # Inbound, the same table: gw may not speak for 10.9.5.0/24 although its /16 covers it.
    assert table.sender_owns("gw", 4, ip("10.9.5.200")) is None
    assert table.sender_owns("lan", 4, ip("10.9.5.200")) is not None
    assert table.sender_owns("gw", 4, ip("10.9.200.1")) is not None


def test_a_host_route_inside_a_gateway_route_belongs_to_the_host() -> None:
    inside = view(
        "me",
        [vpn("corp", "10.1.0.1")],
        [peer("gw", {"corp": "10.1.0.2"}, routes=(("corp", "10.1.0.0/24"),)), peer("host", {"corp": "10.1.0.7"})],
    )
    table = PeerTable(inside)
    assert table.sender_owns("gw", 4, ip("10.1.0.7")) is None
    assert table.sender_owns("host", 4, ip("10.1.0.7")) is not None
    assert table.outbound(4, ip("10.1.0.8")).peer == "gw"  # type: ignore[union-attr]


def test_sender_owns_refuses_sources_outside_the_peer_prefixes() -> None:
    table = PeerTable(CORP)
    assert table.sender_owns("host", 4, ip("10.1.0.4")) is not None
    assert table.sender_owns("host", 4, ip("10.1.0.3")) is None  # another peer's address
    assert table.sender_owns("host", 4, ip("10.1.0.1")) is None  # this node's own address
    assert table.sender_owns("host", 4, ip("10.1.0.99")) is None  # unassigned
    assert table.sender_owns("host", 4, ip("8.8.8.8")) is None
    assert table.sender_owns("nobody", 4, ip("10.1.0.4")) is None


# exits 10.5.0.0/24: this node 10.5.0.1, two gateways offering the default route, one with a LAN too
EXITS = view(
    "me",
    [vpn("exits", "10.5.0.1")],
    [
        peer("exit-a", {"exits": "10.5.0.2"}, routes=(("exits", "0.0.0.0/0"),)),
        peer("exit-b", {"exits": "10.5.0.3"}, routes=(("exits", "0.0.0.0/0"), ("exits", "192.168.7.0/24"))),
    ],
)


def test_default_route_counts_only_through_the_chosen_exit_node() -> None:
    single = view("me", [vpn("exits", "10.5.0.1")], [EXITS.peers["exit-b"]])
    assert PeerTable(single).outbound(4, ip("1.1.1.1")) is None  # no exit node chosen
    assert PeerTable(single, exit_node="exit-a").outbound(4, ip("1.1.1.1")) is None  # not this one
    chosen = PeerTable(single, exit_node="exit-b").outbound(4, ip("1.1.1.1"))
    assert chosen is not None and chosen.peer == "exit-b" and chosen.prefix_length == 0
    # A more specific route through it is used whether or not it is the exit node.
    assert PeerTable(single).outbound(4, ip("192.168.7.9")).peer == "exit-b"  # type: ignore[union-attr]


def test_either_of_two_exit_nodes_can_be_chosen() -> None:
    """Two gateways offer 0.0.0.0/0: the one chosen carries the traffic, whichever sorts first."""
    for name in ("exit-a", "exit-b"):
        table = PeerTable(EXITS, exit_node=name)
        route = table.outbound(4, ip("1.1.1.1"))
        assert route is not None and route.peer == name
        assert table.sender_owns(name, 4, ip("1.1.1.1")) is not None  # its replies come back in
    assert PeerTable(EXITS).conflicts == []  # default routes not taken are not in conflict


def test_an_exit_node_not_chosen_cannot_speak_for_the_internet() -> None:
    for exit_node in (None, "exit-b"):
        table = PeerTable(EXITS, exit_node=exit_node)
        assert table.sender_owns("exit-a", 4, ip("1.1.1.1")) is None
        assert table.sender_owns("exit-a", 4, ip("10.5.0.2")) is not None


# this node is in two VPNs: red 10.1.0.0/24 and blue 10.2.0.0/24, and is blue's gateway for 192.168.50.0/24;
# it also has an IPv6 VPN green fd00:9::/64
TWO = view(
    "me",
    [
        vpn("red", "10.1.0.1"),
        vpn("blue", "10.2.0.1", routes=("192.168.50.0/24",)),
        vpn("green", "fd00:9::1"),
    ],
    [
        peer("r", {"red": "10.1.0.5"}),
        peer("b", {"blue": "10.2.0.5"}),
        peer("both", {"red": "10.1.0.6", "blue": "10.2.0.6"}),
        peer("g", {"green": "fd00:9::5"}),
    ],
)


def test_vpn_isolation_inbound() -> None:
    table = PeerTable(TWO)
    assert table.accepts("red", 4, ip("10.1.0.1"))
    assert table.accepts("blue", 4, ip("10.2.0.1"))
    assert table.accepts("blue", 4, ip("192.168.50.77"))  # blue's gateway subnet
    assert not table.accepts("red", 4, ip("10.2.0.5"))  # red may not reach into blue through me
    assert not table.accepts("red", 4, ip("10.2.0.1"))  # nor my blue address
    assert not table.accepts("red", 4, ip("192.168.50.77"))  # nor blue's LAN
    assert not table.accepts("blue", 4, ip("10.1.0.5"))
    assert not table.accepts("nonexistent", 4, ip("10.1.0.1"))
    assert table.accepts("green", 6, ip("fd00:9::1"))
    assert not table.accepts("green", 4, ip("fd00:9::1") & 0xFFFFFFFF)  # versions never mix


def test_vpn_isolation_outbound() -> None:
    table = PeerTable(TWO)
    assert table.may_send_from("red", 4, ip("10.1.0.1"))
    assert table.may_send_from("blue", 4, ip("192.168.50.77"))
    assert not table.may_send_from("red", 4, ip("10.2.0.1"))  # blue's address leaving into red
    assert not table.may_send_from("red", 4, ip("192.168.50.77"))
    assert not table.may_send_from("red", 4, ip("10.1.0.5"))  # a peer's address: not forwarded back


def test_a_peer_in_both_vpns_is_routed_per_vpn() -> None:
    table = PeerTable(TWO)
    red = table.sender_owns("both", 4, ip("10.1.0.6"))
    blue = table.sender_owns("both", 4, ip("10.2.0.6"))
    assert red is not None and red.vpn == "red"
    assert blue is not None and blue.vpn == "blue"
    # It may not relay red traffic into blue through me: its red source routes to red, not to blue's subnet.
    assert not table.accepts(red.vpn, 4, ip("10.2.0.1"))
    g = table.outbound(6, ip("fd00:9::5"))
    assert g is not None and (g.peer, g.vpn, g.prefix_length) == ("g", "green", 128)


def test_a_gateway_in_two_vpns_does_not_bridge_them() -> None:
    """An exit node (0.0.0.0/0) in red and blue: each VPN reaches the internet, neither reaches the other."""
    both_exits = view(
        "me",
        [vpn("red", "10.1.0.1", routes=("0.0.0.0/0",)), vpn("blue", "10.2.0.1", routes=("0.0.0.0/0",))],
        [
            peer("r", {"red": "10.1.0.5"}),
            peer("b", {"blue": "10.2.0.5"}),
            peer("bgw", {"blue": "10.2.0.9"}, routes=(("blue", "172.16.0.0/16"),)),
        ],
    )
    table = PeerTable(both_exits)
    assert table.accepts("red", 4, ip("8.8.8.8")) and table.accepts("blue", 4, ip("8.8.8.8"))
    assert table.accepts("red", 4, ip("10.1.0.1"))
    assert not table.accepts("red", 4, ip("10.2.0.5"))  # a blue member
    assert not table.accepts("red", 4, ip("172.16.3.3"))  # a LAN behind a blue gateway
    assert not table.accepts("red", 4, ip("10.2.0.1"))  # this node's blue address
    assert table.may_send_from("blue", 4, ip("8.8.8.8"))  # internet answers go back into blue
    assert not table.may_send_from("blue", 4, ip("10.1.0.5"))  # a red member's packet leaving into blue
    assert not table.may_send_from("blue", 4, ip("10.1.0.1"))


def test_overlapping_gateway_routes_follow_the_longer_prefix() -> None:
    def table(mine: str, theirs: str) -> PeerTable:
        return PeerTable(
            view(
                "me",
                [vpn("red", "10.1.0.1", routes=(mine,)), vpn("blue", "10.2.0.1")],
                [peer("bgw", {"blue": "10.2.0.9"}, routes=(("blue", theirs),))],
            )
        )

    narrow_mine = table("192.168.5.0/24", "192.168.0.0/16")
    assert narrow_mine.accepts("red", 4, ip("192.168.5.1"))  # my LAN is the more specific: the kernel sends it there
    wide_mine = table("192.168.0.0/16", "192.168.5.0/24")
    assert not wide_mine.accepts("red", 4, ip("192.168.5.1"))  # blue's subnet is more specific: it would go there
    assert wide_mine.accepts("red", 4, ip("192.168.6.1"))


def test_conflicting_claims_are_recorded_and_the_first_kept() -> None:
    clash = view(
        "me",
        [vpn("corp", "10.1.0.1")],
        [
            peer("a", {"corp": "10.1.0.2"}, routes=(("corp", "172.16.0.0/12"),)),
            peer("b", {"corp": "10.1.0.3"}, routes=(("corp", "172.16.0.0/12"),)),
        ],
    )
    table = PeerTable(clash)
    assert len(table.conflicts) == 1 and "172.16.0.0/12" in table.conflicts[0]
    owner = table.outbound(4, ip("172.20.1.1"))
    assert owner is not None and owner.peer == "a"
    assert table.sender_owns("b", 4, ip("172.20.1.1")) is None  # the loser cannot speak for it either


# -- property: the dict-per-length lookup is a longest-prefix match ------------------------------

PREFIXES = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32), st.sampled_from(["p1", "p2", "p3", "p4"])),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(PREFIXES, st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20))
def test_lookup_is_longest_prefix_match(prefixes: list[tuple[int, int, str]], probes: list[int]) -> None:
    names = ["p1", "p2", "p3", "p4"]
    vips = {ipaddress.IPv4Network(f"100.64.0.{i + 2}/32"): name for i, name in enumerate(names)}
    claims = dict(vips)  # one owner per prefix: conflicts are a test of their own
    for address, length, owner in prefixes:
        if length:  # default routes depend on the exit node: tested above
            claims.setdefault(ipaddress.IPv4Network((address, length), strict=False), owner)
    peers = [
        peer(name, {"v": f"100.64.0.{i + 2}"}, routes=tuple(("v", str(n)) for n, o in claims.items() if o == name))
        for i, name in enumerate(names)
    ]
    table = PeerTable(view("me", [vpn("v", "100.64.0.1")], peers))
    assert table.conflicts == []
    for probe in probes + [int(n.network_address) for n in claims]:
        matching = [n for n in claims if int(n.network_address) == probe & int(n.netmask)]
        expected = claims[max(matching, key=lambda n: n.prefixlen)] if matching else None
        found = table.outbound(4, probe)
        assert (found.peer if found else None) == expected
