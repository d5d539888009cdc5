"""End-to-end ESP keys: epoch keys, pair derivation, and the make-before-break schedule.

Pure and clock-injected: every method that depends on time takes ``now``, in
wall-clock Unix seconds (``time.time()``), because ``not_before`` and
``expires`` are compared on different machines. No threads, no I/O: the
agent's loop sends to keydist what :class:`KeyRing` hands it and feeds back
what comes in. The parts, in the order a key travels:

1. epoch keys (``EpochKeys``) -- on every start and then every
   ``rekey_interval`` (or early, when an SA nears its packet limit) a new
   X25519 key, signed with the node's Ed25519 identity key, published
   ``lead`` seconds before it becomes usable. A restarted agent never reuses
   an SA counter (RELIABILITY D5): its keys, and so every SA, are new.
2. relay -- keydist checks the signature and passes the public key to the
   node's peers only; each peer checks the signature again against the
   ``sign_key`` in its netmap (``PeerKeyState.learn``).
3. derivation (``derive_pair``) -- X25519 of my key and the peer's, then
   HKDF-SHA256 (RFC 5869) over the shared secret, bound to both names, both
   epochs and both public keys, gives each direction its AES-256-GCM key,
   4-byte salt (RFC 4106 section 8.1) and SPI. Both ends compute the same
   without talking.
4. schedule (``PeerKeyState``) -- which OutboundSA to seal with now, and which
   InboundSAs to keep. Make-before-break: a node sends with its new key only
   ``lead`` seconds after keydist accepted it (peers install the inbound SA
   first, when the key reaches them); a receiver keeps an old SA for
   ``grace`` seconds after its successor appeared. So with relay delays below
   ``lead`` and clock skew plus delay below ``grace``, every packet a sender
   seals has its inbound SA installed at the receiver.

SPI collisions: SPIs are 32-bit hashes (never 0..255), so two SAs arriving
at one node can, rarely, share one. The SA already installed keeps the SPI;
the newcomer is not installed (counted ``spi_collision``) and, if it uses
this node's newest key, the node starts an early epoch, which gives every
pair on it new SPIs; the colliding pair is unusable until then (at most a
few seconds: ``lead`` plus one publication).
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.signing import SigningKey

from bus.errors import BusError, RemoteError
from bus.messages import Message
from bus.messages.keys import (
    FetchPeerKeys,
    KeyPublished,
    PeerKey,
    PeerKeys,
    PeerKeyUpdate,
    PublishKey,
    publication_payload,
)
from nodeagent.constants import GCM_KEY_SIZE, GCM_SALT_SIZE, REKEY_AFTER_PACKETS, SEQ_LOW_MASK, SPI_SIZE
from nodeagent.esp import InboundSA, OutboundSA, SpiTable

# Tuning numbers (Coterie's choices).
REKEY_INTERVAL = 120.0  # seconds between epochs (the default: 2 minutes)
REKEY_LEAD = 5.0  # a key is published this long before it is used to send
REKEY_GRACE = 30.0  # an old inbound SA stays this long after its successor appeared
KEY_LIFETIME = 3600.0  # a key cut off from keydist (no successor published) is usable this long
REPUBLISH_INTERVAL = 30.0  # every live key is republished this often (a restarted keydist refills)
PUBLISH_RETRY = 1.0  # an unaccepted publication is retried this soon
FETCH_BACKOFF_MIN = 5.0  # a peer without a usable key is asked for again after this, doubling ...
FETCH_BACKOFF_MAX = 120.0  # ... up to this
MAX_PEER_EPOCHS = 4  # keys kept per peer (keydist relays two; a hostile relay cannot grow this)
MIN_SPI = 256  # RFC 4303 2.1: 1..255 are reserved by IANA, 0 for local use

_PAIR_CONTEXT = b"coterie/esp-pair/v1\x00"
_SA_SIZE = GCM_KEY_SIZE + GCM_SALT_SIZE + SPI_SIZE
_SIDE = struct.Struct("!Q32s")


# ---------------------------------------------------------------------------- 3. derivation
@dataclass(frozen=True, slots=True)
class SaKeys:
    """The material of one directional SA."""

    spi: int
    key: bytes
    salt: bytes


@dataclass(frozen=True, slots=True)
class PairKeys:
    """Both directions of a pair, from one node's side: it seals with ``outbound``, opens with ``inbound``."""

    outbound: SaKeys
    inbound: SaKeys


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def spi_from(raw: bytes) -> int:
    """Map 4 random bytes onto MIN_SPI..2**32-1 (never a reserved SPI)."""
    return MIN_SPI + int.from_bytes(raw, "big") % (SEQ_LOW_MASK + 1 - MIN_SPI)


def _side(name: str, epoch: int, public: bytes) -> bytes:
    encoded = name.encode()
    return struct.pack("!H", len(encoded)) + encoded + _SIDE.pack(epoch, public)


def derive_pair(
    my_name: str, my_private: X25519PrivateKey, my_epoch: int, peer_name: str, peer_public: bytes, peer_epoch: int
) -> PairKeys:
    """Directional SA keys for (me, peer); the peer, calling with its side, gets them mirrored.

    The two sides are ordered by node name (unique in the datastore), the lower
    first; HKDF's output gives lower -> higher its 40 bytes first (key, salt,
    SPI), then higher -> lower. Raises ValueError for equal names or a peer key
    that yields the all-zero secret (a low-order point, RFC 7748 section 6.1).
    """
    if my_name == peer_name:
        raise ValueError("a node has no pair with itself")
    shared = my_private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    mine = _side(my_name, my_epoch, public_bytes(my_private))
    theirs = _side(peer_name, peer_epoch, peer_public)
    i_am_lower = my_name < peer_name
    info = _PAIR_CONTEXT + (mine + theirs if i_am_lower else theirs + mine)
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * _SA_SIZE, salt=None, info=info).derive(shared)
    lower_to_higher, higher_to_lower = _sa_keys(okm[:_SA_SIZE]), _sa_keys(okm[_SA_SIZE:])
    if i_am_lower:
        return PairKeys(outbound=lower_to_higher, inbound=higher_to_lower)
    return PairKeys(outbound=higher_to_lower, inbound=lower_to_higher)


def _sa_keys(block: bytes) -> SaKeys:
    key, salt = block[:GCM_KEY_SIZE], block[GCM_KEY_SIZE : GCM_KEY_SIZE + GCM_SALT_SIZE]
    return SaKeys(spi=spi_from(block[GCM_KEY_SIZE + GCM_SALT_SIZE :]), key=key, salt=salt)


# ---------------------------------------------------------------------------- 1. epoch keys
@dataclass
class EpochKey:
    """One of this node's own epoch keys, with what keydist said about it."""

    epoch: int
    private: X25519PrivateKey
    public: bytes
    not_before: int
    expires: int
    signature: bytes
    accepted_at: float | None = None  # local time keydist first accepted it
    published_at: float = float("-inf")  # local time of the last attempt

    def ready_at(self, lead: float) -> float:
        """When this node may start sealing with it: peers have had ``lead`` seconds to install it."""
        if self.accepted_at is None:
            return math.inf
        return max(self.not_before, self.accepted_at + lead)

    def publication(self) -> PublishKey:
        return PublishKey(
            epoch=self.epoch,
            public_key=self.public,
            not_before=self.not_before,
            expires=self.expires,
            signature=self.signature,
        )


@dataclass(frozen=True)
class Timing:
    """The schedule's numbers; make-before-break needs relay delay < lead < grace < rekey_interval."""

    rekey_interval: float = REKEY_INTERVAL
    lead: float = REKEY_LEAD
    grace: float = REKEY_GRACE
    lifetime: float = KEY_LIFETIME

    def __post_init__(self) -> None:
        if not 0 < self.lead < self.grace < self.rekey_interval <= self.lifetime:
            raise ValueError("need 0 < lead < grace < rekey_interval <= lifetime")


class EpochKeys:
    """This node's own keys: made fresh at start, rotated on schedule or on request, retired after grace."""

    def __init__(self, node: str, identity: SigningKey, now: float, timing: Timing | None = None) -> None:
        self.node = node
        self.identity = identity
        self.timing = timing or Timing()
        self.keys: dict[int, EpochKey] = {}  # epoch -> key, in epoch order
        self.rekey_requested = False
        self.new_epoch(now)  # D5: never an SA (so never a counter) from a previous run

    @property
    def newest(self) -> EpochKey:
        return self.keys[max(self.keys)]

    def new_epoch(self, now: float) -> EpochKey:
        """Make and sign a key usable from ``now + lead``; epochs are milliseconds, rising across restarts."""
        epoch = max(int(now * 1000), max(self.keys, default=-1) + 1)
        private = X25519PrivateKey.generate()
        public = public_bytes(private)
        not_before = math.ceil(now + self.timing.lead)
        expires = math.ceil(not_before + self.timing.lifetime)
        payload = publication_payload(self.node, epoch, public, not_before, expires)
        signature = self.identity.sign(payload).signature
        key = EpochKey(epoch, private, public, not_before, expires, signature)
        self.keys[epoch] = key
        self.rekey_requested = False
        return key

    def due(self, now: float) -> bool:
        """A new epoch is due: on schedule, on request, or the pending one expired unaccepted."""
        newest = self.newest
        if newest.accepted_at is None:
            return now >= newest.expires
        scheduled = now >= newest.not_before + self.timing.rekey_interval - self.timing.lead
        return scheduled or self.rekey_requested

    def sending_key(self, now: float) -> EpochKey | None:
        """The newest key peers have had time to install (so the one to seal with), if any."""
        for epoch in sorted(self.keys, reverse=True):
            key = self.keys[epoch]
            if key.ready_at(self.timing.lead) <= now < key.expires:
                return key
        return None

    def retire_at(self, epoch: int) -> float:
        """When no peer can still be sealing to this key: its accepted successor plus grace, or expiry."""
        key = self.keys[epoch]
        for later in sorted(e for e in self.keys if e > epoch):
            successor = self.keys[later]
            if successor.accepted_at is not None:
                return min(key.expires, max(successor.not_before, successor.accepted_at) + self.timing.grace)
        return key.expires

    def live(self, now: float) -> list[EpochKey]:
        """Keys to receive with (and republish), oldest first; retired keys are forgotten here."""
        for epoch in [e for e in self.keys if e != max(self.keys) and now >= self.retire_at(e)]:
            del self.keys[epoch]
        return [self.keys[e] for e in sorted(self.keys) if now < self.retire_at(e)]


# ---------------------------------------------------------------------------- 4. one peer
@dataclass
class LearnedKey:
    key: PeerKey
    learned_at: float  # local time it reached this node


@dataclass
class PeerKeyState:
    """One peer: its keys and the SAs of the pair, chosen by time (module docstring, part 4)."""

    me: str
    name: str
    sign_key: str | None
    timing: Timing = field(default_factory=Timing)
    packet_limit: int | None = None  # the OutboundSA hard limit (None: the specification's)
    keys: dict[int, LearnedKey] = field(default_factory=dict)
    outbound_sa: OutboundSA | None = None
    outbound_pair: tuple[int, int] | None = None  # (my epoch, peer epoch) of outbound_sa
    inbound: dict[tuple[int, int], InboundSA] = field(default_factory=dict)
    # (direction, my epoch, peer epoch) of every SA ever made for this peer name, kept by the KeyRing
    # across a removal and re-adding of the peer: an SA is never made twice, so no counter (GCM nonce)
    # and no replay window restarts for the same key.
    made: set[tuple[str, int, int]] = field(default_factory=set)

    def learn(self, key: PeerKey, now: float) -> str | None:
        """Take a relayed key; None if kept, else why not (never trusts keydist: checks the signature)."""
        if key.node != self.name:
            return "wrong_node"
        if not key.verify(self.sign_key):
            return "bad_signature"
        if key.expires <= now:
            return "expired"
        known = self.keys.get(key.epoch)
        if known is not None:
            return None if known.key == key else "conflict"
        if self.keys and len(self.keys) >= MAX_PEER_EPOCHS and key.epoch < min(self.keys):
            return "stale_epoch"
        self.keys[key.epoch] = LearnedKey(key, now)
        for old in sorted(self.keys)[:-MAX_PEER_EPOCHS]:
            del self.keys[old]
        return None

    def retire_at(self, epoch: int) -> float:
        """When the peer can no longer be sealing with this key: its successor reached us, plus grace."""
        learned = self.keys[epoch]
        later = [e for e in self.keys if e > epoch]
        if not later:
            return learned.key.expires
        successor = self.keys[min(later)]
        since = max(successor.key.not_before, successor.learned_at)
        return min(learned.key.expires, since + self.timing.grace)

    def live(self, now: float) -> list[LearnedKey]:
        for epoch in [e for e in self.keys if now >= self.retire_at(e)]:
            del self.keys[epoch]
        return [self.keys[e] for e in sorted(self.keys)]

    def sending_to(self, now: float) -> LearnedKey | None:
        """The peer's newest key that has started (its not_before passed) and not expired."""
        started = [k for k in self.live(now) if k.key.not_before <= now < k.key.expires]
        return started[-1] if started else None

    def outbound(self, own: EpochKeys, now: float) -> OutboundSA | None:
        """The SA to seal with now, made once per (my epoch, peer epoch) and never remade."""
        mine, theirs = own.sending_key(now), self.sending_to(now)
        if mine is None or theirs is None:
            return None
        pair = (mine.epoch, theirs.key.epoch)
        if pair == self.outbound_pair:
            return self.outbound_sa
        if ("out", *pair) in self.made:  # made before (the peer was removed and re-added): never again
            return None
        keys = derive_pair(self.me, mine.private, mine.epoch, self.name, theirs.key.public_key, theirs.key.epoch)
        self.made.add(("out", *pair))
        self.outbound_pair = pair
        self.outbound_sa = OutboundSA(keys.outbound.spi, keys.outbound.key, keys.outbound.salt, limit=self.packet_limit)
        return self.outbound_sa

    def wanted_inbound(self, own: list[EpochKey], now: float) -> dict[tuple[int, int], InboundSA]:
        """Every SA the peer may be sealing to us with: each live key of mine with each live key of its."""
        wanted: dict[tuple[int, int], InboundSA] = {}
        for theirs in self.live(now):
            for mine in own:
                pair = (mine.epoch, theirs.key.epoch)
                sa = self.inbound.get(pair)
                if sa is None:
                    if ("in", *pair) in self.made:
                        continue  # its replay window is gone with the old SA: a new one would accept replays
                    self.made.add(("in", *pair))
                    k = derive_pair(self.me, mine.private, mine.epoch, self.name, theirs.key.public_key, pair[1])
                    sa = InboundSA(k.inbound.spi, k.inbound.key, k.inbound.salt)
                wanted[pair] = sa
        return wanted

    def needs_fetch(self, now: float) -> bool:
        """No key to send with, or the newest is so old that the peer must have published another."""
        newest = max(self.keys.values(), key=lambda k: k.key.epoch, default=None)
        if newest is None:
            return True
        overdue = newest.key.not_before + self.timing.rekey_interval + self.timing.grace
        return now >= overdue or (self.sending_to(now) is None and newest.key.not_before <= now)


# ---------------------------------------------------------------------------- the agent's one object
@dataclass
class _Fetch:
    next_at: float = 0.0
    backoff: float = FETCH_BACKOFF_MIN


class KeyRing:
    """All of a node's end-to-end keys: its own epochs, every peer's, and the inbound SPI table.

    The agent makes one at start (new keys: a restart never reuses an SA)
    and calls: ``set_peers`` on every view change; ``on_connect`` after each
    snapshot; ``tick`` about every 0.5 s (send each message it returns to
    keydist, hand the answer or the BusError to ``on_reply``); ``on_push``
    for keydist's pushes; ``outbound(peer)`` per packet batch and
    ``peers[peer].inbound`` for the SAs to open with (or ``spi_table`` and
    ``peer_of``); ``rekey(peer)`` when an OutboundSA raised RekeyRequired.
    All times are ``time.time()``.
    """

    def __init__(
        self,
        node: str,
        identity: SigningKey,
        now: float,
        *,
        timing: Timing | None = None,
        rekey_after_packets: int = REKEY_AFTER_PACKETS,
        packet_limit: int | None = None,
        spi_table: SpiTable | None = None,
    ) -> None:
        self.node = node
        self.timing = timing or Timing()
        self.own = EpochKeys(node, identity, now, self.timing)
        self.rekey_after_packets = rekey_after_packets
        self.packet_limit = packet_limit
        self.spi_table = spi_table if spi_table is not None else SpiTable()
        self.peers: dict[str, PeerKeyState] = {}
        self.counters: Counter[str] = Counter()
        self._installed: dict[int, tuple[str, tuple[int, int]]] = {}  # SPI -> (peer, pair)
        self._fetch: dict[str, _Fetch] = {}
        self._collided: set[tuple[str, tuple[int, int]]] = set()
        self._made: dict[str, set[tuple[str, int, int]]] = {}  # peer -> PeerKeyState.made, outliving the state
        self._fetch_all_at: float | None = now
        self._next_republish = now

    # -------------------------------------------------------------- inputs
    def set_peers(self, sign_keys: dict[str, str | None], now: float) -> list[str]:
        """The netmap's peers (name -> Ed25519 sign_key); returns the names dropped, whose SAs are gone now."""
        dropped = [n for n, s in self.peers.items() if n not in sign_keys or sign_keys[n] != s.sign_key]
        for name in dropped:
            del self.peers[name]
            self._fetch.pop(name, None)
        for name, sign_key in sign_keys.items():
            if name not in self.peers and name != self.node:
                made = self._made.setdefault(name, set())
                if made:  # a peer back after a removal: its old pairs are spent, so make new ones soon
                    self._request_rekey(self.own.newest.epoch, "rekey_peer_back")
                self.peers[name] = PeerKeyState(self.node, name, sign_key, self.timing, self.packet_limit, made=made)
        self.sync(now)
        return [n for n in dropped if n not in sign_keys]

    def on_connect(self, now: float) -> None:
        """After a (re)connection: republish every live key and fetch every peer's at the next tick."""
        self._fetch_all_at = now
        self._next_republish = now

    def on_push(self, message: Message, now: float) -> bool:
        """A keydist push; True if it was a key this ring took."""
        if not isinstance(message, PeerKeyUpdate):
            return False
        return self._learn(message.key, now)

    def on_reply(self, request: Message, reply: Message | BusError, now: float) -> None:
        """The answer to a message ``tick`` returned (or the error the request raised)."""
        if isinstance(request, PublishKey):
            self._on_published(request, reply, now)
        elif isinstance(request, FetchPeerKeys):
            if isinstance(reply, PeerKeys):
                for key in reply.keys:
                    self._learn(key, now, sync=False)  # one sync below for the whole batch
            elif request.peers is None:
                self._fetch_all_at = now + FETCH_BACKOFF_MIN
        self.sync(now)

    def rekey(self, peer: str) -> None:
        """The OutboundSA for *peer* raised RekeyRequired: start an early epoch at the next tick."""
        state = self.peers.get(peer)
        if state is not None and state.outbound_pair is not None:
            self._request_rekey(state.outbound_pair[0], "rekey_limit")

    def _request_rekey(self, using_epoch: int, reason: str) -> None:
        """Ask for an early epoch unless a newer key than the one in use is already on its way."""
        if using_epoch == self.own.newest.epoch and not self.own.rekey_requested:
            self.own.rekey_requested = True
            self.counters[reason] += 1

    # -------------------------------------------------------------- periodic work
    def tick(self, now: float) -> list[Message]:
        """Rotate, retire, install; return what to send to keydist now (publications first)."""
        for state in self.peers.values():
            sa = state.outbound_sa
            if sa is not None and state.outbound_pair and sa.next_seq > min(self.rekey_after_packets, sa.limit):
                self._request_rekey(state.outbound_pair[0], "rekey_packets")
        if self.own.due(now):
            self.own.new_epoch(now)
            self.counters["epochs"] += 1
        self.sync(now)
        return self._publications(now) + self._fetches(now)

    def _publications(self, now: float) -> list[Message]:
        republish = now >= self._next_republish
        if republish:
            self._next_republish = now + REPUBLISH_INTERVAL
        out: list[Message] = []
        for key in self.own.live(now):
            pending = key.accepted_at is None and now - key.published_at >= PUBLISH_RETRY
            if (republish or pending) and now < key.expires:
                key.published_at = now
                out.append(key.publication())
        return out

    def _fetches(self, now: float) -> list[Message]:
        if self._fetch_all_at is not None and now >= self._fetch_all_at:
            self._fetch_all_at = None
            for name in self.peers:
                self._fetch[name] = _Fetch(now + FETCH_BACKOFF_MIN)
            return [FetchPeerKeys()] if self.peers else []
        names = []
        for name, state in self.peers.items():
            plan = self._fetch.setdefault(name, _Fetch(now))
            if now >= plan.next_at and state.needs_fetch(now):
                names.append(name)
                plan.next_at, plan.backoff = now + plan.backoff, min(plan.backoff * 2, FETCH_BACKOFF_MAX)
        return [FetchPeerKeys(peers=sorted(names))] if names else []

    # -------------------------------------------------------------- outputs
    def outbound(self, peer: str, now: float) -> OutboundSA | None:
        """The SA to seal packets for *peer* with now; None while keys are not ready (queue them)."""
        state = self.peers.get(peer)
        return None if state is None else state.outbound(self.own, now)

    def peer_of(self, spi: int) -> str | None:
        """The peer an inbound SPI belongs to (after ``spi_table.open`` authenticated the packet)."""
        found = self._installed.get(spi)
        return found[0] if found else None

    def status(self, now: float) -> dict[str, dict[str, object]]:
        """Per peer: the epochs in use and the age of the pair, for ``agent status``."""
        rows: dict[str, dict[str, object]] = {}
        for name, state in self.peers.items():
            theirs = state.sending_to(now)
            rows[name] = {
                "my_epoch": state.outbound_pair[0] if state.outbound_pair else None,
                "peer_epoch": theirs.key.epoch if theirs else None,
                "key_age": round(now - theirs.key.not_before, 1) if theirs else None,
                "inbound_sas": len(state.inbound),
                "sent": (state.outbound_sa.next_seq - 1) if state.outbound_sa else 0,
            }
        return rows

    # -------------------------------------------------------------- inbound SAs
    def sync(self, now: float) -> None:
        """Make the SPI table hold exactly the inbound SAs each peer may be using now."""
        own = self.own.live(now)
        for made in self._made.values():  # my epochs never recur: pairs of retired ones need no memory
            made -= {m for m in made if m[1] not in self.own.keys}
        for state in self.peers.values():
            state.inbound = state.wanted_inbound(own, now)
        for spi, (name, pair) in list(self._installed.items()):
            state = self.peers.get(name)
            if state is None or pair not in state.inbound:
                self.spi_table.remove(spi)
                del self._installed[spi]
        for name, state in self.peers.items():
            for pair, sa in list(state.inbound.items()):
                self._install(name, pair, sa, state)

    def _install(self, name: str, pair: tuple[int, int], sa: InboundSA, state: PeerKeyState) -> None:
        if self._installed.get(sa.spi) == (name, pair):
            return
        if sa.spi in self._installed or sa.spi in self.spi_table:
            del state.inbound[pair]
            if (name, pair) not in self._collided:
                self._collided.add((name, pair))
                self.counters["spi_collision"] += 1
                self._request_rekey(pair[0], "rekey_spi_collision")
            return
        self.spi_table.add(sa)
        self._installed[sa.spi] = (name, pair)

    # -------------------------------------------------------------- helpers
    def _learn(self, key: PeerKey, now: float, *, sync: bool = True) -> bool:
        state = self.peers.get(key.node)
        if state is None:
            self.counters["key_not_a_peer"] += 1
            return False
        problem = state.learn(key, now)
        if problem is not None:
            self.counters[f"key_{problem}"] += 1
            return False
        self._fetch[key.node] = _Fetch(now + FETCH_BACKOFF_MIN)
        if sync:
            self.sync(now)
        return True

    def _on_published(self, request: PublishKey, reply: Message | BusError, now: float) -> None:
        key = self.own.keys.get(request.epoch)
        if key is None:
            return
        if isinstance(reply, KeyPublished):
            if key.accepted_at is None:
                key.accepted_at = now
            return
        code = reply.code if isinstance(reply, RemoteError) else "unreachable"
        self.counters[f"publish_{code}"] += 1
