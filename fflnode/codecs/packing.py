"""Dense bit packing of small unsigned integers: codes and indices on the wire.

Owns the layout of every sub-byte field the codecs send. `count` integers of `bits` bits
each are stored as `bits` bit planes, plane p holding bit p of every integer, packed
8 per byte, least significant bit first (numpy `bitorder="little"`): a uint8 array of
shape (bits, ceil(count / 8)). So b-bit codes cost exactly b bits per coordinate plus at
most 7 bits of padding per plane, and uint8 is on every wire whitelist.

Promise: `unpack(pack(v, bits), bits, count) == v` for v < 2**bits; `unpack` rejects
(FormatError) arrays of the wrong dtype or shape and planes whose padding bits are set,
so every encoding has exactly one byte representation.
"""

from __future__ import annotations

import numpy as np

from fflnode.errors import FormatError

MAX_BITS = 32  # indices of a chunk fit 31 bits; codes use at most 8


def packed_shape(bits: int, count: int) -> tuple[int, int]:
    """Shape of the uint8 planes holding `count` integers of `bits` bits."""
    return bits, -(-count // 8)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """(bits, ceil(n/8)) uint8 planes of the non-negative integers `values` (< 2**bits)."""
    if not 1 <= bits <= MAX_BITS:
        raise FormatError(f"cannot pack {bits}-bit fields: bits must be in [1, {MAX_BITS}]")
    v = np.ascontiguousarray(values).reshape(-1)
    if (
        bits == 1
        and v.dtype in (np.bool_, np.uint8)
        and (v.dtype == np.bool_ or v.max(initial=0) <= 1)
    ):
        return np.packbits(v.view(np.bool_), bitorder="little")[None, :]
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise FormatError(f"values outside [0, 2**{bits}) cannot be packed in {bits} bits")
    v = v.astype(np.uint32 if bits > 8 else np.uint8, copy=False)
    shifts = np.arange(bits, dtype=v.dtype)[:, None]
    planes = ((v[None, :] >> shifts) & 1).astype(np.uint8)
    return np.packbits(planes, axis=1, bitorder="little")


def check_padding(planes: np.ndarray, count: int) -> None:
    """FormatError unless every bit after the first `count` of each plane is zero."""
    spare = planes.shape[-1] * 8 - count
    if spare and np.any(planes[:, -1] >> np.uint8(8 - spare)):
        raise FormatError(f"packed field has padding bits set after {count} values")


def unpack(planes: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The `count` integers stored in `planes` (uint8 if bits <= 8, else int64)."""
    expected = packed_shape(bits, count)
    if planes.dtype != np.uint8 or planes.shape != expected:
        raise FormatError(
            f"packed {bits}-bit field of {count} values must be uint8{list(expected)}, "
            f"got {planes.dtype}{list(planes.shape)}"
        )
    check_padding(planes, count)
    flat = np.unpackbits(planes, axis=1, count=count, bitorder="little")
    if bits == 1:
        return flat[0]
    if bits <= 8:
        out = np.zeros(count, dtype=np.uint8)
        for p in range(bits):
            out |= flat[p] << np.uint8(p)
        return out
    out64 = np.zeros(count, dtype=np.int64)
    for p in range(bits):
        out64 |= flat[p].astype(np.int64) << p
    return out64
