"""Key distribution: relays signed ephemeral public keys between nodes that are each other's peers.

Requests, in order of a key's travel:
  1. PublishKey (node): the caller is looked up by its CURVE key in the
     current datastore; the key must verify with that node's Ed25519 identity
     (``Node.sign_key``), be current, and not be older than what is held
     (store.py). Stored, it is pushed as PeerKeyUpdate to every peer that is
     online or has spoken to keydist within ``SEEN_WINDOW``.
  2. FetchPeerKeys (node): the held keys of the caller's peers.

Why "or has spoken": a node's presence is written in batches after its
snapshot, but the agent fetches every peer's keys right after that snapshot.
A key published between that fetch and the presence write was in neither the
fetch nor any push, and its owner began sealing with it ``lead`` seconds
later: the node dropped those packets (unknown SPI) until its next fetch.
keydist serves requests one at a time, so a key stored after a node's fetch
finds the node in ``_seen`` and is pushed to it. Agents republish every 30 s,
so a connected node stays seen; a gone one is pushed to for at most
``SEEN_WINDOW`` (the broker keeps those pushes in its bounded outbox).

Trust is the netmap's peer relation (World.view: nodes sharing a VPN, less
hub-spoke spokes and pairs no ACL rule connects), checked on every request
and push against the datastore at its newest revision: when two nodes stop
being peers, keydist stops relaying between them at once. Only public keys
and signatures are held, in memory (store.py says why that suffices).
"""

from __future__ import annotations

import logging
import math
import time

from bus import errors
from bus.errors import RemoteError
from bus.identity import Identity, Role
from bus.keys import KeyPair
from bus.messages.keys import FetchPeerKeys, KeyPublished, PeerKeys, PeerKeyUpdate, PublishKey
from bus.worker import Handler, Worker
from services.datastore.db import make_engine, migrate, reading
from services.datastore.netmap import World, latest
from services.keydist.store import KeyStore

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 5.0  # seconds between sweeps of expired keys
SEEN_WINDOW = 75.0  # a node that published or fetched this recently is pushed to (two republish intervals and a half)


class KeydistService(Worker):
    service = "keydist"
    allow = (Role.NODE, Role.OPERATOR, Role.SERVICE)

    def __init__(self, endpoint: str, keypair: KeyPair, server_key: bytes, *, database_url: str) -> None:
        super().__init__(endpoint, keypair, server_key)
        self.engine = make_engine(database_url)
        migrate(self.engine)
        self.store = KeyStore()
        self.world: World | None = None
        self.revision = -1  # the datastore revision self.world reflects
        self._ids: dict[str, int] = {}  # node name -> id, in self.world
        self._next_prune = 0.0
        self._seen: dict[int, float] = {}  # node id -> monotonic time of its last request here

    def handlers(self) -> dict[type, Handler]:
        return {**super().handlers(), PublishKey: self.on_publish, FetchPeerKeys: self.on_fetch}

    def tick(self, now: float) -> None:
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL
            self.counters["expired"] += self.store.prune(time.time())
            self._seen = {i: at for i, at in self._seen.items() if now - at < SEEN_WINDOW}

    # ------------------------------------------------------------------ requests
    def on_publish(self, request: PublishKey, caller: Identity) -> KeyPublished:
        world, node_id = self._caller(caller)
        node = world.nodes[node_id]
        key = request.as_peer_key(node.name)
        try:
            fresh = self.store.put(node_id, node.sign_key, key, time.time())
        except RemoteError as exc:
            self.counters[f"rejected_{exc.code}"] += 1
            raise
        if not fresh:
            self.counters["republished"] += 1
            return KeyPublished(epoch=key.epoch, relayed=0, fresh=False)
        self.counters["published"] += 1
        update = PeerKeyUpdate(key=key)
        relayed = 0
        seen_since = time.monotonic() - SEEN_WINDOW  # a peer that asked keydist anything since is connected
        for peer_id in self._peers(world, node_id):
            peer = world.nodes[peer_id]
            if peer.curve_key and (peer.online or self._seen.get(peer_id, -math.inf) > seen_since):
                self.push(peer.curve_key, update)
                relayed += 1
        self.counters["relayed"] += relayed
        log.info("node %s published epoch %d; pushed to %d peers", node.name, key.epoch, relayed)
        return KeyPublished(epoch=key.epoch, relayed=relayed, fresh=True)

    def on_fetch(self, request: FetchPeerKeys, caller: Identity) -> PeerKeys:
        world, node_id = self._caller(caller)
        wanted = None if request.peers is None else set(request.peers)
        now = time.time()
        keys = []
        for peer_id in self._peers(world, node_id):
            if wanted is None or world.nodes[peer_id].name in wanted:
                keys += self.store.keys_of(peer_id, now)
        self.counters["fetches"] += 1
        return PeerKeys(keys=keys)

    # ------------------------------------------------------------------ trust
    def _caller(self, caller: Identity) -> tuple[World, int]:
        if caller.role is not Role.NODE:
            raise RemoteError(errors.FORBIDDEN, "only nodes publish and fetch epoch keys")
        world = self._current_world()
        node_id = world.node_id(caller.key)
        if node_id is None:
            raise RemoteError(errors.FORBIDDEN, "this key belongs to no node")
        self._seen[node_id] = time.monotonic()
        return world, node_id

    def _peers(self, world: World, node_id: int) -> list[int]:
        """The nodes that see *node_id* in their netmap (the relation is symmetric)."""
        return [self._ids[name] for name in world.view(node_id).peers if name in self._ids]

    def _current_world(self) -> World:
        """The datastore at its newest revision: one cheap query when nothing changed."""
        with reading(self.engine) as session:
            world, head = latest(session, self.world, self.revision)
            if world is self.world:
                return world
            self.world = world
        self.revision = head
        self._ids = {n.name: i for i, n in self.world.nodes.items()}
        dropped = self.store.retain({i: n.sign_key for i, n in self.world.nodes.items()})
        self.counters["forgotten"] += dropped
        return self.world
