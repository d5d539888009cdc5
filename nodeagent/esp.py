"""ESP in tunnel mode with AES-256-GCM: sealing inner IP packets, opening them.

Implements RFC 4303 section 2 (packet format: SPI 2.1, Sequence Number 2.2,
Payload Data 2.3, Padding 2.4, Pad Length 2.5, Next Header 2.6, dummy packets
2.6), 3.3.3 (sequence number generation), 3.4.3 and appendix A2 (verification
and extended sequence numbers, via replay.py), with AES-GCM as RFC 4106
defines it for ESP: section 3.1 (the 8-byte explicit IV), 4 (nonce =
salt || IV), 5 (AAD), 6 (16-byte ICV) and 8.1 (32-byte key plus 4-byte salt).

The packet, after whatever outer headers carry it (not this module's)::

    SPI (4) | seq low 32 (4) | IV (8) | ciphertext | ICV (16)
    plaintext = inner IP packet | padding 1, 2, 3, ... | pad length | next header

Outbound stages (inside -> outside), ``OutboundSA.seal``:

1. classify -- next header 4 or 41 from the inner packet's IP version.
2. number   -- take the next 64-bit sequence number; past the hard limit raise
               ``RekeyRequired`` instead (the counter never wraps).
3. trailer  -- padding 1, 2, 3, ... so payload and trailer end on a 4-byte
               boundary, then pad length and next header.
4. seal     -- AES-GCM with nonce = salt || IV, IV = the 64-bit sequence number
               (so no (key, IV) pair repeats), AAD = SPI || seq low, or
               SPI || seq high || seq low with ESN.
5. frame    -- SPI | seq low | IV | ciphertext | ICV.

Inbound stages (outside -> inside), ``SpiTable.open`` and ``InboundSA.open``
(which is ``authenticate``, stages 1-5, then ``commit``, stages 6-7, so that a
batch can decrypt many packets before it records any):

1. parse        -- long enough to be ESP at all                  TRUNCATED
2. lookup       -- the SA for the SPI                            UNKNOWN_SPI
3. replay check -- infer the ESN high half, check the window     REPLAY_*
4. decrypt      -- AES-GCM with the wire IV, the inferred AAD    AUTH_FAILED
5. trailer      -- padding 1, 2, 3, ..., pad length fits, next   BAD_PADDING,
                   header 4/41/59, inner length field matches     BAD_NEXT_HEADER,
                                                                  BAD_INNER_LENGTH
6. accept       -- record the number in the window (a copy of    REPLAY_*
                   the packet in the same batch may have won)
7. deliver      -- next header 59 is a dummy packet: dropped      DUMMY

Stages 1-5 change nothing, so neither forged nor malformed input can move the
window; only an authenticated, well-formed packet is recorded (stage 6). Drops
are values of ``DropReason``, counted by the caller. ``open`` never raises;
``parse_header`` and ``seal`` raise only ``EspParseError`` (and ``seal``
``RekeyRequired``). ``open_many`` and ``seal_many`` do the same over a run of
packets of one SA, for callers that handle a GRO read or a super-packet at once.

Cost: AES-GCM itself is C; what this module adds per packet is interpreter
time, so the hot path reads the header with one ``unpack_from``, keeps one
AESGCM object per SA, checks the trailer on the decrypted bytes without
slicing them, returns enum members and results from module constants and
NamedTuples, and takes the in-order replay check without a call
(bench/esp_micro.py measures each stage beside the AES-GCM floor).
``open_many`` goes further for the packets of a GRO read that carry the next
number in order: no window check, nonce and AAD packed in place at once, the
IPv4 trailer compared whole, and the stretch recorded with one
``ReplayWindow.accept_range``; every other packet takes ``open``'s path.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nodeagent.constants import (
    ESP_HEADER_SIZE,
    ESP_MIN_PACKET_SIZE,
    GCM_IV_SIZE,
    GCM_KEY_SIZE,
    GCM_SALT_SIZE,
    IPV4_MIN_HEADER_SIZE,
    IPV6_HEADER_SIZE,
    MAX_PAD_LENGTH,
    NEXT_HEADER_IPV4,
    NEXT_HEADER_IPV6,
    NEXT_HEADER_NONE,
    PAYLOAD_ALIGNMENT,
    REKEY_AFTER_PACKETS,
    REPLAY_WINDOW_DEFAULT,
    SEQ_FIRST,
    SEQ_LOW_BITS,
    SEQ_LOW_MASK,
    SEQ_MAX_32,
    SEQ_MAX_ESN,
    TRAILER_FIXED_SIZE,
)
from nodeagent.replay import BEYOND_LIMIT, DUPLICATE, OK, TOO_OLD, ReplayWindow

Buffer = bytes | bytearray | memoryview

_HEADER = struct.Struct("!IIQ")  # SPI, seq low, IV (which is the 64-bit sequence number)
_SPI_SEQ = struct.Struct("!II")  # the ESP header; also the AAD of a 32-bit SA (RFC 4106 section 5)
_AAD_ESN = struct.Struct("!III")  # SPI, seq high, seq low: the AAD of an ESN SA (RFC 4106 section 5)
_IV = struct.Struct("!Q")  # the explicit IV, written into the inbound SA's nonce buffer after the salt
_IV_AAD_ESN = struct.Struct("!QIII")  # IV, then the ESN AAD: open_many's one pack of nonce and AAD
_IV_AAD = struct.Struct("!QII")  # IV, then the AAD of a 32-bit SA
_NONCE = struct.Struct("!IQ")  # salt (as an int) || IV: a fresh nonce per sealed packet
_LENGTH_FIELD = struct.Struct("!H")
_IPV4_START = struct.Struct("!BxH")  # version/IHL and total length: (0x45, length) is the usual IPv4 packet
_IPV4_PLAIN = 0x45  # version 4, a 20-byte header: what open_many checks inline (others go to read_trailer)
_IPV4_LENGTH_AT = 2  # total length, header included
_IPV6_LENGTH_AT = 4  # payload length, the 40-byte header not included
_CIPHERTEXT_START = ESP_HEADER_SIZE + GCM_IV_SIZE
_PADDING = bytes(range(1, MAX_PAD_LENGTH + 1))  # RFC 4303 2.4: the default padding is 1, 2, 3, ...
_PADDINGS = tuple(_PADDING[:length] for length in range(MAX_PAD_LENGTH + 1))  # by pad length
_MIN_SPI = 256  # RFC 4303 2.1: 1-255 are reserved by IANA, 0 for local use
_new_tuple = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (about 150 ns less)
_FRAME_MARKED = struct.Struct("!IIIQ")  # a 4-byte prefix word (the UDP masquerade marker), then the ESP header


class DropReason(enum.Enum):
    """Why an inbound ESP packet was not delivered (one counter each, kept by the caller)."""

    TRUNCATED = "truncated"
    UNKNOWN_SPI = "unknown_spi"
    REPLAY_TOO_OLD = "replay_too_old"
    REPLAY_DUPLICATE = "replay_duplicate"
    REPLAY_BEYOND_LIMIT = "replay_beyond_limit"
    AUTH_FAILED = "auth_failed"
    BAD_PADDING = "bad_padding"
    BAD_NEXT_HEADER = "bad_next_header"
    BAD_INNER_LENGTH = "bad_inner_length"
    DUMMY = "dummy"


# Module constants for the members the hot path returns (an enum member read is ~100 ns on 3.11).
_TRUNCATED = DropReason.TRUNCATED
_UNKNOWN_SPI = DropReason.UNKNOWN_SPI
_AUTH_FAILED = DropReason.AUTH_FAILED
_BAD_PADDING = DropReason.BAD_PADDING
_DUMMY = DropReason.DUMMY
_REPLAY_DROPS = {
    TOO_OLD: DropReason.REPLAY_TOO_OLD,
    DUPLICATE: DropReason.REPLAY_DUPLICATE,
    BEYOND_LIMIT: DropReason.REPLAY_BEYOND_LIMIT,
}


class EspError(Exception):
    """Base of the errors this module raises."""


class EspParseError(EspError, ValueError):
    """Bytes that cannot be an ESP packet (inbound) or an IP packet to seal (outbound)."""

    def __init__(self, reason: DropReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


class RekeyRequired(EspError):
    """The SA has used its last sequence number: make a new SA (new key) now."""


class Authenticated(NamedTuple):
    """A packet that passed stages 1-5 (``InboundSA.authenticate``); its number is not recorded yet."""

    inner: memoryview
    seq: int
    next_header: int


class Opened(NamedTuple):
    """An authenticated, recorded inner packet, ready for the next inbound stage."""

    inner: memoryview
    seq: int
    next_header: int


def parse_header(packet: Buffer) -> tuple[int, int]:
    """Return (SPI, seq low) of an ESP packet; ``EspParseError`` if it is too short to be one."""
    if len(packet) < ESP_MIN_PACKET_SIZE:
        raise EspParseError(DropReason.TRUNCATED, f"{len(packet)} bytes, ESP needs {ESP_MIN_PACKET_SIZE}")
    return _SPI_SEQ.unpack_from(packet)


def next_header_for(inner: Buffer) -> int:
    """The Next Header value for tunnelling *inner*: 4 for IPv4, 41 for IPv6."""
    if not inner:
        raise EspParseError(DropReason.TRUNCATED, "empty inner packet")
    version = inner[0] >> 4
    if version == 4:
        return NEXT_HEADER_IPV4
    if version == 6:
        return NEXT_HEADER_IPV6
    raise EspParseError(DropReason.BAD_NEXT_HEADER, f"inner packet has IP version {version}")


def trailer(payload_length: int, next_header: int) -> bytes:
    """Padding 1, 2, 3, ..., pad length and next header: payload + trailer is a multiple of 4."""
    pad_length = -(payload_length + TRAILER_FIXED_SIZE) % PAYLOAD_ALIGNMENT
    return _PADDINGS[pad_length] + bytes((pad_length, next_header))


# The four possible trailers per next header, by payload length mod 4: seal looks them up.
_TRAILERS = {
    next_header: tuple(trailer(length, next_header) for length in range(PAYLOAD_ALIGNMENT))
    for next_header in (NEXT_HEADER_IPV4, NEXT_HEADER_IPV6, NEXT_HEADER_NONE)
}
_TRAILERS_BY_VERSION = {4: _TRAILERS[NEXT_HEADER_IPV4], 6: _TRAILERS[NEXT_HEADER_IPV6]}
_IPV4_TRAILERS = _TRAILERS[NEXT_HEADER_IPV4]
# The same by an inner packet's first byte (one index instead of a shift and a dict lookup); None: not IP.
_TRAILERS_BY_FIRST_BYTE = tuple(_TRAILERS_BY_VERSION.get(byte >> 4) for byte in range(256))


def associated_data(spi: int, seq: int, esn: bool) -> bytes:
    """The AAD of RFC 4106 section 5: SPI || seq low, or SPI || seq high || seq low with ESN."""
    if esn:
        return _AAD_ESN.pack(spi, seq >> SEQ_LOW_BITS, seq & SEQ_LOW_MASK)
    return _SPI_SEQ.pack(spi, seq)


def _check_sa_parameters(spi: int, key: bytes, salt: bytes) -> None:
    if not _MIN_SPI <= spi <= SEQ_LOW_MASK:
        raise ValueError(f"SPI must be in {_MIN_SPI}..{SEQ_LOW_MASK}, got {spi}")
    if len(key) != GCM_KEY_SIZE or len(salt) != GCM_SALT_SIZE:
        raise ValueError(f"AES-256-GCM needs a {GCM_KEY_SIZE}-byte key and a {GCM_SALT_SIZE}-byte salt")


def _nonce_buffer(salt: bytes) -> bytearray:
    """salt || IV (RFC 4106 section 4), allocated once per inbound SA; each packet writes its IV in place.

    Only for opening: a nonce shared between two threads could at worst fail
    an ICV there. Sealing makes a new nonce per packet (``OutboundSA``).
    """
    return bytearray(salt + bytes(GCM_IV_SIZE))


class OutboundSA:
    """One outbound SA: seals inner packets with consecutive sequence numbers.

    A sequence counter must never be restored from disk or reused: an agent
    that restarts makes new SAs, so no (key, IV) pair can repeat. *first_seq*
    exists for tests that start near a boundary. Only one thread may seal
    with an SA (the data plane's one thread): the counter is not locked.
    The nonce is a new object per packet, not a shared buffer, so that even
    a misuse from two threads cannot encrypt two packets under one nonce.
    """

    __slots__ = ("_aead", "_salt_word", "esn", "limit", "next_seq", "salt", "spi")

    def __init__(
        self,
        spi: int,
        key: bytes,
        salt: bytes,
        *,
        esn: bool = True,
        limit: int | None = None,
        first_seq: int = SEQ_FIRST,
    ) -> None:
        _check_sa_parameters(spi, key, salt)
        spec_limit = SEQ_MAX_ESN if esn else SEQ_MAX_32
        self.limit = spec_limit if limit is None else limit
        if not SEQ_FIRST <= self.limit <= spec_limit or first_seq < SEQ_FIRST:
            raise ValueError(f"need {SEQ_FIRST} <= first_seq and limit <= {spec_limit}")
        self.spi = spi
        self.salt = bytes(salt)
        self.esn = esn
        self.next_seq = first_seq
        self._aead = AESGCM(bytes(key))
        self._salt_word = int.from_bytes(self.salt, "big")

    @property
    def needs_rekey(self) -> bool:
        """True once the SA should be replaced (tuning limit), well before it must be."""
        return self.next_seq > min(self.limit, REKEY_AFTER_PACKETS)

    def seal(self, inner: Buffer) -> bytes:
        """Encapsulate one inner IPv4 or IPv6 packet; raises RekeyRequired past the limit."""
        trailers = _TRAILERS_BY_VERSION.get(inner[0] >> 4) if inner else None  # 1. classify
        if trailers is None:
            next_header_for(inner)  # raises the precise EspParseError
        return self._seal(inner, trailers)

    def seal_many(self, inners: Iterable[Buffer]) -> list[bytes]:
        """Seal *inners* in order (e.g. the segments of one super-packet), like ``seal`` on each.

        Stops early, without raising, when the SA has used its last number: the
        result is then shorter and the caller holds the rest for the next SA.
        A packet that is not IPv4/IPv6 raises EspParseError; the numbers spent
        on the packets before it are skipped, which the receiver's window allows.
        """
        sealed = []
        seal = self._seal
        by_version = _TRAILERS_BY_VERSION
        try:
            for inner in inners:
                trailers = by_version.get(inner[0] >> 4) if inner else None
                if trailers is None:
                    next_header_for(inner)
                sealed.append(seal(inner, trailers))
        except RekeyRequired:
            pass
        return sealed

    def seal_into(self, heads: Sequence[Buffer], tails: Sequence[Buffer], out: list[Buffer], prefix: int) -> int:
        """Seal packets given as head + tail, appending two buffers per packet to *out*; how many were sealed.

        Packet *i* is ``heads[i] + tails[i]`` (a segment's header and its payload, or a whole packet
        and ``b""``): it is joined once, with its trailer, into the plaintext, so a super-packet's
        segments are never built as packets of their own. Per packet *out* gets the 20-byte frame
        head (the word *prefix*, e.g. the UDP masquerade marker, then SPI | seq low | IV) and the
        ciphertext with its ICV: the two buffers of one datagram for a GSO ``sendmsg``. The bytes
        are those of ``seal`` after the prefix, with consecutive numbers. Fewer than all are sealed
        when the SA reaches its last number (the caller holds the rest for the next SA); a packet
        that is not IPv4/IPv6 raises EspParseError with ``sealed`` = how many were sealed before it.
        """
        seq = self.next_seq
        count = len(heads)
        room = self.limit - seq + 1
        if room < count:
            count = max(room, 0)
        by_first_byte = _TRAILERS_BY_FIRST_BYTE
        join = b"".join
        encrypt = self._aead.encrypt
        pack_nonce, pack_frame = _NONCE.pack, _FRAME_MARKED.pack
        salt, spi, esn = self._salt_word, self.spi, self.esn
        pack_aad = _AAD_ESN.pack if esn else _SPI_SEQ.pack
        append = out.append
        for index, head, tail in zip(range(count), heads, tails, strict=False):  # stops after count
            trailers = by_first_byte[head[0]] if head else None  # 1. classify
            if trailers is None:
                self.next_seq = seq
                error = EspParseError(DropReason.BAD_NEXT_HEADER, "inner packet is not IPv4 or IPv6")
                error.sealed = index  # type: ignore[attr-defined]
                raise error
            # 3. trailer, joined with the packet in one copy; 4. seal (nonce and AAD as in _seal).
            plaintext = join((head, tail, trailers[(len(head) + len(tail)) % PAYLOAD_ALIGNMENT]))
            low = seq & SEQ_LOW_MASK
            aad = pack_aad(spi, seq >> SEQ_LOW_BITS, low) if esn else pack_aad(spi, low)
            append(pack_frame(prefix, spi, low, seq))  # 5. frame, in two buffers
            append(encrypt(pack_nonce(salt, seq), plaintext, aad))
            seq += 1  # 2. number: count never passes the limit
        self.next_seq = seq
        return count

    def seal_dummy(self, filler: Buffer = b"") -> bytes:
        """A dummy packet (next header 59, RFC 4303 2.6), which the receiver discards."""
        return self._seal(filler, _TRAILERS[NEXT_HEADER_NONE])

    def _seal(self, payload: Buffer, trailers: tuple[bytes, ...]) -> bytes:
        # 2. number: the counter never wraps; past the limit only a new SA helps.
        seq = self.next_seq
        if seq > self.limit:
            raise RekeyRequired(f"SPI {self.spi:#010x} used its last sequence number {self.limit}")
        self.next_seq = seq + 1
        # 3. trailer: the least padding that aligns payload + trailer to 4 bytes.
        plaintext = b"".join((payload, trailers[len(payload) % PAYLOAD_ALIGNMENT]))
        # 4. seal: nonce = salt || IV with IV = seq; AAD with the ESN high half (RFC 4106 4, 5).
        spi = self.spi
        seq_low = seq & SEQ_LOW_MASK
        nonce = _NONCE.pack(self._salt_word, seq)
        aad = _AAD_ESN.pack(spi, seq >> SEQ_LOW_BITS, seq_low) if self.esn else _SPI_SEQ.pack(spi, seq_low)
        # 5. frame: SPI | seq low | IV | ciphertext | ICV.
        return _HEADER.pack(spi, seq_low, seq) + self._aead.encrypt(nonce, plaintext, aad)


def read_trailer(plaintext: bytes) -> tuple[int, int] | DropReason:
    """Validate the decrypted trailer and inner packet: (payload length, next header) or why not.

    The common case (an IPv4 or IPv6 packet whose length field matches) is
    decided with a few reads of *plaintext* and no copy; anything else goes
    to ``inner_problem`` for the precise reason.
    """
    end = len(plaintext) - TRAILER_FIXED_SIZE
    if end < 0:
        return _BAD_PADDING
    pad_length = plaintext[end]
    next_header = plaintext[end + 1]
    if not plaintext.endswith(_PADDINGS[pad_length], 0, end):  # also false when the padding passes the start
        return _BAD_PADDING
    length = end - pad_length
    if next_header == NEXT_HEADER_IPV4:
        if (
            length >= IPV4_MIN_HEADER_SIZE
            and plaintext[0] >> 4 == 4
            and _LENGTH_FIELD.unpack_from(plaintext, _IPV4_LENGTH_AT)[0] == length
        ):
            return length, next_header
    elif next_header == NEXT_HEADER_IPV6:
        if (
            length >= IPV6_HEADER_SIZE
            and plaintext[0] >> 4 == 6
            and _LENGTH_FIELD.unpack_from(plaintext, _IPV6_LENGTH_AT)[0] + IPV6_HEADER_SIZE == length
        ):
            return length, next_header
    elif next_header == NEXT_HEADER_NONE:
        return length, next_header
    problem = inner_problem(memoryview(plaintext)[:length], next_header)
    return (length, next_header) if problem is None else problem


def inner_problem(inner: Buffer, next_header: int) -> DropReason | None:
    """Tunnel mode carries exactly one IP packet: its version and length field must match.

    TFC padding after the inner packet (RFC 4303 2.7) must be negotiated before
    use; Coterie never negotiates it, so an inner length that differs from the
    payload is refused rather than trimmed.
    """
    if next_header == NEXT_HEADER_IPV4:
        version, minimum, offset, extra = 4, IPV4_MIN_HEADER_SIZE, _IPV4_LENGTH_AT, 0
    elif next_header == NEXT_HEADER_IPV6:
        version, minimum, offset, extra = 6, IPV6_HEADER_SIZE, _IPV6_LENGTH_AT, IPV6_HEADER_SIZE
    else:
        return DropReason.BAD_NEXT_HEADER
    if not inner:
        return DropReason.BAD_INNER_LENGTH
    if inner[0] >> 4 != version:
        return DropReason.BAD_NEXT_HEADER
    if len(inner) < minimum or _LENGTH_FIELD.unpack_from(inner, offset)[0] + extra != len(inner):
        return DropReason.BAD_INNER_LENGTH
    return None


class InboundSA:
    """One inbound SA: opens packets sealed by the peer's matching OutboundSA.

    Only one thread may open with an SA: the window and the nonce buffer are
    not shared (the data plane has one packet thread).
    """

    __slots__ = ("_aead", "_nonce", "_nonce_aad", "_scratch", "esn", "salt", "spi", "window")

    def __init__(
        self, spi: int, key: bytes, salt: bytes, *, esn: bool = True, window_size: int = REPLAY_WINDOW_DEFAULT
    ) -> None:
        _check_sa_parameters(spi, key, salt)
        self.spi = spi
        self.salt = bytes(salt)
        self.esn = esn
        self.window = ReplayWindow(window_size, SEQ_MAX_ESN if esn else SEQ_MAX_32)
        self._aead = AESGCM(bytes(key))
        self._nonce = _nonce_buffer(self.salt)
        # salt || IV || AAD, written in place per packet by open_many; nonce and AAD are views of it
        self._scratch = bytearray(self.salt + bytes(_IV_AAD_ESN.size if esn else _IV_AAD.size))
        view = memoryview(self._scratch)
        self._nonce_aad = (view[: GCM_SALT_SIZE + GCM_IV_SIZE], view[GCM_SALT_SIZE + GCM_IV_SIZE :])

    def open(self, packet: Buffer) -> Opened | DropReason:
        """Authenticate and decapsulate one ESP packet (stages 1-7); never raises."""
        found = self._authenticate(packet)
        if found.__class__ is not tuple:
            return found  # type: ignore[return-value]  # a DropReason
        plaintext, length, seq, next_header = found  # type: ignore[misc]
        verdict = self.window.accept(seq)  # 6. accept: nothing ran in between, so this is check's verdict
        if verdict is not OK:
            return _REPLAY_DROPS[verdict]
        if next_header == NEXT_HEADER_NONE:  # 7. deliver
            return _DUMMY
        return _new_tuple(Opened, (memoryview(plaintext)[:length], seq, next_header))

    def open_many(self, packets: Iterable[Buffer]) -> tuple[list[Buffer], list[DropReason]]:
        """Open a run of packets of this SA, in order: (inner packets delivered, why the others were not).

        The verdicts are those of ``open`` on each packet in turn: a copy later
        in the run is a duplicate of the first, one bad packet costs only itself.
        The common case of a GRO read is cheaper (``_open_in_order``): a packet
        that carries the next number in order is above the window by
        construction, so it needs no window check before decryption, and the
        numbers of such a stretch are recorded together (one
        ``ReplayWindow.accept_range``). Any other packet (a gap, a copy, one
        from before the window, a different SPI, one too short to parse) ends
        the stretch: the stretch is recorded first, then ``open`` handles that
        packet against the window it would have seen one by one.
        """
        delivered: list[Buffer] = []
        drops: list[DropReason] = []
        window = self.window
        first = window.top + 1  # the in-order stretch not yet recorded is first .. expected - 1
        expected = first
        in_order = self._open_in_order
        for packet in packets:
            opened = in_order(packet, expected)
            if opened is None:  # not the next number in order: record the stretch, then one by one
                if expected > first:
                    window.accept_range(first, expected - 1)
                opened = self.open(packet)
                if opened.__class__ is Opened:
                    delivered.append(opened.inner)  # type: ignore[union-attr]
                else:
                    drops.append(opened)  # type: ignore[arg-type]
                first = expected = window.top + 1
            elif opened.__class__ is bytes:
                delivered.append(opened)  # type: ignore[arg-type]
                expected += 1
            elif opened is _DUMMY:  # authenticated and recorded, like a delivered packet
                drops.append(_DUMMY)
                expected += 1
            else:  # forged, or malformed under a valid ICV: nothing recorded, the stretch goes on
                drops.append(opened)  # type: ignore[arg-type]
        if expected > first:
            window.accept_range(first, expected - 1)
        return delivered, drops

    def _open_in_order(self, packet: Buffer, expected: int) -> bytes | DropReason | None:
        """Stages 1-5 for a packet that carries *expected*, the next number in order; None for any other.

        The inner packet or why not; records nothing (``open_many`` records the
        stretch). Only the packet's own fields are checked here: *expected* is
        above the window (the caller passes ``top + 1`` and counts up), so no
        window check is needed but the limit's. Nonce and AAD are written with
        one ``pack_into`` into the SA's buffer. The usual trailer, that of an
        IPv4 packet with a 20-byte header, is compared whole with the one its
        length field says the sender wrote; other trailers go to
        ``read_trailer``. The inner packet is a copy (``bytes`` slice): in
        CPython that is cheaper than a memoryview of the plaintext.
        """
        if len(packet) < ESP_MIN_PACKET_SIZE:
            return None
        spi, seq_low, iv = _HEADER.unpack_from(packet)
        if spi != self.spi or seq_low != expected & SEQ_LOW_MASK or expected > self.window.limit:
            return None
        nonce, aad = self._nonce_aad
        if self.esn:
            _IV_AAD_ESN.pack_into(self._scratch, GCM_SALT_SIZE, iv, spi, expected >> SEQ_LOW_BITS, seq_low)
        else:
            _IV_AAD.pack_into(self._scratch, GCM_SALT_SIZE, iv, spi, seq_low)
        try:
            plaintext = self._aead.decrypt(nonce, packet[_CIPHERTEXT_START:], aad)
        except InvalidTag:
            return _AUTH_FAILED
        if len(plaintext) >= _IPV4_START.size:
            first, length = _IPV4_START.unpack_from(plaintext)
            if first == _IPV4_PLAIN and length >= IPV4_MIN_HEADER_SIZE:
                expected_trailer = _IPV4_TRAILERS[length % PAYLOAD_ALIGNMENT]
                if len(plaintext) == length + len(expected_trailer) and plaintext.endswith(expected_trailer):
                    return plaintext[:length]
        found = read_trailer(plaintext)
        if found.__class__ is not tuple:
            return found  # type: ignore[return-value]
        if found[1] == NEXT_HEADER_NONE:  # type: ignore[index]
            return _DUMMY
        return plaintext[: found[0]]  # type: ignore[index]

    def authenticate(self, packet: Buffer) -> Authenticated | DropReason:
        """Stages 1-5: parse, check the window, decrypt, validate. Changes nothing; never raises."""
        found = self._authenticate(packet)
        if found.__class__ is not tuple:
            return found  # type: ignore[return-value]
        plaintext, length, seq, next_header = found  # type: ignore[misc]
        return Authenticated(memoryview(plaintext)[:length], seq, next_header)

    def commit(self, packet: Authenticated) -> Opened | DropReason:
        """Stages 6-7: record the number, then deliver or drop a dummy.

        A batch may authenticate several packets before committing any, so the
        window can have moved since ``authenticate`` checked it: a second copy
        of a packet is refused here.
        """
        verdict = self.window.accept(packet.seq)
        if verdict is not OK:
            return _REPLAY_DROPS[verdict]
        if packet.next_header == NEXT_HEADER_NONE:
            return _DUMMY
        return Opened(*packet)

    def _authenticate(self, packet: Buffer) -> tuple[bytes, int, int, int] | DropReason:
        """Stages 1-5 as (plaintext, inner length, seq, next header) or a drop; changes nothing."""
        if len(packet) < ESP_MIN_PACKET_SIZE:  # 1. parse
            return _TRUNCATED
        spi, seq_low, iv = _HEADER.unpack_from(packet)
        if spi != self.spi:  # 2. lookup (SpiTable found this SA by the same SPI)
            return _UNKNOWN_SPI
        window = self.window  # 3. replay check, before any cryptography
        top = window.top
        if self.esn:  # A2.2 as in replay.infer_esn: the number above the window's bottom edge
            bottom = top - window.size + 1
            seq = bottom + ((seq_low - bottom) & SEQ_LOW_MASK)
        else:
            seq = seq_low
        if not top < seq <= window.limit:  # the next packet in order passes without a call
            verdict = window.check(seq)
            if verdict is not OK:
                return _REPLAY_DROPS[verdict]
        nonce = self._nonce  # 4. decrypt: nonce = salt || wire IV, AAD with the inferred high half
        _IV.pack_into(nonce, GCM_SALT_SIZE, iv)
        aad = _AAD_ESN.pack(spi, seq >> SEQ_LOW_BITS, seq_low) if self.esn else _SPI_SEQ.pack(spi, seq_low)
        try:
            plaintext = self._aead.decrypt(nonce, packet[_CIPHERTEXT_START:], aad)
        except InvalidTag:
            return _AUTH_FAILED
        found = read_trailer(plaintext)  # 5. trailer
        if found.__class__ is not tuple:
            return found  # type: ignore[return-value]
        return plaintext, found[0], seq, found[1]  # type: ignore[index]


class SpiTable:
    """The inbound SAs of this node by SPI: the lookup stage (RFC 4303 3.4.2)."""

    __slots__ = ("_sas",)

    def __init__(self) -> None:
        self._sas: dict[int, InboundSA] = {}

    def add(self, sa: InboundSA) -> None:
        if sa.spi in self._sas:
            raise ValueError(f"SPI {sa.spi:#010x} is already in use")
        self._sas[sa.spi] = sa

    def remove(self, spi: int) -> InboundSA | None:
        return self._sas.pop(spi, None)

    def __contains__(self, spi: int) -> bool:
        return spi in self._sas

    def __len__(self) -> int:
        return len(self._sas)

    def open(self, packet: Buffer) -> Opened | DropReason:
        """Find the SA for the packet's SPI and open it there; never raises."""
        try:
            spi, _ = parse_header(packet)
        except EspParseError as error:
            return error.reason
        sa = self._sas.get(spi)
        if sa is None:
            return DropReason.UNKNOWN_SPI
        return sa.open(packet)


#: The outbound pipeline in packet order (stage names of the module docstring).
OUTBOUND_PIPELINE: tuple[str, ...] = ("classify", "number", "trailer", "seal", "frame")

#: The inbound pipeline in packet order, with the drops each stage can produce.
INBOUND_PIPELINE: tuple[tuple[str, tuple[DropReason, ...]], ...] = (
    ("parse", (DropReason.TRUNCATED,)),
    ("lookup", (DropReason.UNKNOWN_SPI,)),
    ("replay check", tuple(_REPLAY_DROPS.values())),
    ("decrypt", (DropReason.AUTH_FAILED,)),
    ("trailer", (DropReason.BAD_PADDING, DropReason.BAD_NEXT_HEADER, DropReason.BAD_INNER_LENGTH)),
    ("accept", tuple(_REPLAY_DROPS.values())),
    ("deliver", (DropReason.DUMMY,)),
)
