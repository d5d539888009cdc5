"""The node's view and its synchronisation, without a network.

Why these matter: the digest is the only thing the agent and the fanout
compare, so it must be independent of dict order yet sensitive to every
field; a delta must rebuild exactly the server's view, or the agent loops on
snapshots; the replica must never change on a duplicate, a gap or a bad
delta; and the seal is all that protects a stored view after a restart.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from bus.messages.sync import (
    AclView,
    NodeView,
    PeerView,
    RouteView,
    Seal,
    Snapshot,
    Update,
    ViewDelta,
    VpnView,
)
from bus.signing import seal, verify_seal
from nodeagent.sync import RECEIPT_DELAY, Outcome, Replica, receipt_delay

NODE_KEY = "rq:rt8bQx}g7V.5X]sR+pf<jW*wA/9xYb=k3nLz-"  # a Z85-looking node key (40 characters)


# ---------------------------------------------------------------------- hand-made views
def vpn(name: str = "office", vip: str = "10.0.0.1", **changes: Any) -> VpnView:
    fields: dict[str, Any] = {
        "name": name,
        "subnet": "10.0.0.0/24",
        "addressing": "overlay",
        "topology": "mesh",
        "cipher": "aes256gcm",
        "mtu": 1400,
        "keepalive": 25,
        "vip": vip,
        "role": "member",
        "routes": [],
    }
    return VpnView(**(fields | changes))


def peer(name: str, vips: dict[str, str] | None = None, **changes: Any) -> PeerView:
    vips = vips if vips is not None else {"office": "10.0.0.2"}
    fields: dict[str, Any] = {
        "name": name,
        "vips": vips,
        "roles": dict.fromkeys(vips, "member"),
        "routes": [],
        "endpoints": ["192.0.2.10:4500"],
        "public_endpoint": None,
        "nat_class": "unknown",
        "online": False,
        "sign_key": None,
    }
    return PeerView(**(fields | changes))


def acl(rule_id: int = 1, **changes: Any) -> AclView:
    fields: dict[str, Any] = {"id": rule_id, "vpn": "office", "src": "any", "dst": "any", "proto": "any", "ports": ""}
    return AclView(**(fields | changes))


def base_view() -> NodeView:
    return NodeView(
        node="alpha",
        vpns={"office": vpn(), "lab": vpn("lab", "10.9.0.1", subnet="10.9.0.0/24")},
        peers={
            "beta": peer("beta", {"office": "10.0.0.2", "lab": "10.9.0.2"}),
            "gamma": peer("gamma", {"office": "10.0.0.3"}),
        },
        acl=[acl(1), acl(2, src="tag:ops", dst="alpha", proto="tcp", ports="22")],
    )


def rebuilt(view: NodeView, path: tuple[str | int, ...], value: Any) -> NodeView:
    """*view* with the field at *path* (in its JSON form) replaced by *value*, validated again."""
    doc = view.model_dump(mode="json")
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return NodeView.model_validate(doc)


# ---------------------------------------------------------------------- digest
def test_digest_ignores_dict_insertion_order() -> None:
    """Server and agent build their dicts in different orders; equal content must still compare equal."""
    view = base_view()
    reordered = NodeView(
        node="alpha",
        vpns=dict(reversed(list(view.vpns.items()))),
        peers={
            "gamma": view.peers["gamma"],
            "beta": peer(
                "beta",
                {"lab": "10.9.0.2", "office": "10.0.0.2"},
                roles={"lab": "member", "office": "member"},
            ),
        },
        acl=list(view.acl),
    )
    assert list(reordered.vpns) != list(view.vpns), "the test must really reorder something"
    assert list(reordered.peers["beta"].vips) != list(view.peers["beta"].vips)
    assert reordered.digest() == view.digest()
    assert NodeView.model_validate(view.model_dump(mode="json")).digest() == view.digest(), "a JSON round trip"


FIELD_CHANGES: list[tuple[tuple[str | int, ...], Any]] = [
    (("node",), "alpha2"),
    (("vpns", "office", "subnet"), "10.0.1.0/24"),
    (("vpns", "office", "addressing"), "native"),
    (("vpns", "office", "topology"), "hub-spoke"),
    (("vpns", "office", "cipher"), "chacha20poly1305"),
    (("vpns", "office", "mtu"), 1300),
    (("vpns", "office", "keepalive"), 10),
    (("vpns", "office", "vip"), "10.0.0.9"),
    (("vpns", "office", "role"), "gateway"),
    (("vpns", "office", "routes"), ["192.168.5.0/24"]),
    (("peers", "beta", "vips", "office"), "10.0.0.20"),
    (("peers", "beta", "roles", "lab"), "hub"),
    (("peers", "beta", "routes"), [{"vpn": "lab", "cidr": "172.16.0.0/16"}]),
    (("peers", "beta", "endpoints"), ["192.0.2.11:4500"]),
    (("peers", "beta", "public_endpoint"), "198.51.100.1:4500"),
    (("peers", "beta", "nat_class"), "nat"),
    (("peers", "beta", "online"), True),
    (("peers", "beta", "sign_key"), "ab" * 32),
    (("acl", 1, "id"), 3),
    (("acl", 1, "vpn"), "lab"),
    (("acl", 1, "src"), "any"),
    (("acl", 1, "dst"), "tag:ops"),
    (("acl", 1, "proto"), "udp"),
    (("acl", 1, "ports"), "53"),
]


@pytest.mark.parametrize(("path", "value"), FIELD_CHANGES, ids=["/".join(map(str, p)) for p, _ in FIELD_CHANGES])
def test_digest_changes_with_every_field(path: tuple[str | int, ...], value: Any) -> None:
    """A field the digest missed would let the agent and the fanout agree on different views."""
    view = base_view()
    changed = rebuilt(view, path, value)
    assert changed != view
    assert changed.digest() != view.digest()


def test_digest_changes_with_entries_added_removed_and_acl_order() -> None:
    """Adding or removing a whole entry, or reordering the ACL (evaluated in order), changes the digest."""
    view = base_view()
    digests = {
        view.digest(),
        view.model_copy(update={"peers": {"beta": view.peers["beta"]}}).digest(),
        view.model_copy(update={"vpns": {"office": view.vpns["office"]}}).digest(),
        view.model_copy(update={"acl": list(reversed(view.acl))}).digest(),
        view.model_copy(update={"acl": []}).digest(),
        NodeView(node="alpha").digest(),
    }
    assert len(digests) == 6


# ---------------------------------------------------------------------- deltas, by hand
def with_peer(view: NodeView, entry: PeerView) -> NodeView:
    return view.model_copy(update={"peers": view.peers | {entry.name: entry}})


def _cases() -> list[tuple[str, NodeView, NodeView]]:
    old = base_view()
    return [
        ("peer added", old, with_peer(old, peer("delta", {"lab": "10.9.0.4"}))),
        ("peer removed", old, old.model_copy(update={"peers": {"gamma": old.peers["gamma"]}})),
        ("peer changed", old, rebuilt(old, ("peers", "gamma", "online"), True)),
        ("peer address changed", old, rebuilt(old, ("peers", "beta", "vips", "lab"), "10.9.0.200")),
        ("vpn added", old, old.model_copy(update={"vpns": old.vpns | {"dmz": vpn("dmz", "10.5.0.1")}})),
        ("vpn removed", old, old.model_copy(update={"vpns": {"office": old.vpns["office"]}})),
        ("vpn changed", old, rebuilt(old, ("vpns", "lab", "mtu"), 1280)),
        ("acl changed", old, old.model_copy(update={"acl": [acl(1), acl(7, proto="icmp")]})),
        ("acl emptied", old, old.model_copy(update={"acl": []})),
        ("rename", old, old.model_copy(update={"node": "alpha-renamed"})),
        ("everything at once", old, NodeView(node="omega", vpns={"x": vpn("x")}, peers={"p": peer("p")})),
        ("from empty", NodeView(node="alpha"), old),
        ("to empty", old, NodeView(node="alpha")),
    ]


@pytest.mark.parametrize(("case", "old", "new"), _cases(), ids=[c[0] for c in _cases()])
def test_delta_between_rebuilds_the_new_view(case: str, old: NodeView, new: NodeView) -> None:
    """The fanout sends only the delta; applying it must give exactly the view it computed."""
    assert old.digest() != new.digest(), f"{case}: the case must change something"
    delta = ViewDelta.between(old, new)
    assert not delta.is_empty(), case
    assert delta.apply(old).digest() == new.digest(), case


def test_delta_carries_only_what_changed() -> None:
    """A delta the size of the whole view would defeat its purpose (and reveal nothing extra)."""
    old = base_view()
    new = rebuilt(old, ("peers", "gamma", "online"), True)
    delta = ViewDelta.between(old, new)
    assert delta.set_peers == {"gamma": new.peers["gamma"]}
    assert delta.del_peers == [] and delta.set_vpns == {} and delta.del_vpns == []
    assert delta.acl is None and delta.node is None
    removed = ViewDelta.between(old, old.model_copy(update={"peers": {"beta": old.peers["beta"]}}))
    assert removed.del_peers == ["gamma"] and removed.set_peers == {}


def test_delta_of_equal_views_is_empty() -> None:
    """Equal views (even built in a different order) give an empty delta: nothing to push."""
    view = base_view()
    same = NodeView.model_validate(view.model_dump(mode="json"))
    delta = ViewDelta.between(view, same)
    assert delta.is_empty()
    assert delta.apply(view).digest() == view.digest()
    assert not ViewDelta(del_peers=["x"]).is_empty()
    assert not ViewDelta(acl=[]).is_empty(), "clearing the ACL is a change"
    assert not ViewDelta(node="new").is_empty()


# ---------------------------------------------------------------------- deltas, as a property
NAMES = st.text(alphabet="abcdefgh", min_size=1, max_size=3)
ADDRESSES = st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.9.0.1", "fd00::1"])
ROLES = st.sampled_from(["member", "gateway", "hub"])
CIDRS = st.sampled_from(["192.168.1.0/24", "172.16.0.0/12", "10.200.0.0/16"])

VPN_VIEWS = st.builds(
    VpnView,
    name=NAMES,
    subnet=st.sampled_from(["10.0.0.0/24", "10.9.0.0/16", "fd00::/64"]),
    addressing=st.sampled_from(["overlay", "native"]),
    topology=st.sampled_from(["mesh", "hub-spoke"]),
    cipher=st.sampled_from(["aes256gcm", "chacha20poly1305"]),
    mtu=st.integers(1200, 1500),
    keepalive=st.integers(0, 60),
    vip=ADDRESSES,
    role=ROLES,
    routes=st.lists(CIDRS, max_size=2),
)
PEER_VIEWS = st.builds(
    PeerView,
    name=NAMES,
    vips=st.dictionaries(NAMES, ADDRESSES, max_size=3),
    roles=st.dictionaries(NAMES, ROLES, max_size=3),
    routes=st.lists(st.builds(RouteView, vpn=NAMES, cidr=CIDRS), max_size=2),
    endpoints=st.lists(st.sampled_from(["192.0.2.1:4500", "[2001:db8::1]:4500"]), max_size=2),
    public_endpoint=st.none() | st.just("198.51.100.7:4500"),
    nat_class=st.sampled_from(["unknown", "public", "nat", "pat"]),
    online=st.booleans(),
    sign_key=st.none() | st.just("cd" * 32),
)
ACL_VIEWS = st.builds(
    AclView,
    id=st.integers(1, 5),
    vpn=NAMES,
    src=st.sampled_from(["any", "alpha", "tag:ops"]),
    dst=st.sampled_from(["any", "beta", "tag:web"]),
    proto=st.sampled_from(["any", "tcp", "udp", "icmp"]),
    ports=st.sampled_from(["", "22", "80,443"]),
)
NODE_VIEWS = st.builds(
    NodeView,
    node=st.sampled_from(["alpha", "beta", "alpha-2"]),
    vpns=st.dictionaries(NAMES, VPN_VIEWS, max_size=3),
    peers=st.dictionaries(NAMES, PEER_VIEWS, max_size=4),
    acl=st.lists(ACL_VIEWS, max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(old=NODE_VIEWS, new=NODE_VIEWS)
def test_delta_property_between_random_views(old: NodeView, new: NodeView) -> None:
    """For any two views, between(old, new).apply(old) is new, and the delta is empty exactly when equal."""
    delta = ViewDelta.between(old, new)
    assert delta.apply(old).digest() == new.digest()
    assert delta.is_empty() == (old.digest() == new.digest())


@settings(max_examples=100, deadline=None)
@given(views=st.lists(NODE_VIEWS, min_size=2, max_size=5))
def test_chained_deltas_reach_the_last_view(views: list[NodeView]) -> None:
    """An agent applies a chain of deltas; errors must not accumulate along it."""
    current = views[0]
    for old, new in itertools.pairwise(views):
        current = ViewDelta.between(old, new).apply(current)
    assert current.digest() == views[-1].digest()


# ---------------------------------------------------------------------- the replica
SIGNER = SigningKey(bytes(range(32)))


def snapshot(view: NodeView, revision: int) -> Snapshot:
    digest = view.digest()
    return Snapshot(revision=revision, view=view, digest=digest, seal=seal(SIGNER, NODE_KEY, revision, digest))


def update(old: NodeView, new: NodeView, revision: int, prev: int, digest: str | None = None) -> Update:
    digest = new.digest() if digest is None else digest
    return Update(
        revision=revision,
        prev_revision=prev,
        delta=ViewDelta.between(old, new),
        digest=digest,
        seal=seal(SIGNER, NODE_KEY, revision, digest),
    )


def state(replica: Replica) -> tuple[Any, ...]:
    return (replica.view, replica.revision, replica.digest, replica.seal)


V1 = base_view()
V2 = rebuilt(V1, ("peers", "gamma", "online"), True)
V3 = V2.model_copy(update={"peers": {"beta": V2.peers["beta"]}})


def loaded(revision: int = 10) -> Replica:
    replica = Replica()
    assert replica.load(snapshot(V1, revision))
    return replica


def test_replica_has_no_view_before_a_snapshot() -> None:
    """An update is meaningless without its base; the agent must take a snapshot first."""
    replica = Replica()
    assert replica.apply(update(V1, V2, 11, 10)) is Outcome.NO_VIEW
    assert state(replica) == (None, 0, "", None)


def test_replica_load_takes_the_snapshot() -> None:
    replica = loaded(10)
    assert replica.view == V1 and replica.revision == 10 and replica.digest == V1.digest()
    assert replica.seal is not None


def test_replica_refuses_a_snapshot_whose_digest_does_not_match() -> None:
    """A snapshot that contradicts its own digest is damaged; holding it would make every later delta wrong."""
    replica = Replica()
    bad = snapshot(V1, 10).model_copy(update={"digest": V2.digest()})
    assert not replica.load(bad)
    assert state(replica) == (None, 0, "", None)
    held = loaded(10)
    before = state(held)
    assert not held.load(snapshot(V2, 12).model_copy(update={"digest": "0" * 64}))
    assert state(held) == before, "a refused snapshot leaves the held view alone"


def test_replica_applies_an_in_order_update() -> None:
    replica = loaded(10)
    message = update(V1, V2, 13, 10)  # per-node streams skip revisions: prev_revision is what counts
    assert replica.apply(message) is Outcome.APPLIED
    assert state(replica) == (V2, 13, V2.digest(), message.seal)
    assert replica.apply(update(V2, V3, 14, 13)) is Outcome.APPLIED
    assert replica.view is not None and replica.view.digest() == V3.digest() and replica.revision == 14


@pytest.mark.parametrize("revision", [10, 9, 1, 0])
def test_replica_ignores_stale_updates(revision: int) -> None:
    """Duplicates and late copies (revision at or below the held one) change nothing."""
    replica = loaded(10)
    before = state(replica)
    assert replica.apply(update(V1, V2, revision, revision - 1)) is Outcome.STALE
    assert state(replica) == before


def test_replica_ignores_a_duplicate_after_applying_it() -> None:
    """The broker may deliver an update twice (outbox after reconnect): the second is a no-op."""
    replica = loaded(10)
    message = update(V1, V2, 11, 10)
    assert replica.apply(message) is Outcome.APPLIED
    after = state(replica)
    assert replica.apply(message) is Outcome.STALE
    assert state(replica) == after


@pytest.mark.parametrize("prev", [9, 11, 0, 5])
def test_replica_reports_a_gap_and_keeps_its_state(prev: int) -> None:
    """An update that follows a revision we never saw cannot be applied safely."""
    replica = loaded(10)
    before = state(replica)
    assert replica.apply(update(V1, V2, 12, prev)) is Outcome.GAP
    assert state(replica) == before


def test_replica_reports_a_mismatch_and_keeps_its_state() -> None:
    """A delta that does not produce the announced digest means the views diverged: resync, change nothing."""
    replica = loaded(10)
    before = state(replica)
    assert replica.apply(update(V1, V2, 11, 10, digest=V3.digest())) is Outcome.MISMATCH
    assert state(replica) == before
    # A delta computed from another base than the held view gives a different result too.
    assert replica.apply(update(V3, V2, 11, 10, digest=V3.digest())) is Outcome.MISMATCH
    assert state(replica) == before


# ---------------------------------------------------------------------- seals
DIGEST = V1.digest()


def test_a_good_seal_verifies() -> None:
    sealed = seal(SIGNER, NODE_KEY, 7, DIGEST)
    assert verify_seal(SIGNER.verify_key.encode().hex(), NODE_KEY, 7, DIGEST, sealed, time.time()) is None


@pytest.mark.parametrize(
    ("node_key", "revision", "digest"),
    [
        (NODE_KEY[:-1] + "x", 7, DIGEST),
        (NODE_KEY, 8, DIGEST),
        (NODE_KEY, 6, DIGEST),
        (NODE_KEY, 7, V2.digest()),
        (NODE_KEY, 7, DIGEST[:-1] + ("0" if DIGEST[-1] != "0" else "1")),
    ],
    ids=["node key", "revision up", "revision down", "digest", "digest one hex digit"],
)
def test_a_seal_binds_node_revision_and_digest(node_key: str, revision: int, digest: str) -> None:
    """A stored view moved to another node, rolled back or edited must not verify."""
    sealed = seal(SIGNER, NODE_KEY, 7, DIGEST)
    problem = verify_seal(SIGNER.verify_key.encode().hex(), node_key, revision, digest, sealed, time.time())
    assert problem is not None and "altered" in problem


@pytest.mark.parametrize("shift", [1.0, -1.0, 3600.0, 86400.0 * 365])
def test_a_seal_binds_its_expiry(shift: float) -> None:
    """Extending the expiry by hand (to trust a stale view longer) must break the signature."""
    sealed = seal(SIGNER, NODE_KEY, 7, DIGEST)
    moved = Seal(expires=sealed.expires + shift, signature=sealed.signature)
    problem = verify_seal(SIGNER.verify_key.encode().hex(), NODE_KEY, 7, DIGEST, moved, time.time())
    assert problem is not None and "altered" in problem


def test_a_seal_binds_a_fractional_change_of_its_expiry() -> None:
    """The value verify_seal compares with the clock must be exactly the value that was signed.

    Expiry is whole seconds, all of them signed: a fractional expiry is not even a valid Seal.
    """
    sealed = seal(SIGNER, NODE_KEY, 7, DIGEST)
    assert isinstance(sealed.expires, int)
    with pytest.raises(pydantic.ValidationError):
        Seal(expires=sealed.expires + 0.4, signature=sealed.signature)  # type: ignore[arg-type]


def test_an_expired_seal_is_refused_with_a_reason() -> None:
    """A view kept offline for too long is no longer trusted, and the agent must say why."""
    public = SIGNER.verify_key.encode().hex()
    past = seal(SIGNER, NODE_KEY, 7, DIGEST, ttl=-60)
    assert verify_seal(public, NODE_KEY, 7, DIGEST, past, time.time()) == "the stored view has expired"
    current = seal(SIGNER, NODE_KEY, 7, DIGEST, ttl=100)
    assert verify_seal(public, NODE_KEY, 7, DIGEST, current, current.expires - 1) is None
    assert verify_seal(public, NODE_KEY, 7, DIGEST, current, current.expires + 1) == "the stored view has expired"


def test_a_seal_by_another_key_fails() -> None:
    """Only the server's key (learnt at enrollment) may vouch for a stored view."""
    other = SigningKey.generate()
    sealed = seal(other, NODE_KEY, 7, DIGEST)
    problem = verify_seal(SIGNER.verify_key.encode().hex(), NODE_KEY, 7, DIGEST, sealed, time.time())
    assert problem is not None and "altered" in problem
    assert verify_seal(other.verify_key.encode().hex(), NODE_KEY, 7, DIGEST, sealed, time.time()) is None


def test_a_garbled_signature_or_key_fails_without_raising() -> None:
    """A hand-edited file with non-hex text must be refused with a reason, not crash the agent."""
    sealed = seal(SIGNER, NODE_KEY, 7, DIGEST)
    public = SIGNER.verify_key.encode().hex()
    garbled = Seal(expires=sealed.expires, signature="zz" + sealed.signature[2:])
    assert verify_seal(public, NODE_KEY, 7, DIGEST, garbled, time.time()) is not None
    assert verify_seal("not hex", NODE_KEY, 7, DIGEST, sealed, time.time()) is not None


def test_a_receipt_waits_between_one_and_two_delays_and_longer_when_heartbeats_are_slower() -> None:
    """Spread over [D, 2D): D is RECEIPT_DELAY, or a quarter of the asked heartbeat interval when that is longer."""
    own = [receipt_delay(0.0) for _ in range(500)]
    assert all(RECEIPT_DELAY <= d < 2 * RECEIPT_DELAY for d in own)
    assert max(own) - min(own) > RECEIPT_DELAY / 2, "not spread: receipts of one change would come back together"
    slow = [receipt_delay(10.0) for _ in range(500)]
    assert all(2.5 <= d < 5.0 for d in slow)
