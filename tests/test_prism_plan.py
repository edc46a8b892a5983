"""Read planning (sans-IO): aligned covers that hand out exact, whole-element slices."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fflnode.prism.plan import plan_reads, plan_writes

ALIGN = 4096
REQUEST = 16 * ALIGN


@st.composite
def ranges(draw: st.DrawFn) -> tuple[int, int, int, int]:
    itemsize = draw(st.sampled_from([1, 2, 4, 8]))
    origin = draw(st.integers(0, 3 * ALIGN))
    first = draw(st.integers(0, 40 * ALIGN // itemsize))
    count = draw(st.integers(0, 40 * ALIGN // itemsize))
    return origin + first * itemsize, origin + (first + count) * itemsize, itemsize, origin


@settings(max_examples=300, deadline=None)
@given(ranges(), st.sampled_from([2 * ALIGN, 3 * ALIGN, REQUEST]))
def test_slices_tile_the_range_with_aligned_bounded_reads(
    case: tuple[int, int, int, int], request: int
) -> None:
    start, stop, itemsize, origin = case
    reads = list(
        plan_reads(
            start, stop, request_bytes=request, align=ALIGN, itemsize=itemsize, origin=origin
        )
    )
    pos = start
    for i, r in enumerate(reads):
        assert r.index == i
        assert r.lo == pos and r.hi > r.lo, "slices are non-empty and back to back"
        assert r.offset % ALIGN == 0 and r.length % ALIGN == 0
        assert 0 < r.length <= request
        assert r.offset <= r.lo and r.hi <= r.offset + r.length, "the read covers its slice"
        assert (r.lo - origin) % itemsize == 0 and (r.hi - origin) % itemsize == 0
        pos = r.hi
    assert pos == stop


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1 << 30), st.integers(0, 1 << 24))
def test_aligned_elements_never_reread_a_byte(start: int, length: int) -> None:
    start -= start % 4
    length -= length % 4
    reads = list(
        plan_reads(start, start + length, request_bytes=1 << 20, align=ALIGN, itemsize=4, origin=0)
    )
    for a, b in zip(reads, reads[1:], strict=False):
        assert a.offset + a.length == b.offset, "consecutive reads touch, never overlap"


def test_misaligned_elements_reread_less_than_a_page() -> None:
    # Elements of 4 bytes starting at byte 1: no 4 KiB boundary is an element boundary.
    reads = list(plan_reads(1, 1 + 4 * 100_000, request_bytes=2 * ALIGN, align=ALIGN, itemsize=4))
    for a, b in zip(reads, reads[1:], strict=False):
        overlap = a.offset + a.length - b.offset
        assert 0 < overlap <= ALIGN


def test_an_empty_range_plans_no_read() -> None:
    assert list(plan_reads(4096, 4096, request_bytes=REQUEST, align=ALIGN)) == []


@pytest.mark.parametrize(
    ("start", "stop", "kwargs"),
    [
        (0, 10, {"request_bytes": ALIGN, "align": ALIGN}),  # request under two pages
        (0, 10, {"request_bytes": REQUEST + 1, "align": ALIGN}),  # request not aligned
        (2, 10, {"request_bytes": REQUEST, "align": ALIGN, "itemsize": 4, "origin": 0}),
        (0, 10, {"request_bytes": REQUEST, "align": ALIGN, "itemsize": 4}),  # partial element
        (10, 2, {"request_bytes": REQUEST, "align": ALIGN}),
    ],
)
def test_plans_that_cannot_hand_out_whole_elements_are_refused(
    start: int, stop: int, kwargs: dict[str, int]
) -> None:
    with pytest.raises(ValueError):
        plan_reads(start, stop, **kwargs)


# ------------------------------------------------------------------------------ writes


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 20 * ALIGN),
    st.integers(0, 40 * ALIGN),
    st.sampled_from([ALIGN, 3 * ALIGN, REQUEST]),
    st.booleans(),
)
def test_writes_cover_every_byte_once_and_only_edges_are_unaligned(
    start: int, count: int, request: int, pad: bool
) -> None:
    stop = start + count
    writes = list(plan_writes(start, stop, request_bytes=request, align=ALIGN, pad=pad))
    pos = start
    for w in writes:
        assert w.offset == pos, "requests are in file order, back to back"
        assert 0 < w.data <= w.length <= request
        if w.aligned:
            assert w.offset % ALIGN == 0 and w.length % ALIGN == 0
        else:
            assert w.length < ALIGN and w.data == w.length, "an unaligned edge is under a block"
        if w.length > w.data:
            assert pad and w is writes[-1] and (w.offset + w.length) % ALIGN == 0
        pos += w.data
    assert pos == stop, "the data tiles the range exactly"
    unaligned = [w for w in writes if not w.aligned]
    assert len(unaligned) <= (1 if pad else 2)
    if start % ALIGN == 0:
        assert not pad or not unaligned, "an aligned start with pad is O_DIRECT end to end"
        assert all(w.aligned for w in writes[:-1])


def test_write_edges_share_no_aligned_block_with_the_middle() -> None:
    writes = list(plan_writes(100, 3 * ALIGN + 7, request_bytes=REQUEST, align=ALIGN))
    assert [(w.offset, w.length, w.aligned) for w in writes] == [
        (100, ALIGN - 100, False),
        (ALIGN, 2 * ALIGN, True),
        (3 * ALIGN, 7, False),
    ]
    padded = list(plan_writes(0, 10, request_bytes=REQUEST, align=ALIGN, pad=True))
    assert [(w.offset, w.length, w.data, w.aligned) for w in padded] == [(0, ALIGN, 10, True)]
    assert list(plan_writes(5, 5, request_bytes=REQUEST, align=ALIGN)) == []


def test_write_plans_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match="multiple"):
        plan_writes(0, 10, request_bytes=ALIGN + 1, align=ALIGN)
    with pytest.raises(ValueError, match="byte range"):
        plan_writes(10, 5, request_bytes=ALIGN, align=ALIGN)
