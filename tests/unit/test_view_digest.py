"""A view's digest is joined from its parts' cached JSON; it must equal the digest of the whole head dumped.

Agents keep views on disk with the server's seal over their digests, and old and new agents compare digests
with the same server: the bytes hashed must not change with how they are assembled.
"""

from __future__ import annotations

import hashlib
import json
import random

from bus.messages.sync import AclView, NodeView, PeerView, VpnView


def _dumped_head_digest(view: NodeView) -> str:
    """The digest as it was defined: the whole head dumped at once, sorted keys, compact separators."""
    head: dict[str, object] = {"node": view.node, "vpns": {k: v.model_dump(mode="json") for k, v in view.vpns.items()}}
    head["acl"] = [a.model_dump(mode="json") for a in view.acl]
    if view.tags:
        head["tags"] = list(view.tags)
    digest = hashlib.sha256(json.dumps(head, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(view.peers):
        digest.update(name.encode() + b"\x00" + view.peers[name].fingerprint)
    return digest.hexdigest()


def _random_view(rng: random.Random) -> NodeView:
    names = ["office", "lab", "z-vpn", "a", "ünï", 'quo"te', "back\\slash"]
    vpns = {}
    for name in rng.sample(names, rng.randint(0, 4)):
        vpns[name] = VpnView(
            name=name,
            subnet=f"10.{rng.randint(0, 255)}.0.0/16",
            addressing=rng.choice(["overlay", "native"]),
            topology=rng.choice(["mesh", "hub-spoke"]),
            cipher="aes-256-gcm",
            mtu=rng.randint(1280, 1420),
            keepalive=rng.randint(0, 60),
            vip=rng.choice(["", f"10.0.0.{rng.randint(1, 254)}"]),
            role=rng.choice(["member", "hub", "gateway"]),
            routes=[f"192.168.{i}.0/24" for i in range(rng.randint(0, 3))],
        )
    acl = [
        AclView(id=i, vpn=rng.choice(names), src="any", dst=rng.choice(["tag:web", "n1"]), proto="tcp", ports="443")
        for i in range(rng.randint(0, 3))
    ]
    peers = {
        f"peer{i}": PeerView(name=f"peer{i}", vips={"office": f"10.1.0.{i + 2}"}, roles={"office": "member"})
        for i in range(rng.randint(0, 3))
    }
    tags = rng.sample(["web", "db", "ops", "ü"], rng.randint(0, 2))
    return NodeView(node=rng.choice(["n1", "node-ü", "x"]), vpns=vpns, peers=peers, acl=acl, tags=tags)


def test_the_joined_digest_equals_the_dumped_one_over_random_views() -> None:
    rng = random.Random(8)
    for _ in range(400):
        view = _random_view(rng)
        assert view.digest() == _dumped_head_digest(view), view


def test_a_part_changes_the_digest_and_a_cached_part_does_not_go_stale() -> None:
    """Parts are immutable, so a cached canonical form cannot drift: changing a part means a new object."""
    rng = random.Random(3)
    view = _random_view(rng)
    while not view.vpns:
        view = _random_view(rng)
    before = view.digest()
    name, vpn = next(iter(view.vpns.items()))
    changed = view.model_copy(update={"vpns": {**view.vpns, name: vpn.model_copy(update={"mtu": vpn.mtu + 1})}})
    assert changed.digest() != before
    assert changed.digest() == _dumped_head_digest(changed)
    assert view.digest() == before


def test_a_copied_peer_entry_is_hashed_anew() -> None:
    """PeerView caches its fingerprint the same way; a changed copy must not inherit it."""
    peer = PeerView(name="p", vips={"office": "10.1.0.2"}, roles={"office": "member"})
    before = peer.fingerprint
    moved = peer.model_copy(update={"endpoints": ["192.0.2.1:4500"]})
    assert moved.fingerprint != before
    assert moved.fingerprint == PeerView(**moved.model_dump()).fingerprint
