"""The anti-replay window: kernel vectors (D1), a model-based property (D2), ESN inference.

D1 ports the Linux kernel's WireGuard self-test ``selftest/counter.c`` (34
single cases, then 6 bulk cases, each bulk case on a fresh counter) as data.
Two differences of convention are bridged, both mechanically:

- WireGuard counts from nonce 0 and adds one inside ``counter_validate``; ESP's
  first sequence number is 1 (RFC 4303 3.3.3). So kernel nonce ``n`` is our
  sequence number ``n + 1``, exactly the number the kernel itself stores.
- WireGuard accepts ``COUNTER_WINDOW_SIZE + 1`` numbers (top - CWS .. top),
  an RFC 4303 window of size W accepts W (top - W + 1 .. top). So the kernel's
  ``COUNTER_WINDOW_SIZE`` is ``W - 1`` here and ``T_LIM`` is ``W``, and
  ``REJECT_AFTER_MESSAGES`` is the window's hard limit (nonces below it are
  sequence numbers up to the limit).

Every case runs for W in {64, 1024, 4096} and for three hard limits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import accumulate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.constants import SEQ_LOW_MASK, SEQ_MAX_32, SEQ_MAX_ESN
from nodeagent.replay import ReplayVerdict, ReplayWindow, infer_esn

SIZES = (64, 1024, 4096)
OK = ReplayVerdict.OK

Case = tuple[int, bool]  # (kernel nonce, accepted?)


def single_cases(t_lim: int, reject: int) -> list[Case]:
    """The 34 single cases of counter.c, in order, on one counter."""
    return [
        (0, True),
        (1, True),
        (1, False),
        (9, True),
        (8, True),
        (7, True),
        (7, False),
        (t_lim, True),
        (t_lim - 1, True),
        (t_lim - 1, False),
        (t_lim - 2, True),
        (2, True),
        (2, False),
        (t_lim + 16, True),
        (3, False),
        (t_lim + 16, False),
        (t_lim * 4, True),
        (t_lim * 4 - (t_lim - 1), True),
        (10, False),
        (t_lim * 4 - t_lim, False),
        (t_lim * 4 - (t_lim + 1), False),
        (t_lim * 4 - (t_lim - 2), True),
        (t_lim * 4 + 1 - t_lim, False),
        (0, False),
        (reject, False),
        (reject - 1, True),
        (reject, False),
        (reject - 1, False),
        (reject - 2, True),
        (reject + 1, False),
        (reject + 2, False),
        (reject - 2, False),
        (reject - 3, True),
        (0, False),
    ]


def bulk_ascending_then_zero(cws: int) -> list[Case]:
    return [(i, True) for i in range(1, cws + 1)] + [(0, True), (0, False)]


def bulk_ascending_from_two(cws: int) -> list[Case]:
    return [(i, True) for i in range(2, cws + 2)] + [(1, True), (0, False)]


def bulk_descending_to_zero(cws: int) -> list[Case]:
    return [(i, True) for i in range(cws, -1, -1)]


def bulk_descending_to_one(cws: int) -> list[Case]:
    return [(i, True) for i in range(cws + 1, 0, -1)] + [(0, False)]


def bulk_descending_then_top(cws: int) -> list[Case]:
    return [(i, True) for i in range(cws, 0, -1)] + [(cws + 1, True), (0, False)]


def bulk_descending_then_zero_and_top(cws: int) -> list[Case]:
    return [(i, True) for i in range(cws, 0, -1)] + [(0, True), (cws + 1, True)]


BULK_CASES: list[Callable[[int], list[Case]]] = [
    bulk_ascending_then_zero,
    bulk_ascending_from_two,
    bulk_descending_to_zero,
    bulk_descending_to_one,
    bulk_descending_then_top,
    bulk_descending_then_zero_and_top,
]


def run_cases(window: ReplayWindow, cases: list[Case]) -> list[str]:
    """Feed kernel nonces as sequence numbers; return every mismatch (empty when all match)."""
    mismatches = []
    for number, (nonce, expected) in enumerate(cases, 1):
        seq = nonce + 1
        before = window.snapshot()
        checked = window.check(seq)
        accepted = window.accept(seq) is OK
        if accepted != expected or (checked is OK) != expected:
            mismatches.append(f"case {number}: seq {seq} check={checked} accepted={accepted}, want {expected}")
        if not accepted and window.snapshot() != before:
            mismatches.append(f"case {number}: a rejected seq {seq} changed the window")
    return mismatches


def limits_for(size: int) -> list[int]:
    return [SEQ_MAX_ESN, SEQ_MAX_32, 16 * size]


@pytest.mark.parametrize("size", SIZES)
def test_kernel_single_cases(size: int) -> None:
    for limit in limits_for(size):
        window = ReplayWindow(size, limit)
        assert run_cases(window, single_cases(t_lim=size, reject=limit)) == [], f"limit {limit}"


@pytest.mark.parametrize("bulk", BULK_CASES, ids=lambda bulk: bulk.__name__)
@pytest.mark.parametrize("size", SIZES)
def test_kernel_bulk_cases(size: int, bulk: Callable[[int], list[Case]]) -> None:
    assert run_cases(ReplayWindow(size), bulk(size - 1)) == []


def test_single_case_count_matches_the_kernel() -> None:
    assert len(single_cases(64, SEQ_MAX_ESN)) == 34
    assert len(BULK_CASES) == 6


@pytest.mark.parametrize("size", [0, 32, 100, 1000])
def test_window_size_must_be_whole_words(size: int) -> None:
    with pytest.raises(ValueError):
        ReplayWindow(size)


def test_sequence_number_zero_is_never_accepted() -> None:
    window = ReplayWindow(64)
    assert window.check(0) is ReplayVerdict.TOO_OLD
    assert window.accept(0) is ReplayVerdict.TOO_OLD
    assert window.snapshot() == ReplayWindow(64).snapshot()


def test_accept_rechecks_after_a_newer_packet_won() -> None:
    """check() may pass two packets of one batch; accept() still refuses the loser."""
    window = ReplayWindow(64)
    assert window.check(5) is OK and window.check(5) is OK
    assert window.accept(5) is OK
    assert window.accept(5) is ReplayVerdict.DUPLICATE
    assert window.check(6) is OK
    assert window.accept(6 + 64) is OK  # a far newer packet authenticated meanwhile
    assert window.accept(6) is ReplayVerdict.TOO_OLD


# -- D2: a property against a set-based model --------------------------------------------


class SetModel:
    """The obvious, slow definition of RFC 4303 3.4.3: a set of everything accepted."""

    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit, self.top, self.seen = size, limit, 0, set[int]()

    def offer(self, seq: int) -> ReplayVerdict:
        if seq > self.limit:
            return ReplayVerdict.BEYOND_LIMIT
        if seq < 1 or seq <= self.top - self.size:
            return ReplayVerdict.TOO_OLD
        if seq in self.seen:
            return ReplayVerdict.DUPLICATE
        self.seen.add(seq)
        self.top = max(self.top, seq)
        return OK


@st.composite
def arrivals(draw: st.DrawFn, size: int) -> tuple[list[int], int]:
    """An arrival order: rising numbers reordered within W, plus duplicates and stale numbers."""
    count = draw(st.integers(1, 150))
    gaps = draw(st.lists(st.one_of(st.integers(1, 3), st.integers(1, 3 * size)), min_size=count, max_size=count))
    base = draw(st.sampled_from([0, 2**32 - 2 * size, SEQ_MAX_ESN - 200 * size]))
    numbers = [base + n for n in accumulate(gaps)]
    jitter = draw(st.lists(st.integers(0, size - 1), min_size=count, max_size=count))
    stream = [numbers[i] for i in sorted(range(count), key=lambda i: numbers[i] + jitter[i])]
    extra = st.one_of(st.sampled_from(numbers), st.integers(max(0, base - size), numbers[-1] + size))
    for position, value in draw(st.lists(st.tuples(st.integers(0, len(stream)), extra), max_size=60)):
        stream.insert(position, value)
    limit = draw(st.one_of(st.just(SEQ_MAX_ESN), st.integers(max(1, base), numbers[-1] + size)))
    return stream, limit


@pytest.mark.parametrize("size", SIZES)
def test_window_matches_the_set_model(size: int) -> None:
    @settings(max_examples=100, deadline=None)  # W=4096 examples are long; a deadline only adds flakiness
    @given(arrivals(size))
    def check(drawn: tuple[list[int], int]) -> None:
        stream, limit = drawn
        window, model = ReplayWindow(size, limit), SetModel(size, limit)
        accepted: list[int] = []
        counts, model_counts = Counter[ReplayVerdict](), Counter[ReplayVerdict]()
        for seq in stream:
            stale = seq <= window.top - size
            verdict = window.check(seq)
            assert window.accept(seq) is verdict  # nothing happened in between
            if stale:
                assert verdict is ReplayVerdict.TOO_OLD
            counts[verdict] += 1
            model_counts[model.offer(seq)] += 1
            if verdict is OK:
                accepted.append(seq)
            assert window.top == model.top
        assert len(accepted) == len(set(accepted))  # each number accepted at most once
        assert set(accepted) == model.seen  # ... and exactly when the model accepts it
        assert counts == model_counts

    check()


# -- ESN inference (RFC 4303 appendix A2.2) ---------------------------------------------------

B = 2**32

INFERENCE_CASES = [
    # (top, seq low on the wire, W, inferred 64-bit number)
    (B - 1, 0, 64, B),  # case A, the next packet crosses into subspace 1
    (B - 1, B - 10, 64, B - 10),  # case A, inside the window
    (B - 1, B - 64, 64, B - 64),  # case A, the window's bottom edge
    (B - 1, B - 65, 64, 2 * B - 65),  # case A, below the window: read as the next subspace
    (B + 5, B - 58, 64, B - 58),  # case B, bottom edge in the previous subspace
    (B + 5, B - 59, 64, 2 * B - 59),  # case B, just below the window: read as ahead
    (B + 5, 3, 64, B + 3),  # case B, inside the window in the current subspace
    (B + 5, 6, 64, B + 6),  # case B, the next packet
    (B + 5, B - 1, 64, B - 1),  # case B, the last number of subspace 0
    (B + 1000, B - 20, 1024, B - 20),  # case B with W = 1024
    (B + 1023, 0, 1024, B),  # case A begins at Tl = W - 1
    (B + 1022, B - 1, 1024, B - 1),  # still case B one below
    (0, 1, 64, 1),  # a fresh window, the first packet
    (0, B - 1, 64, -1),  # a fresh window: Th - 1 precedes the SA, so it is too old
    (62, B - 1, 64, -1),
    (63, B - 1, 64, B - 1),  # Tl = W - 1: case A, the whole subspace is Th
    (SEQ_MAX_ESN, 0, 64, 2**64),  # past the last subspace: beyond the limit
    (SEQ_MAX_ESN, B - 2, 4096, SEQ_MAX_ESN - 1),
]


@pytest.mark.parametrize(("top", "seq_low", "size", "expected"), INFERENCE_CASES)
def test_esn_inference_cases(top: int, seq_low: int, size: int, expected: int) -> None:
    assert infer_esn(top, seq_low, size) == expected


def test_inferred_numbers_outside_the_sa_are_refused() -> None:
    window = ReplayWindow(64)
    assert window.check(window.infer(B - 1)) is ReplayVerdict.TOO_OLD
    window.accept(SEQ_MAX_ESN - 1)
    assert window.check(window.infer(SEQ_MAX_ESN & SEQ_LOW_MASK)) is OK
    assert window.check(window.infer(5)) is ReplayVerdict.BEYOND_LIMIT


@settings(max_examples=500)
@given(
    top=st.integers(0, SEQ_MAX_ESN),
    size=st.sampled_from(SIZES),
    offset=st.integers(1, B),
)
def test_inference_recovers_every_number_of_its_span(top: int, size: int, offset: int) -> None:
    """A2.2 recovers any number in the 2**32 span that starts at the window's bottom edge."""
    seq = top - size + offset
    assert infer_esn(top, seq & SEQ_LOW_MASK, size) == seq


def rfc_a22(top: int, seq_low: int, size: int) -> int:
    """RFC 4303 A2.2 as written: case A (Tl >= W - 1) and case B, with Th + 1 and Th - 1."""
    top_low, top_high = top & SEQ_LOW_MASK, top >> 32
    bottom_low = (top_low - size + 1) & SEQ_LOW_MASK
    if top_low >= size - 1:
        high = top_high if seq_low >= bottom_low else top_high + 1
    else:
        high = top_high - 1 if seq_low >= bottom_low else top_high
    return (high << 32) + seq_low


@settings(max_examples=2000)
@given(
    top=st.one_of(st.integers(0, SEQ_MAX_ESN), st.integers(0, 8192).map(lambda n: (n >> 12) * B + (n & 4095) - 2048)),
    seq_low=st.one_of(st.integers(0, SEQ_LOW_MASK), st.integers(0, 8192), st.integers(B - 8192, B - 1)),
    size=st.sampled_from(SIZES),
)
def test_one_line_inference_is_the_rfc_case_analysis(top: int, seq_low: int, size: int) -> None:
    """infer_esn counts from the window's bottom edge; the RFC's two cases must give the same number."""
    top = max(top, 0)
    assert infer_esn(top, seq_low, size) == rfc_a22(top, seq_low, size)
    window = ReplayWindow(size)
    window.top = top
    assert window.infer(seq_low) == rfc_a22(top, seq_low, size)
