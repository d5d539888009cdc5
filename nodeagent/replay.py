"""Anti-replay window for inbound ESP, with 64-bit extended sequence numbers.

Implements RFC 4303 section 3.4.3 (sequence number verification) and
appendix A2 (extended sequence numbers: the window over 64-bit numbers, and
A2.2, inferring the high 32 bits from the 32 on the wire). The window is a
bitmap in one Python int: bit ``i`` says whether ``top - i`` was accepted.
Moving forward is one shift, checking one shift and one AND: a few integer
operations done in C per packet, where a ring of words (RFC 6479) costs
several interpreted steps. Bits above the window are never read, so they
are trimmed only when ``top`` crosses a multiple of the size (the bitmap
stays under 2 x size + 1 bits without a mask per packet). Sizes stay whole 64-bit words,
as in the kernel and RFC 6479 implementations, so configurations carry over.

Stages, in the order an inbound packet meets them (esp.py drives them):

1. infer  -- ``infer_esn(top, seq_low, size)`` / ``ReplayWindow.infer``: the
   candidate 64-bit sequence number of a packet (nothing changes).
2. check  -- ``ReplayWindow.check(seq)``: may this packet be authenticated at
   all? Too old, a duplicate, or past the hard limit are refused before any
   cryptography (nothing changes).
3. accept -- ``ReplayWindow.accept(seq)``: only after the packet authenticated
   (STYLE.md: authenticate before believing). Checks again, because another
   packet of the same batch may have taken the number meanwhile, then records
   it and moves the window forward. ``accept_range(first, last)`` records a
   stretch of consecutive numbers above the window in one update (what
   ``InboundSA.open_many`` does for the in-order packets of a GRO read).

The window covers the ``size`` numbers ``top - size + 1 .. top``; anything at
or below ``top - size`` is too old. Verdicts are values; the caller counts them.
The verdicts are also module constants (``OK``, ``TOO_OLD``, ...): on CPython
3.11 reading ``ReplayVerdict.OK`` is a descriptor call of about 100 ns, a
global is not, and the hot path compares against them per packet.
"""

from __future__ import annotations

import enum

from nodeagent.constants import (
    REPLAY_WINDOW_DEFAULT,
    REPLAY_WINDOW_MINIMUM,
    REPLAY_WORD_BITS,
    SEQ_FIRST,
    SEQ_LOW_MASK,
    SEQ_MAX_ESN,
)


class ReplayVerdict(enum.Enum):
    """What the window says about one sequence number."""

    OK = "ok"
    TOO_OLD = "too_old"  # at or below top - size, or before the SA's first packet
    DUPLICATE = "duplicate"  # inside the window and already accepted
    BEYOND_LIMIT = "beyond_limit"  # past the SA's last sequence number: the SA is spent


OK = ReplayVerdict.OK
TOO_OLD = ReplayVerdict.TOO_OLD
DUPLICATE = ReplayVerdict.DUPLICATE
BEYOND_LIMIT = ReplayVerdict.BEYOND_LIMIT


def infer_esn(top: int, seq_low: int, size: int) -> int:
    """Return the candidate 64-bit sequence number for *seq_low* (RFC 4303 A2.2).

    *top* is the highest authenticated sequence number (64-bit), *size* the
    window size W. A2.2 distinguishes the window lying within one 2**32
    subspace (Tl >= W - 1) from straddling a boundary; both cases say the
    same thing: the number is the one whose low half is *seq_low* in the
    2**32 numbers that start at the window's bottom edge ``top - W + 1``.
    That is one subtraction modulo 2**32 from the edge
    (tests/unit/test_replay.py checks it against the two cases spelled out).

    The result is the RFC's arithmetic without wrapping: it is below 1 when
    Th - 1 would precede the SA (Th = 0), and above 2**64 - 1 when Th + 1
    would follow the last subspace; ``ReplayWindow.check`` refuses both.
    """
    bottom = top - size + 1
    return bottom + ((seq_low - bottom) & SEQ_LOW_MASK)


class ReplayWindow:
    """The receive window of one inbound SA: a bitmap in an int, bit ``i`` for ``top - i``."""

    __slots__ = ("_mask", "bits", "limit", "size", "top")

    def __init__(self, size: int = REPLAY_WINDOW_DEFAULT, limit: int = SEQ_MAX_ESN) -> None:
        if size < REPLAY_WINDOW_MINIMUM or size % REPLAY_WORD_BITS:
            raise ValueError(f"window size must be a multiple of {REPLAY_WORD_BITS}, got {size}")
        if limit < SEQ_FIRST:
            raise ValueError(f"sequence limit must be at least {SEQ_FIRST}, got {limit}")
        self.size = size
        self.limit = limit
        self.top = 0  # RFC 4303 3.4.3: the receive counter starts at 0 (nothing received)
        self.bits = 0
        self._mask = (1 << size) - 1

    def infer(self, seq_low: int) -> int:
        """The candidate 64-bit sequence number of a packet carrying *seq_low* (see ``infer_esn``)."""
        bottom = self.top - self.size + 1
        return bottom + ((seq_low - bottom) & SEQ_LOW_MASK)

    def check(self, seq: int) -> ReplayVerdict:
        """May a packet with sequence number *seq* be authenticated? Changes nothing."""
        top = self.top
        if seq > top:
            return OK if seq <= self.limit else BEYOND_LIMIT
        offset = top - seq
        if offset >= self.size or seq < SEQ_FIRST:
            return TOO_OLD
        return DUPLICATE if self.bits >> offset & 1 else OK

    def accept(self, seq: int) -> ReplayVerdict:
        """Record *seq* of a packet that authenticated; returns the verdict that applied.

        Anything but ``OK`` means the packet must be dropped after all (a copy
        or a far newer packet was accepted since ``check``) and nothing changed.
        """
        top = self.top
        if seq > top:
            if seq > self.limit:
                return BEYOND_LIMIT
            shift = seq - top
            if shift >= self.size:
                self.bits = 1
            elif (seq ^ top) < self.size:  # still in the same size-aligned block: no trim
                self.bits = self.bits << shift | 1
            else:  # crossing into the next block: drop the bits that fell out of the window
                self.bits = (self.bits << shift | 1) & self._mask
            self.top = seq
            return OK
        offset = top - seq
        if offset >= self.size or seq < SEQ_FIRST:
            return TOO_OLD
        bit = 1 << offset
        bits = self.bits
        if bits & bit:
            return DUPLICATE
        self.bits = bits | bit
        return OK

    def accept_range(self, first: int, last: int) -> None:
        """Record *first* .. *last* at once: numbers above ``top`` of packets that authenticated.

        What ``accept`` on each of them in order would leave, as one shift and
        one OR: a run of in-order packets (a GRO read) moves the window once,
        not once per packet. Only for numbers above the window and within the
        limit (``accept`` has no verdict to give them but OK); anything else is
        a caller's error.
        """
        top = self.top
        if not top < first <= last <= self.limit:
            raise ValueError(f"accept_range({first}, {last}) needs {top} < first <= last <= {self.limit}")
        run = (1 << (last - first + 1)) - 1
        shift = last - top
        self.bits = (run if shift >= self.size else self.bits << shift | run) & self._mask
        self.top = last

    def snapshot(self) -> tuple[int, int]:
        """The whole state as a value (top and the bitmap of the window), to compare before and after."""
        return self.top, self.bits & self._mask

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, top={self.top})"
