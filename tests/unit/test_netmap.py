"""Who sees whom: node views computed from a real SQLite datastore.

Why: the view is the whole of a node's authority. A peer listed that should
not be is a hole in the ACL; a peer missing is a broken VPN; an address
reused twice in a VPN breaks routing for both nodes. The state is built with
the same repository functions the datastore service runs, in real
transactions on a database file, so the SQL and the view logic are tested
together.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from bus import errors
from bus.errors import RemoteError
from bus.messages.sync import NodeView, RouteView
from services.datastore import repo
from services.datastore.db import make_engine, migrate, reading, transaction
from services.datastore.models import Change, Node, Vpn
from services.datastore.netmap import World

T = TypeVar("T")


class Truth:
    """The datastore, driven like the datastore service: one transaction and one change-log row per mutation."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _mutate(self, kind: str, apply: Callable[[Session], tuple[list[int], list[int]]]) -> Change:
        with transaction(self.engine) as session:
            vpn_ids, node_ids = apply(session)
            return repo.record(session, kind, kind, "operator:test", vpn_ids, node_ids)

    def vpn(self, name: str, subnet: str = "10.0.0.0/24", topology: str = "mesh") -> Change:
        def apply(s: Session) -> tuple[list[int], list[int]]:
            vpn, _ = repo.create_vpn(s, name, subnet, "overlay", topology)
            return [vpn.id or 0], []

        return self._mutate("vpn.create", apply)

    def node(self, name: str, vpns: tuple[str, ...] = (), tags: tuple[str, ...] = ()) -> Change:
        def apply(s: Session) -> tuple[list[int], list[int]]:
            node, _, vpn_ids = repo.add_node(s, name, list(vpns), list(tags), 24.0)
            return vpn_ids, [node.id or 0]

        return self._mutate("node.add", apply)

    def member(self, node: str, vpn: str, role: str = "member") -> Change:
        def apply(s: Session) -> tuple[list[int], list[int]]:
            n, v = repo.node_by_name(s, node), repo.vpn_by_name(s, vpn)
            repo.add_member(s, n, v, role)
            return [v.id or 0], [n.id or 0]

        return self._mutate("member.add", apply)

    def unmember(self, node: str, vpn: str) -> Change:
        def apply(s: Session) -> tuple[list[int], list[int]]:
            n, v = repo.node_by_name(s, node), repo.vpn_by_name(s, vpn)
            repo.remove_member(s, n, v)
            return [v.id or 0], [n.id or 0]

        return self._mutate("member.remove", apply)

    def route(self, node: str, vpn: str, cidr: str) -> Change:
        def apply(s: Session) -> tuple[list[int], list[int]]:
            n, v = repo.node_by_name(s, node), repo.vpn_by_name(s, vpn)
            repo.add_route(s, n, v, cidr)
            return [v.id or 0], [n.id or 0]

        return self._mutate("route.add", apply)

    def acl(self, vpn: str, src: str, dst: str, proto: str = "any", ports: str = "") -> int:
        rule_id: list[int] = []

        def apply(s: Session) -> tuple[list[int], list[int]]:
            v = repo.vpn_by_name(s, vpn)
            rule_id.append(repo.add_acl(s, v, src, dst, proto, ports).id or 0)
            return [v.id or 0], []

        self._mutate("acl.add", apply)
        return rule_id[0]

    def rename(self, name: str, new_name: str) -> Change:
        def apply(s: Session) -> tuple[list[int], list[int]]:
            return [], [repo.rename_node(s, name, new_name).id or 0]

        return self._mutate("node.rename", apply)

    def read(self, use: Callable[[World], T]) -> T:
        """Run *use* on a World inside one read transaction (rows are not usable after it ends)."""
        with reading(self.engine) as session:
            return use(World.load(session))

    def view(self, name: str) -> NodeView:
        def build(world: World) -> NodeView:
            node_id = next(i for i, n in world.nodes.items() if n.name == name)
            return world.view(node_id)

        return self.read(build)

    def peers(self, name: str) -> set[str]:
        return set(self.view(name).peers)

    def vips(self, vpn: str) -> dict[str, str]:
        """node name -> address in *vpn*, read from the membership rows."""

        def collect(world: World) -> dict[str, str]:
            vpn_id = next(i for i, v in world.vpns.items() if v.name == vpn)
            return {world.nodes[m.node_id].name: m.vip for m in world.members.get(vpn_id, [])}

        return self.read(collect)

    def names(self, node_ids: set[int]) -> set[str]:
        return self.read(lambda world: {world.nodes[i].name for i in node_ids})


@pytest.fixture
def truth(tmp_path: Path) -> Iterator[Truth]:
    engine = make_engine(f"sqlite:///{tmp_path / 'coterie.db'}")
    migrate(engine)
    yield Truth(engine)
    engine.dispose()


# ---------------------------------------------------------------------- visibility
def test_mesh_members_see_every_other_member(truth: Truth) -> None:
    """In a mesh VPN without rules every member may reach every other, and never itself."""
    truth.vpn("office")
    names = ["a", "b", "c", "d"]
    for name in names:
        truth.node(name, ("office",))
    truth.node("outsider")  # in no VPN: seen by nobody, sees nobody
    for name in names:
        view = truth.view(name)
        assert view.node == name
        assert set(view.peers) == set(names) - {name}
        assert set(view.vpns) == {"office"}
    assert truth.peers("outsider") == set()
    vips = truth.vips("office")
    assert truth.view("a").peers["b"].vips == {"office": vips["b"]}
    assert truth.view("a").vpns["office"].vip == vips["a"]


def test_a_node_in_two_vpns_sees_the_union_with_one_entry_per_peer(truth: Truth) -> None:
    """A peer met through two VPNs is one entry holding both addresses, so the agent sets up one tunnel."""
    truth.vpn("office", "10.1.0.0/24")
    truth.vpn("lab", "10.2.0.0/24")
    truth.node("hub", ("office", "lab"))
    truth.node("both", ("office", "lab"))
    truth.node("o", ("office",))
    truth.node("l", ("lab",))
    view = truth.view("hub")
    assert set(view.vpns) == {"office", "lab"}
    assert set(view.peers) == {"both", "o", "l"}
    office, lab = truth.vips("office"), truth.vips("lab")
    assert view.peers["both"].vips == {"office": office["both"], "lab": lab["both"]}
    assert view.peers["both"].roles == {"office": "member", "lab": "member"}
    assert view.peers["o"].vips == {"office": office["o"]}
    assert view.peers["l"].vips == {"lab": lab["l"]}
    assert truth.peers("o") == {"hub", "both"}, "a single-VPN member sees only its VPN"
    assert truth.peers("l") == {"hub", "both"}


def test_hub_spoke_spokes_see_only_hubs_and_hubs_see_all(truth: Truth) -> None:
    """Spokes must not learn of each other: traffic between them goes through a hub."""
    truth.vpn("star", topology="hub-spoke")
    truth.node("h1")
    truth.node("h2")
    for spoke in ("s1", "s2", "s3"):
        truth.node(spoke, ("star",))
    truth.member("h1", "star", "hub")
    truth.member("h2", "star", "hub")
    for spoke in ("s1", "s2", "s3"):
        assert truth.peers(spoke) == {"h1", "h2"}, spoke
    assert truth.peers("h1") == {"h2", "s1", "s2", "s3"}
    assert truth.peers("h2") == {"h1", "s1", "s2", "s3"}
    assert truth.view("s1").peers["h1"].roles == {"star": "hub"}
    assert truth.view("h1").vpns["star"].role == "hub"


def test_hub_spoke_does_not_leak_into_a_shared_mesh(truth: Truth) -> None:
    """Two spokes that also share a mesh VPN see each other through the mesh only (one address)."""
    truth.vpn("star", "10.1.0.0/24", topology="hub-spoke")
    truth.vpn("mesh", "10.2.0.0/24")
    truth.node("hub")
    truth.member("hub", "star", "hub")
    truth.node("s1", ("star", "mesh"))
    truth.node("s2", ("star", "mesh"))
    assert set(truth.view("s1").peers["s2"].vips) == {"mesh"}
    assert set(truth.view("s1").peers["hub"].vips) == {"star"}


def test_acl_rules_limit_peers_to_those_some_rule_connects(truth: Truth) -> None:
    """With rules, a peer is listed only if traffic may flow between the two nodes in either direction."""
    truth.vpn("office")
    truth.node("web", ("office",), tags=("www",))
    truth.node("db", ("office",))
    truth.node("admin", ("office",), tags=("ops",))
    truth.node("laptop", ("office",))
    truth.node("printer", ("office",))
    r1 = truth.acl("office", "web", "db", "tcp", "5432")  # by node name
    r2 = truth.acl("office", "tag:ops", "any")  # by tag, to anyone
    r3 = truth.acl("office", "laptop", "tag:www", "tcp", "80,443")  # to a tag
    assert truth.peers("web") == {"db", "admin", "laptop"}
    assert truth.peers("db") == {"web", "admin"}, "the destination sees its source too (either direction)"
    assert truth.peers("admin") == {"web", "db", "laptop", "printer"}
    assert truth.peers("laptop") == {"admin", "web"}
    assert truth.peers("printer") == {"admin"}, "reached only through 'any'"
    # The acl list names exactly the rules that mention the node (directly, by tag or by 'any').
    assert [a.id for a in truth.view("web").acl] == [r1, r2, r3]
    assert [a.id for a in truth.view("db").acl] == [r1, r2]
    assert [a.id for a in truth.view("admin").acl] == [r2]
    assert [a.id for a in truth.view("laptop").acl] == [r2, r3]
    assert [a.id for a in truth.view("printer").acl] == [r2]
    rule = truth.view("web").acl[0]
    assert (rule.vpn, rule.src, rule.dst, rule.proto, rule.ports) == ("office", "web", "db", "tcp", "5432")


def test_acl_rules_of_one_vpn_do_not_open_another(truth: Truth) -> None:
    """Rules belong to their VPN: a rule elsewhere neither hides mesh peers nor opens ruled ones."""
    truth.vpn("open", "10.1.0.0/24")
    truth.vpn("ruled", "10.2.0.0/24")
    truth.node("a", ("open", "ruled"))
    truth.node("b", ("ruled",))
    truth.node("c", ("ruled",))
    truth.node("d", ("open",))
    truth.acl("ruled", "a", "b")
    truth.acl("open", "d", "x-not-here")  # the open VPN now has a rule: only it decides there
    assert truth.peers("a") == {"b"}
    assert truth.peers("c") == set()
    assert truth.peers("d") == set()
    assert [a.vpn for a in truth.view("a").acl] == ["ruled"]


def test_rename_keeps_acl_rules_pointing_at_the_node(truth: Truth) -> None:
    """Renaming a node must not silently drop the rules that name it (and so its peers)."""
    truth.vpn("office")
    truth.node("old", ("office",))
    truth.node("peer", ("office",))
    rule = truth.acl("office", "old", "peer")
    truth.rename("old", "new")
    view = truth.view("new")
    assert view.node == "new"
    assert set(view.peers) == {"peer"}
    assert [(a.id, a.src) for a in view.acl] == [(rule, "new")]


def test_gateway_routes_appear_on_the_peer_entry_and_in_its_own_vpn_view(truth: Truth) -> None:
    """Peers must know which subnets to send through the gateway; the gateway must know it serves them."""
    truth.vpn("office", "10.1.0.0/24")
    truth.vpn("lab", "10.2.0.0/24")
    truth.node("gw", ("office", "lab"))
    truth.node("client", ("office",))
    truth.route("gw", "office", "192.168.10.0/24")
    truth.route("gw", "office", "172.16.0.0/16")
    truth.route("gw", "lab", "192.168.20.0/24")
    own = truth.view("gw")
    assert own.vpns["office"].routes == ["172.16.0.0/16", "192.168.10.0/24"]
    assert own.vpns["lab"].routes == ["192.168.20.0/24"]
    entry = truth.view("client").peers["gw"]
    assert entry.routes == [
        RouteView(vpn="office", cidr="172.16.0.0/16"),
        RouteView(vpn="office", cidr="192.168.10.0/24"),
    ], "only the routes of VPNs the client shares with the gateway"
    assert truth.view("client").vpns["office"].routes == []
    assert truth.view("client").peers["gw"].vips == {"office": truth.vips("office")["gw"]}


def test_affected_by_a_membership_change_is_the_vpn_and_the_node(truth: Truth) -> None:
    """The fanout pushes only to affected nodes: missing one leaves it with a stale view."""
    truth.vpn("office", "10.1.0.0/24")
    truth.vpn("lab", "10.2.0.0/24")
    truth.vpn("far", "10.3.0.0/24")
    truth.node("a", ("office",))
    truth.node("b", ("office",))
    truth.node("newbie", ("lab",))
    truth.node("labmate", ("lab",))
    truth.node("stranger", ("far",))
    added = truth.member("newbie", "office")
    reached = truth.names(truth.read(lambda world: world.affected(added)))
    assert {"a", "b", "newbie"} <= reached
    assert "stranger" not in reached
    removed = truth.unmember("newbie", "office")
    reached = truth.names(truth.read(lambda world: world.affected(removed)))
    assert {"a", "b", "newbie"} <= reached, "the node that left must hear that it left"
    assert "stranger" not in reached
    assert truth.peers("a") == {"b"} and truth.peers("newbie") == {"labmate"}


def test_a_change_to_a_spoke_reaches_the_hubs_and_every_node_whose_view_changed(truth: Truth) -> None:
    """A spoke's own change (here a rename) reaches the hubs, not the other spokes of a 10,000-spoke VPN.

    Why: the fanout recomputes the view of every node reached; reaching every member for each spoke
    coming online made a batch cost O(N^2). And reaching too few leaves someone with a stale view, so
    every node whose view did change must be among those reached.
    """
    truth.vpn("star", "10.1.0.0/24", topology="hub-spoke")
    truth.vpn("mesh", "10.2.0.0/24")
    truth.node("hub")
    truth.member("hub", "star", "hub")
    for spoke in ("s1", "s2", "s3"):
        truth.node(spoke, ("star",))
    truth.node("m1", ("mesh",))
    truth.member("s1", "mesh")
    names = ("hub", "s1", "s2", "s3", "m1")
    before = {name: truth.view(name) for name in names}
    renamed = truth.rename("s1", "s1b")
    after = {name: truth.view("s1b" if name == "s1" else name) for name in names}
    reached = truth.names(truth.read(lambda world: world.affected(renamed)))
    changed = {("s1b" if n == "s1" else n) for n in names if before[n] != after[n]}
    assert changed <= reached, "a node whose view changed was not reached"
    assert reached == {"s1b", "hub", "m1"}, "other spokes of the hub-spoke VPN must not be reached"


# ---------------------------------------------------------------------- virtual IPs
def test_vips_come_from_the_subnet_lowest_free_first_and_unique(truth: Truth) -> None:
    """Addresses are allocated in order from the VPN's subnet, never twice in one VPN."""
    truth.vpn("office", "10.7.0.0/29")  # 6 hosts
    for i in range(6):
        truth.node(f"n{i}", ("office",))
    vips = truth.vips("office")
    assert [vips[f"n{i}"] for i in range(6)] == [f"10.7.0.{i}" for i in range(1, 7)]
    network = ipaddress.ip_network("10.7.0.0/29")
    assert all(ipaddress.ip_address(v) in network for v in vips.values())
    assert len(set(vips.values())) == len(vips)
    with pytest.raises(RemoteError) as full:
        truth.node("n6", ("office",))
    assert full.value.code == errors.CONFLICT and "no free address" in full.value.message


def test_vips_are_per_vpn(truth: Truth) -> None:
    """Each VPN allocates from its own subnet; the same node gets one address in each."""
    truth.vpn("a", "10.1.0.0/24")
    truth.vpn("b", "fd00:1::/64")
    truth.node("x", ("a", "b"))
    truth.node("y", ("b",))
    assert truth.vips("a") == {"x": "10.1.0.1"}
    assert truth.vips("b") == {"x": "fd00:1::1", "y": "fd00:1::2"}


def test_freed_vips_are_reused_lowest_first(truth: Truth) -> None:
    """Removing a member frees its address; the next member takes the lowest free one."""
    truth.vpn("office", "10.8.0.0/24")
    for name in ("a", "b", "c", "d"):
        truth.node(name, ("office",))
    truth.unmember("c", "office")  # frees .3
    truth.unmember("b", "office")  # frees .2
    truth.node("e", ("office",))
    truth.node("f", ("office",))
    truth.node("g", ("office",))
    vips = truth.vips("office")
    assert vips == {"a": "10.8.0.1", "d": "10.8.0.4", "e": "10.8.0.2", "f": "10.8.0.3", "g": "10.8.0.5"}
    truth.member("b", "office")
    assert truth.vips("office")["b"] == "10.8.0.6"


# ---------------------------------------------------------------------- validation
def _invalid(action: Callable[[], object]) -> str:
    with pytest.raises(RemoteError) as info:
        action()
    assert info.value.code == errors.INVALID, info.value
    return info.value.message


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("bad name", "invalid"),
        ("-dash", "invalid"),
        ("", "invalid"),
        ("x" * 64, "invalid"),
        ("caf\u00e9", "invalid"),
        ("any", "reserved"),
        ("tag:ops", "invalid"),
    ],
)
def test_bad_names_are_invalid(truth: Truth, name: str, words: str) -> None:
    """Names end up in ACL selectors and CLI output: reserved words and odd characters are refused."""
    for what, action in (("VPN", lambda: truth.vpn(name)), ("node", lambda: truth.node(name))):
        message = _invalid(action)
        assert repr(name) in message and what in message and words in message, message
    assert truth.read(lambda world: (world.vpns, world.nodes)) == ({}, {}), "nothing was written"


@pytest.mark.parametrize(
    ("subnet", "words"),
    [
        ("10.0.0.1/24", "host bits"),
        ("10.0.0.0/33", "invalid"),
        ("10.0.0/24", "invalid"),
        ("banana", "invalid"),
        ("10.0.0.0/31", "too small"),
        ("10.0.0.0/32", "too small"),
        ("fd00::/127", "too small"),
        ("fd00::1/64", "host bits"),
    ],
)
def test_bad_subnets_are_invalid(truth: Truth, subnet: str, words: str) -> None:
    message = _invalid(lambda: truth.vpn("office", subnet))
    assert subnet in message and words in message, message


def test_smallest_subnets_that_hold_two_nodes_are_accepted(truth: Truth) -> None:
    """The lower bound must not refuse a usable subnet."""
    truth.vpn("v4", "10.0.0.0/30")
    truth.vpn("v6", "fd00::/126")
    truth.node("a", ("v4", "v6"))
    truth.node("b", ("v4", "v6"))
    assert truth.vips("v4") == {"a": "10.0.0.1", "b": "10.0.0.2"}


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "192.168.1.1/24", "nonsense", "300.1.1.0/24", ""])
def test_bad_route_cidrs_are_invalid(truth: Truth, cidr: str) -> None:
    truth.vpn("office")
    truth.node("gw", ("office",))
    message = _invalid(lambda: truth.route("gw", "office", cidr))
    assert "route" in message and repr(cidr) in message and "CIDR" in message, message


@pytest.mark.parametrize("ports", ["22,", ",22", "0", "70000", "90-80", "http", "22;80", "1-2-3", "123456"])
def test_bad_port_lists_are_invalid(truth: Truth, ports: str) -> None:
    truth.vpn("office")
    message = _invalid(lambda: truth.acl("office", "any", "any", "tcp", ports))
    assert "port" in message and ("invalid" in message), message


@pytest.mark.parametrize("proto", ["any", "icmp"])
def test_ports_without_tcp_or_udp_are_invalid(truth: Truth, proto: str) -> None:
    """A port list on ICMP (or 'any') means nothing; accepting it would mislead the operator."""
    truth.vpn("office")
    message = _invalid(lambda: truth.acl("office", "any", "any", proto, "22"))
    assert "tcp" in message and "udp" in message, message
    assert truth.read(lambda world: dict(world.rules)) == {}, "the refused rule was not stored"


@pytest.mark.parametrize("selector", ["tag:", "tag:bad tag", "no spaces", "tag:any"])
def test_bad_acl_selectors_are_invalid(truth: Truth, selector: str) -> None:
    truth.vpn("office")
    message = _invalid(lambda: truth.acl("office", selector, "any"))
    assert "name" in message, message


def test_good_ports_are_accepted_and_normalised(truth: Truth) -> None:
    """The refusals above must not come from refusing everything."""
    truth.vpn("office")
    truth.node("a", ("office",))
    truth.acl("office", "any", "a", "tcp", "22, 80,8000-8100")
    truth.acl("office", "any", "a", "udp", "1-65535")
    truth.acl("office", "any", "a", "icmp", "any")
    assert [(r.proto, r.ports) for r in truth.view("a").acl] == [
        ("tcp", "22,80,8000-8100"),
        ("udp", "1-65535"),
        ("icmp", ""),
    ]


# ---------------------------------------------------------------------- native addressing
def test_native_vpn_gives_real_addresses_as_each_viewer_reaches_them(truth: Truth) -> None:
    """Native: a node's address is its own local one; a peer's is its public mapping, or its LAN address
    when both sit behind the same public address; unknown until reported (issue 6)."""
    truth.vpn("nat-lab", "10.9.0.0/24")
    with transaction(truth.engine) as session:
        vpn = session.get(Vpn, 1)
        assert vpn is not None
        vpn.addressing = "native"
    for name in ("pub", "p1", "p2", "late"):
        truth.node(name, ("nat-lab",))
    reports = {
        "pub": (["198.18.0.2:4500"], "198.18.0.2:4500"),
        "p1": (["192.168.1.10:4500"], "198.18.1.2:4500"),
        "p2": (["192.168.1.11:4500"], "198.18.1.2:1024"),
    }
    with transaction(truth.engine) as session:
        for node in session.exec(select(Node)).all():
            if node.name in reports:
                node.endpoints, node.public_endpoint = reports[node.name]
        repo.record(session, "node.endpoints", "test", "operator:test", [], [])
    pub, p1 = truth.view("pub"), truth.view("p1")
    assert pub.vpns["nat-lab"].vip == "198.18.0.2"
    assert p1.vpns["nat-lab"].vip == "192.168.1.10", "its own address, not its mapping"
    assert pub.peers["p1"].vips == {"nat-lab": "198.18.1.2"} == pub.peers["p2"].vips, "both behind one PAT"
    assert p1.peers["p2"].vips == {"nat-lab": "192.168.1.11"}, "same site: the LAN address"
    assert p1.peers["pub"].vips == {"nat-lab": "198.18.0.2"}
    assert pub.peers["late"].vips == {}, "not reported yet: no address"
    assert truth.view("late").vpns["nat-lab"].vip == ""


def test_capabilities_reach_peers_and_offloading_public_pairs_take_udp(truth: Truth) -> None:
    """What an agent reports in caps is in every peer's entry for it, and steers the pair's path (issue 8)."""
    truth.vpn("office")
    caps = {"a": ["csum", "gso"], "b": ["csum", "gso"], "c": ["csum"], "d": []}
    for name in caps:
        truth.node(name, ("office",))
    with transaction(truth.engine) as session:
        for number, node in enumerate(session.exec(select(Node)).all()):
            address = f"198.18.0.{number + 2}:7871"
            node.endpoints, node.public_endpoint, node.nat_class = [address], address, "public"
            node.caps = caps[node.name]
        repo.record(session, "node.endpoints", "test", "operator:test", [], [])
    views = {name: truth.view(name) for name in caps}
    for viewer, view in views.items():
        for name, entry in view.peers.items():
            assert entry.caps == caps[name]
            both_offload = "gso" in caps[viewer] and "gso" in caps[name]
            assert entry.path == ("udp" if both_offload else "esp"), (viewer, name)
            assert entry.path == views[name].peers[viewer].path  # both ends read the same decision
    legacy = views["a"].peers["d"]  # reports nothing (an old agent): its entry hashes as it always did
    dump = legacy.model_dump(mode="json")
    del dump["caps"]
    canonical = json.dumps(dump, sort_keys=True, separators=(",", ":")).encode()
    assert legacy.fingerprint == hashlib.sha256(canonical).digest()
