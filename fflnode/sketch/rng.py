"""Shared randomness: the random bits every node regenerates from (seed, round, chunk).

Owns the counter hash behind every projection, rotation and sketch in fflnode. A stream
is named by a `StreamKey` derived from (seed, round, chunk, purpose, sub); its i-th
32-bit word is

    word(i) = mix32(mix32(i + k0) ^ k1)          (all arithmetic mod 2**32)

where mix32 is a 32-bit integer finalizer (xor-shift / multiply, the "lowbias32"
constants of Wellons' hash prospector). Any word can be computed on its own, so a tile,
a segment or a row regenerates exactly the randomness it needs, in any order.

Promise: the words are bit-identical on every device and platform. The torch version
runs in int32 only: multiplication wraps, and the logical right shifts the hash needs are
emulated on signed int32 with masks (`(x >> s) & (2**(32-s) - 1)`), since torch shifts
signed integers arithmetically. int32, never int64: int64 shifts are ~20x slower on the
CPU (DESIGN.md). Keys are derived in exact Python integers. `tests/test_sketch_rng.py`
checks the torch words against a plain numpy uint32 reference and pins golden values.

Must never: use torch.Generator or any library RNG for shared randomness (CPU mt19937
and CUDA Philox differ), or turn bits into floats before they are fixed (only exact
integer-to-float conversions of the final bits are allowed, e.g. a bit to +-1.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from fflnode.errors import ConfigError

MASK32 = 0xFFFFFFFF
# lowbias32 (Wellons, hash prospector): a bijective 32-bit finalizer with low bias.
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B
SHIFT1, SHIFT2, SHIFT3 = 16, 15, 16
# Key schedule: golden-ratio increment and two starting words (hex digits of pi) so
# that k0 and k1 come from two differently seeded absorption chains.
WEYL = 0x9E3779B9
KEY_INIT0 = 0x243F6A88
KEY_INIT1 = 0x85A308D3
# A stream is indexed by an int32 counter; one stream never holds more words.
COUNTER_LIMIT = 1 << 31
# seed, round and chunk are absorbed as two 32-bit words each.
MAX_KEY_PART = 1 << 64
BITS_PER_WORD = 32


class Purpose(IntEnum):
    """What a stream is for: distinct purposes never share words."""

    ROTATION_SIGNS = 1
    ROTATION_SHIFT = 2
    SKETCH_WIDTHS = 3
    SKETCH_SIGNS = 4
    GAUSSIAN = 5


def to_int32(v: int) -> int:
    """The signed int32 with the same 32 bits as `v mod 2**32`."""
    v &= MASK32
    return v - (1 << 32) if v >= 1 << 31 else v


def mix32_int(v: int) -> int:
    """mix32 on a Python int (exact; the reference for keys and scalar draws)."""
    v &= MASK32
    v ^= v >> SHIFT1
    v = (v * MUL1) & MASK32
    v ^= v >> SHIFT2
    v = (v * MUL2) & MASK32
    v ^= v >> SHIFT3
    return v


_MUL1_I32 = to_int32(MUL1)
_MUL2_I32 = to_int32(MUL2)


def _xor_lsr_(x: torch.Tensor, s: int) -> None:
    """x ^= x >>> s on int32, in place; the logical shift emulated with a mask."""
    x.bitwise_xor_((x >> s).bitwise_and_((1 << (32 - s)) - 1))


def mix32_(x: torch.Tensor) -> torch.Tensor:
    """mix32 applied in place to an int32 tensor (any device); returns `x`."""
    if x.dtype != torch.int32:
        raise TypeError(f"mix32_ needs an int32 tensor, got {x.dtype}")
    _xor_lsr_(x, SHIFT1)
    x.mul_(_MUL1_I32)
    _xor_lsr_(x, SHIFT2)
    x.mul_(_MUL2_I32)
    _xor_lsr_(x, SHIFT3)
    return x


def _words_of(value: int, what: str) -> tuple[int, int]:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_KEY_PART:
        raise ConfigError(f"{what} must be an integer in [0, 2**64), got {value!r}")
    return value & MASK32, value >> 32


@dataclass(frozen=True)
class StreamKey:
    """A stream of 32-bit words; `k0`, `k1` are unsigned 32-bit key words."""

    k0: int
    k1: int

    @classmethod
    def derive(cls, seed: int, round: int, chunk: int, purpose: int, sub: int = 0) -> StreamKey:
        """The stream for (seed, round, chunk, purpose, sub); all parts in [0, 2**64)."""
        parts = [("seed", seed), ("round", round), ("chunk", chunk)]
        parts += [("purpose", int(purpose)), ("sub", sub)]
        h0, h1 = KEY_INIT0, KEY_INIT1
        for what, value in parts:
            for w in _words_of(value, what):
                h0 = mix32_int(((h0 ^ w) + WEYL) & MASK32)
                h1 = mix32_int(((h1 ^ w) + WEYL) & MASK32)
        return cls(h0, h1)

    def word(self, i: int) -> int:
        """Word `i` of the stream as an unsigned Python int."""
        _check_range(i, 1)
        return mix32_int(mix32_int((i + self.k0) & MASK32) ^ self.k1)

    def words(self, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Words [start, start + count) as int32 (same bits as `word`), on `device`."""
        _check_range(start, count)
        x = torch.arange(start, start + count, dtype=torch.int32, device=device)
        x.add_(to_int32(self.k0))
        mix32_(x)
        x.bitwise_xor_(to_int32(self.k1))
        return mix32_(x)

    def below(self, i: int, n: int) -> int:
        """An integer in [0, n) from word `i` (multiply-shift; n <= 2**32)."""
        if not 0 < n <= 1 << 32:
            raise ConfigError(f"draw below {n}: bound must be in (0, 2**32]")
        return (self.word(i) * n) >> 32

    def signs(
        self,
        start_bit: int,
        count: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """+-1 for bits [start_bit, start_bit + count): bit j of word w is sign 32*w + j
        (least significant bit first); a 0 bit is +1, a 1 bit is -1."""
        if count < 0 or start_bit < 0:
            raise ConfigError(f"sign bits [{start_bit}, {start_bit + count}) out of range")
        w0 = start_bit // BITS_PER_WORD
        w1 = -(-(start_bit + count) // BITS_PER_WORD)
        w = self.words(w0, max(w1 - w0, 0), device)
        shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=device)
        bits = (w.unsqueeze(1) >> shifts).bitwise_and_(1)
        s = bits.mul_(-2).add_(1).reshape(-1)
        lo = start_bit - w0 * BITS_PER_WORD
        return s[lo : lo + count].to(dtype)


def signs_rows(
    keys: list[StreamKey],
    start_bits: list[int],
    count: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(len(keys), count) signs: row r is `keys[r].signs(start_bits[r], count)`.

    One batched computation for all rows: a row's words cost what one key's do
    (tiny tensors are dominated by per-operation overhead, ~4 us each here).
    """
    rows = len(keys)
    if rows != len(start_bits) or count < 0 or min(start_bits, default=0) < 0:
        raise ConfigError(f"sign rows: {rows} keys, {len(start_bits)} starts, count {count}")
    w0 = [b // BITS_PER_WORD for b in start_bits]
    w1 = [-(-(b + count) // BITS_PER_WORD) for b in start_bits]
    nw = max((b - a for a, b in zip(w0, w1, strict=True)), default=0)
    for w in w0:
        _check_range(w, nw)
    x = torch.arange(nw, dtype=torch.int32, device=device).repeat(rows, 1)
    k0 = [to_int32(k.k0 + w) for k, w in zip(keys, w0, strict=True)]
    x.add_(torch.tensor(k0, dtype=torch.int32, device=device)[:, None])
    mix32_(x)
    k1 = torch.tensor([to_int32(k.k1) for k in keys], dtype=torch.int32, device=device)
    x.bitwise_xor_(k1[:, None])
    mix32_(x)
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=device)
    bits = (x.unsqueeze(2) >> shifts).bitwise_and_(1).mul_(-2).add_(1).reshape(rows, -1)
    out = torch.empty(rows, count, dtype=dtype, device=device)
    for r, (b, w) in enumerate(zip(start_bits, w0, strict=True)):
        lo = b - w * BITS_PER_WORD
        out[r] = bits[r, lo : lo + count]
    return out


def _check_range(start: int, count: int) -> None:
    if start < 0 or count < 0 or start + count > COUNTER_LIMIT:
        raise ConfigError(
            f"stream words [{start}, {start + count}) exceed the {COUNTER_LIMIT}-word counter"
        )


@dataclass(frozen=True)
class ChunkSeed:
    """Where shared randomness comes from: the run seed, the round and the chunk index."""

    seed: int
    round: int
    chunk: int

    def key(self, purpose: Purpose, sub: int = 0) -> StreamKey:
        return StreamKey.derive(self.seed, self.round, self.chunk, purpose, sub)
