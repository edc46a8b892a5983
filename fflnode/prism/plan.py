"""Read and write planning, sans-IO: which aligned requests cover a byte range.

A tensor rarely starts on a 4 KiB boundary, and O_DIRECT reads only aligned spans, so a
byte range [start, stop) is read as aligned covers and each cover hands the consumer an
exact slice. Slices are whole elements (for a tensor of itemsize k they start and stop
on element boundaries), so every chunk can be viewed as an array without copying.

Promise: the slices of `plan_reads` are non-empty, in order, back to back, and exactly
tile [start, stop); every read is `align`-aligned in offset and length and at most
`request_bytes` long. When elements are aligned (the usual case) consecutive reads do
not overlap; otherwise a read starts at the page holding the first element the previous
one could not finish, re-reading less than one page. No I/O, no trio: tested directly.

Writes (`plan_writes`) cannot re-read: a write owns exactly its bytes. The aligned middle
of a range goes out in aligned requests (O_DIRECT); an unaligned head or tail, shorter
than one alignment unit, is its own unaligned request, which the writer sends through
the page cache. Why not pad the last block and ftruncate, or read-modify-write the edge
blocks: padding clobbers whatever follows the range inside its last block, and a
read-modify-write of a block shared by two writes in flight at once loses one of them;
the page cache merges edge bytes of neighbouring writes exactly, needs no read, leaves
the file exactly `stop` bytes long when the range ends it, and costs at most two
partial pages of cache per range. A caller that owns the bytes after the range up to
the next boundary (the block store pads its regions) asks for `pad=True`: the tail is
then written O_DIRECT, zero-padded to the boundary.
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


@dataclass(frozen=True, slots=True)
class Write:
    """One write: file bytes [offset, offset + length) from source bytes
    [offset - start, offset - start + data); bytes past `data` are zero padding.
    `aligned`: offset and length are multiples of the alignment (O_DIRECT may carry it)."""

    offset: int
    length: int
    data: int
    aligned: bool


def plan_writes(
    start: int, stop: int, *, request_bytes: int, align: int, pad: bool = False
) -> Iterator[Write]:
    """Requests covering bytes [start, stop): an unaligned head, aligned requests of at
    most `request_bytes`, an unaligned tail (or, with `pad`, an aligned tail padded to the
    next boundary). Every source byte is in exactly one request, in file order."""
    if align < 1 or request_bytes % align or request_bytes < align:
        raise ValueError(f"request of {request_bytes} bytes must be a positive multiple of {align}")
    if not 0 <= start <= stop:
        raise ValueError(f"range [{start}, {stop}) is not a byte range")
    return _plan_writes(start, stop, request_bytes, align, pad)


def _plan_writes(
    start: int, stop: int, request_bytes: int, align: int, pad: bool
) -> Iterator[Write]:
    head = min(stop, -(-start // align) * align)  # first aligned byte (or stop)
    tail = max(head, stop - stop % align)  # last aligned boundary at or before stop
    if head > start:
        yield Write(start, head - start, head - start, False)
    # With pad, an unaligned tail joins the aligned requests, zero-filled to the boundary.
    end = -(-stop // align) * align if pad and stop > tail else tail
    pos = head
    while pos < end:
        length = min(request_bytes, end - pos)
        yield Write(pos, length, min(length, stop - pos), True)
        pos += length
    if not pad and stop > tail:
        yield Write(tail, stop - tail, stop - tail, False)
