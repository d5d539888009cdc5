"""Anti-replay window for inbound ESP, with 64-bit extended sequence numbers.

Implements RFC 4303 section 3.4.3 (sequence number verification) and
appendix A2 (extended sequence numbers: the window over 64-bit numbers, and
A2.2, inferring the high 32 bits from the 32 on the wire), with the window
kept as in RFC 6479: a ring of 64-bit words, one more than the window needs,
so that moving forward zeroes whole words and never shifts bits.

Stages, in the order an inbound packet meets them (esp.py drives them):

1. infer  -- ``infer_esn(top, seq_low, size)`` / ``ReplayWindow.infer``: the
   candidate 64-bit sequence number of a packet (nothing changes).
2. check  -- ``ReplayWindow.check(seq)``: may this packet be authenticated at
   all? Too old, a duplicate, or past the hard limit are refused before any
   cryptography (nothing changes).
3. accept -- ``ReplayWindow.accept(seq)``: only after the packet authenticated
   (STYLE.md: authenticate before believing). Checks again, because another
   packet of the same batch may have taken the number meanwhile, then records
   it and moves the window forward.

The window covers the ``size`` numbers ``top - size + 1 .. top``; anything at
or below ``top - size`` is too old. Verdicts are values; the caller counts them.
"""

from __future__ import annotations

import enum

from nodeagent.constants import (
    REPLAY_WINDOW_DEFAULT,
    REPLAY_WINDOW_MINIMUM,
    REPLAY_WORD_BITS,
    SEQ_FIRST,
    SEQ_LOW_BITS,
    SEQ_LOW_MASK,
    SEQ_MAX_ESN,
)

_WORD_SHIFT = REPLAY_WORD_BITS.bit_length() - 1  # seq >> 6 is the word, seq & 63 the bit
_BIT_MASK = REPLAY_WORD_BITS - 1


class ReplayVerdict(enum.Enum):
    """What the window says about one sequence number."""

    OK = "ok"
    TOO_OLD = "too_old"  # at or below top - size, or before the SA's first packet
    DUPLICATE = "duplicate"  # inside the window and already accepted
    BEYOND_LIMIT = "beyond_limit"  # past the SA's last sequence number: the SA is spent


def infer_esn(top: int, seq_low: int, size: int) -> int:
    """Return the candidate 64-bit sequence number for *seq_low* (RFC 4303 A2.2).

    *top* is the highest authenticated sequence number (64-bit), *size* the
    window size W. With Tl, Th the low and high halves of *top* and
    Bl = Tl - W + 1:

    - case A, Tl >= W - 1 (the window lies within one 2**32 subspace):
      Seql >= Bl -> Th, else Th + 1 (the packet is ahead, in the next subspace);
    - case B, Tl < W - 1 (the window straddles a subspace boundary):
      Seql >= Bl mod 2**32 -> Th - 1 (the older part of the window), else Th.

    The result is the RFC's arithmetic without wrapping: it is below 1 when
    Th - 1 would precede the SA (Th = 0), and above 2**64 - 1 when Th + 1
    would follow the last subspace; ``ReplayWindow.check`` refuses both.
    """
    top_low = top & SEQ_LOW_MASK
    top_high = top >> SEQ_LOW_BITS
    bottom_low = (top_low - size + 1) & SEQ_LOW_MASK
    if top_low >= size - 1:
        high = top_high if seq_low >= bottom_low else top_high + 1
    else:
        high = top_high - 1 if seq_low >= bottom_low else top_high
    return (high << SEQ_LOW_BITS) + seq_low


class ReplayWindow:
    """The receive window of one inbound SA: a bitmap ring of 64-bit words."""

    __slots__ = ("_nwords", "_words", "limit", "size", "top")

    def __init__(self, size: int = REPLAY_WINDOW_DEFAULT, limit: int = SEQ_MAX_ESN) -> None:
        if size < REPLAY_WINDOW_MINIMUM or size % REPLAY_WORD_BITS:
            raise ValueError(f"window size must be a multiple of {REPLAY_WORD_BITS}, got {size}")
        if limit < SEQ_FIRST:
            raise ValueError(f"sequence limit must be at least {SEQ_FIRST}, got {limit}")
        self.size = size
        self.limit = limit
        self.top = 0  # RFC 4303 3.4.3: the receive counter starts at 0 (nothing received)
        self._nwords = size // REPLAY_WORD_BITS + 1  # RFC 6479: one spare word
        self._words = [0] * self._nwords

    def infer(self, seq_low: int) -> int:
        """The candidate 64-bit sequence number of a packet carrying *seq_low*."""
        return infer_esn(self.top, seq_low, self.size)

    def check(self, seq: int) -> ReplayVerdict:
        """May a packet with sequence number *seq* be authenticated? Changes nothing."""
        if seq > self.limit:
            return ReplayVerdict.BEYOND_LIMIT
        if seq > self.top:
            return ReplayVerdict.OK
        if seq < SEQ_FIRST or seq <= self.top - self.size:
            return ReplayVerdict.TOO_OLD
        word = self._words[(seq >> _WORD_SHIFT) % self._nwords]
        if word >> (seq & _BIT_MASK) & 1:
            return ReplayVerdict.DUPLICATE
        return ReplayVerdict.OK

    def accept(self, seq: int) -> ReplayVerdict:
        """Record *seq* of a packet that authenticated; returns the verdict that applied.

        Anything but ``OK`` means the packet must be dropped after all (a copy
        or a far newer packet was accepted since ``check``) and nothing changed.
        """
        verdict = self.check(seq)
        if verdict is not ReplayVerdict.OK:
            return verdict
        if seq > self.top:
            self._advance(seq)
        index = (seq >> _WORD_SHIFT) % self._nwords
        self._words[index] |= 1 << (seq & _BIT_MASK)
        return verdict

    def _advance(self, seq: int) -> None:
        """Move the top to *seq*, zeroing the words that come into the window (RFC 6479)."""
        current = self.top >> _WORD_SHIFT
        steps = min((seq >> _WORD_SHIFT) - current, self._nwords)
        for step in range(1, steps + 1):
            self._words[(current + step) % self._nwords] = 0
        self.top = seq

    def snapshot(self) -> tuple[int, tuple[int, ...]]:
        """The whole state as a value (top and bitmap), to compare before and after."""
        return self.top, tuple(self._words)

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, top={self.top})"
