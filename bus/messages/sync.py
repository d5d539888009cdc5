"""The node's view of the truth ("netmap") and the messages that keep it in sync.

Sync follows the ZeroMQ Guide's Clone pattern, per node: the agent asks the
fanout for a Snapshot at revision R, then applies each Update whose
``prev_revision`` equals the revision it holds. Per-node streams skip the
revisions that do not concern the node, so ``prev_revision`` (not R+1) is
what reveals a gap; a gap, or a digest that differs after applying, makes the
agent ask for a fresh snapshot. Heartbeats carry the agent's revision and
digest, so a node that missed the tail of its stream notices it too.

Every snapshot and update is signed by the server (Ed25519) over the node,
revision, digest and expiry (updates of one batch under one signature over a
hash tree, each with its path: ``Seal.proof``), so an agent can keep its
last view on disk and trust it after a restart while the server is unreachable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from bus.messages import Message, construct, register

Cap = Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,16}$")]  # one capability token, e.g. "gso"
# The data-plane capabilities an agent reports (SyncHeartbeat.caps) and its peers see (PeerView.caps):
CAP_GSO = "gso"  # its UDP socket segments and coalesces (UDP_SEGMENT, UDP_GRO) and its TUN has VNET_HDR offloads
CAP_CSUM = "csum"  # it takes inner TCP/UDP packets with partial checksums and completes them (NEEDS_CSUM writes)


# One encoder for every canonical JSON: json.dumps with arguments builds a new encoder per call, which for a name
# cost 1.8 µs against 0.24 µs for the encoding itself (a view's digest encodes a few such names per node and update).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def _canonical(value: object) -> bytes:
    return _CANONICAL(value).encode()


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy without the cached hashes and JSON of the original (``cached_property`` keeps them in
        ``__dict__``, which pydantic copies): with *update* they would describe the old values."""
        copied = super().model_copy(update=update, deep=deep)
        for cached in copied.__dict__.keys() - type(self).model_fields.keys():
            del copied.__dict__[cached]
        return copied


class VpnView(_Part):
    """One VPN as this node sees it: its settings and this node's place in it."""

    name: str
    subnet: str
    addressing: str
    topology: str
    cipher: str
    mtu: int
    keepalive: int
    vip: str  # this node's virtual IP in the VPN; native addressing: its real address ("" until reported)
    role: str
    routes: list[str] = Field(default_factory=list)  # subnets this node is the gateway for

    @cached_property
    def canonical(self) -> bytes:
        """This part's canonical JSON, cached: a view's digest embeds it, and successive views share the part."""
        return _canonical(self.model_dump(mode="json"))


class RouteView(_Part):
    vpn: str
    cidr: str


class PeerView(_Part):
    """Another node this node may talk to, with what it needs to reach it."""

    name: str
    # vpn -> virtual IP; native addressing: the peer's real address as this viewer reaches it (its public
    # mapping, or its local address on the same site), absent until known
    vips: dict[str, str]
    roles: dict[str, str]  # vpn -> role
    routes: list[RouteView] = Field(default_factory=list)  # subnets behind it (gateways)
    endpoints: list[str] = Field(default_factory=list)
    public_endpoint: str | None = None
    nat_class: str = "unknown"
    online: bool = False
    sign_key: str | None = None
    tags: list[str] = Field(default_factory=list)  # for ACL selectors `tag:TAG`, checked by the receiving agent
    path: str = ""  # the server's choice for this pair (services/datastore/paths.py); "" = not decided
    endpoint: str | None = None  # where this viewer sends to the peer ("host:port"), chosen by the server
    caps: list[str] = Field(default_factory=list)  # the peer's data-plane capabilities (paths.CAPS), as it reported

    @cached_property
    def fingerprint(self) -> bytes:
        """SHA-256 of this entry's canonical JSON; cached, as a view's digest hashes every peer.

        ``caps`` is left out when empty, so entries of peers that report none keep the digests they always had.
        """
        entry = self.model_dump(mode="json")
        if not entry["caps"]:
            del entry["caps"]
        return hashlib.sha256(_canonical(entry)).digest()


class AclView(_Part):
    id: int
    vpn: str
    src: str
    dst: str
    proto: str
    ports: str

    @cached_property
    def canonical(self) -> bytes:
        """This rule's canonical JSON, cached like ``VpnView.canonical``."""
        return _canonical(self.model_dump(mode="json"))


class NodeView(_Part):
    """A node's whole view: its VPNs, its peers and the ACL rules that concern it."""

    node: str
    vpns: dict[str, VpnView] = Field(default_factory=dict)
    peers: dict[str, PeerView] = Field(default_factory=dict)
    acl: list[AclView] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)  # this node's own tags, for ACL rules with `dst: tag:TAG`

    def digest(self) -> str:
        """SHA-256 over the canonical JSON of everything but the peers, then each peer's fingerprint.

        Equal views have equal digests everywhere; peers hash once per object, so the digest of a
        view that an update changed in one peer costs one peer's hashing, not the whole view's.
        """
        digest = hashlib.sha256(self._head())
        for name in sorted(self.peers):
            digest.update(name.encode() + b"\x00" + self.peers[name].fingerprint)
        return digest.hexdigest()

    def _head(self) -> bytes:
        """The canonical JSON of ``{"acl", "node", "tags", "vpns"}``, keys sorted, joined from the parts' cached
        JSON: byte for byte what dumping the whole head would give (tests/unit/test_view_digest.py), without
        dumping VPNs and rules that the previous view already held. Tags are absent when empty, so views
        without tags keep the digests they always had."""
        parts = [b'{"acl":[', b",".join([a.canonical for a in self.acl]), b'],"node":', _canonical(self.node)]
        if self.tags:
            parts += [b',"tags":', _canonical(list(self.tags))]
        vpns = self.vpns
        parts += [b',"vpns":{', b",".join([_canonical(k) + b":" + vpns[k].canonical for k in sorted(vpns)]), b"}}"]
        return b"".join(parts)


def _differs(old: _Part | None, new: _Part) -> bool:
    """``old != new``, answered by identity first: the fanout's successive views share unchanged parts, and
    pydantic's equality compares every field even of one object with itself."""
    return old is not new and old != new


class ViewDelta(_Part):
    """What changed in a view: entries set (new or changed), names removed, the ACL if changed."""

    node: str | None = None  # the node's new name, after a rename
    set_vpns: dict[str, VpnView] = Field(default_factory=dict)
    del_vpns: list[str] = Field(default_factory=list)
    set_peers: dict[str, PeerView] = Field(default_factory=dict)
    del_peers: list[str] = Field(default_factory=list)
    acl: list[AclView] | None = None
    tags: list[str] | None = None

    def is_empty(self) -> bool:
        return (
            self.node is None
            and not (self.set_vpns or self.del_vpns or self.set_peers or self.del_peers)
            and self.acl is None
            and self.tags is None
        )

    @classmethod
    def between(cls, old: NodeView, new: NodeView) -> ViewDelta:
        """Of two views already valid: so built without validating again (the fanout makes one per node)."""
        return construct(
            cls,
            node=new.node if new.node != old.node else None,
            set_vpns={k: v for k, v in new.vpns.items() if _differs(old.vpns.get(k), v)},
            del_vpns=sorted(set(old.vpns) - set(new.vpns)),
            set_peers={k: v for k, v in new.peers.items() if _differs(old.peers.get(k), v)},
            del_peers=sorted(set(old.peers) - set(new.peers)),
            acl=new.acl if new.acl != old.acl else None,
            tags=new.tags if new.tags != old.tags else None,
        )

    def apply(self, view: NodeView) -> NodeView:
        vpns = {k: v for k, v in view.vpns.items() if k not in self.del_vpns} | self.set_vpns
        peers = {k: v for k, v in view.peers.items() if k not in self.del_peers} | self.set_peers
        return NodeView(
            node=view.node if self.node is None else self.node,
            vpns=dict(sorted(vpns.items())),
            peers=dict(sorted(peers.items())),
            acl=view.acl if self.acl is None else self.acl,
            tags=view.tags if self.tags is None else self.tags,
        )


class Seal(_Part):
    """The server's signature over (node key, revision, digest, expiry), alone or as one of a batch.

    Without ``proof`` the signature is over ``seal_payload(...)`` itself. With it, the signature is over
    ``batch_payload(root)``, where the root is what the payload's leaf and the proof lead to
    (bus/sealtree.py): the fanout signs a change to thousands of nodes once.
    """

    expires: int  # Unix time (whole seconds, all of them signed) after which a stored view is not trusted
    signature: str  # hex Ed25519 signature of seal_payload(...), or of batch_payload(root) with a proof
    proof: list[str] | None = None  # hex sibling hashes from this view's leaf up to the signed root


def seal_payload(node_key: str, revision: int, digest: str, expires: int) -> bytes:
    return f"coterie-view/1|{node_key}|{revision}|{digest}|{expires}".encode()


def batch_payload(root: bytes) -> bytes:
    """What a batch seal signs: the root of the tree over its views' seal payloads."""
    return b"coterie-views/1|" + root.hex().encode()


@register
class SnapshotRequest(Message):
    """Node -> fanout: my whole view, please. Reply: Snapshot.

    ``node`` may name the caller only; naming another node is refused
    (``forbidden``) and logged: a node never receives another node's view.
    """

    KIND = "sync.snapshot_request"
    node: str | None = None


@register
class Snapshot(Message):
    """Fanout -> node: the node's view at ``revision``."""

    KIND = "sync.snapshot"
    revision: int
    view: NodeView
    digest: str
    seal: Seal


@register
class Update(Message):
    """Fanout -> node (push): the delta from ``prev_revision`` to ``revision`` of this node's view."""

    KIND = "sync.update"
    revision: int
    prev_revision: int
    delta: ViewDelta
    digest: str  # of the view after applying the delta
    seal: Seal


@register
class SyncHeartbeat(Message):
    """Node -> fanout, every few seconds: I am alive, and this is the view I hold.

    It doubles as the receipt: ``revision`` is the newest revision applied.
    Reply: SyncStatus. ``endpoints`` are the node's local addresses, for NAT
    knowledge in a later issue.
    """

    KIND = "sync.heartbeat"
    revision: int
    digest: str
    agent_version: str = ""
    endpoints: list[str] = Field(default_factory=list)
    mapped: str = ""  # "ip:port" the server's UDP reflector saw (nodeagent/natprobe.py)
    filtering: str = ""  # open | restricted | blocked: what got through from the reflector
    mapping: str = ""  # independent | dependent: whether the reflector's second port saw the same mapping
    # What the running data plane can do (services/datastore/paths.py CAPS: "gso", "csum"); old agents send none.
    caps: list[Cap] = Field(default_factory=list, max_length=16)


@register
class Applied(Message):
    """Node -> fanout: I applied ``revision`` (the receipt). Reply: SyncStatus."""

    KIND = "sync.applied"
    revision: int
    digest: str


@register
class Committed(Message):
    """Datastore -> fanout (a notification): changes up to ``revision`` are committed; fan them out now.

    Only a shortcut: the fanout polls the head revision every 20 ms anyway, so a lost or late one costs at
    most that wait (half of it on average, every change's). Reply: CommittedSeen. Services only.
    """

    KIND = "sync.committed"
    revision: int = Field(ge=0)


@register
class CommittedSeen(Message):
    """Fanout -> datastore: the revision up to which the fanout has now fanned changes out."""

    KIND = "sync.committed_seen"
    processed: int


@register
class SyncStatus(Message):
    """Fanout -> node: whether the view it holds is current; if not, it asks for a snapshot."""

    KIND = "sync.status"
    in_sync: bool
    revision: int
    reflector: str = ""  # "host:port" of the server's UDP reflector, for NAT discovery
    relay: str = ""  # "host:port" of the server's TCP/443 relay (services/relay), for peers on path `relay`
    # Seconds the fanout asks between heartbeats, so that all its nodes together send it a bounded number a
    # second (a node beats at this or its own interval, whichever is longer); 0: the node's own interval.
    heartbeat: float = 0.0
