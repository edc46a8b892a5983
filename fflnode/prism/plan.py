"""Read planning, sans-IO: which aligned reads cover a byte range, and what each hands out.

A tensor rarely starts on a 4 KiB boundary, and O_DIRECT reads only aligned spans, so a
byte range [start, stop) is read as aligned covers and each cover hands the consumer an
exact slice. Slices are whole elements (for a tensor of itemsize k they start and stop
on element boundaries), so every chunk can be viewed as an array without copying.

Promise: the slices of `plan_reads` are non-empty, in order, back to back, and exactly
tile [start, stop); every read is `align`-aligned in offset and length and at most
`request_bytes` long. When elements are aligned (the usual case) consecutive reads do
not overlap; otherwise a read starts at the page holding the first element the previous
one could not finish, re-reading less than one page. No I/O, no trio: tested directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Read:
    """One aligned read: file bytes [offset, offset + length), handing out [lo, hi)."""

    index: int
    offset: int
    length: int
    lo: int
    hi: int


def plan_reads(
    start: int,
    stop: int,
    *,
    request_bytes: int,
    align: int,
    itemsize: int = 1,
    origin: int | None = None,
) -> Iterator[Read]:
    """Aligned reads covering bytes [start, stop), each slice whole elements.

    Elements of `itemsize` bytes start at `origin` (default `start`); `start` and `stop`
    must fall on element boundaries. `request_bytes` must be a multiple of `align`
    and at least two alignment units, so that every read hands out at least one element.
    """
    if align < 1 or request_bytes % align or request_bytes < 2 * align:
        raise ValueError(
            f"request of {request_bytes} bytes must be a multiple of {align} and at least "
            f"{2 * align} bytes"
        )
    if not 1 <= itemsize <= align:
        raise ValueError(f"itemsize {itemsize} must be between 1 and the {align}-byte alignment")
    origin = start if origin is None else origin
    if not 0 <= start <= stop:
        raise ValueError(f"range [{start}, {stop}) is not a byte range")
    if (start - origin) % itemsize or (stop - start) % itemsize:
        raise ValueError(
            f"range [{start}, {stop}) is not whole {itemsize}-byte elements from byte {origin}"
        )
    return _plan(start, stop, request_bytes, align, itemsize)


def _plan(start: int, stop: int, request_bytes: int, align: int, itemsize: int) -> Iterator[Read]:
    pos, index = start, 0
    while pos < stop:
        offset = pos - pos % align
        hi = min(stop, offset + request_bytes)
        hi = pos + (hi - pos) // itemsize * itemsize
        end = -(-hi // align) * align
        yield Read(index, offset, end - offset, pos, hi)
        pos, index = hi, index + 1
