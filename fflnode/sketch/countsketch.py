"""The shift-fold count sketch: a linear, summable projection into R rows of buckets.

Owns the structured count sketch that peers sum and recover heavy hitters from. Row r
has its own width k_r (seeded, distinct, in (width - jitter, width], jitter <= 64);
element i of the vector lands in bucket (i mod k_r) of row r with sign u_r[i div k_r]:
one seeded sign per segment of k_r consecutive elements. So row r is the vector folded
into k_r buckets with its segments' signs, u_r^T X_r where X_r is the vector viewed as
(segments, k_r): one matrix-vector product per row, done tile by tile in the L2 cache.
Random values per chunk: R widths plus R * ceil(n / k) segment signs (a few per
thousand elements), against n * R hashes for a hashed count sketch.

Why it is a count sketch. Two elements share a bucket of row r only when they are a
multiple of k_r apart, hence in different segments, so their relative sign is a fair
coin: E[(Px)_i-estimate] = x_i and E||Px||^2 = ||x||^2. Distinct widths make collisions
differ between rows (elements colliding in row r and r' are lcm(k_r, k_r') apart), so a
median over rows rejects what collides in one row; neighbours (closer than width - jitter)
never collide.

Scaling: the sketch stores P x with P = [C_1; ...; C_R] / sqrt(R) (C_r the +-1 fold of row
r), so ||Px||^2 estimates ||x||^2, and P^T is the adjoint. A per-row estimate of x_i is
sqrt(R) u_r[q] (Px)_r[i mod k_r]; heavy hitters take the median over rows.

Promise: linear in x (sketches of peers sharing (seed, round, chunk) add up to the
sketch of the sum, up to float rounding); `accumulate` at any offsets, in any piece
sizes, equals one `project` of the whole vector up to rounding; randomness is
bit-identical on every device. Memory: projecting and the adjoint need one sign per
segment and row beyond their input and output; median estimates add rows x TILE floats.
Must never: draw randomness from anything but fflnode.sketch.rng.
"""

from __future__ import annotations

import math

import torch

from fflnode.errors import ConfigError, FormatError
from fflnode.sketch.rng import ChunkSeed, Purpose, signs_rows

DEFAULT_ROWS = 5  # odd, so the median over rows is a single row's value
MAX_ROWS = 64
MIN_WIDTH = 8
MAX_WIDTH = 1 << 30
# Widths are drawn from (width - jitter, width], jitter = min(64, max(rows, width / 8)):
# enough distinct widths to separate the rows' collisions while the rows stay within
# 1/8 (and 64 buckets) of the nominal width.
MAX_WIDTH_JITTER = 64
WIDTH_JITTER_FRACTION = 8
# Elements per cache tile: 1 MiB of float32, so rows 2..R read the tile from L2.
# Measured here: 0.78x a numpy copy at k=1024 with 2**18, 0.41x without tiling.
TILE = 1 << 18
# Elements per step when scanning a range for heavy hitters: (R, STEP) estimates.
SCAN_STEP = 1 << 18
MEDIAN_SCRATCH_ROWS = 3  # temporaries of the 5-input median network


class ShiftFoldSketch:
    """R rows of buckets of widths `widths`, flat in one float32 vector of `size`.

    Row r occupies [offsets[r], offsets[r] + widths[r]) of a sketch vector.
    """

    def __init__(
        self,
        width: int,
        rows: int = DEFAULT_ROWS,
        where: ChunkSeed | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not 1 <= rows <= MAX_ROWS:
            raise ConfigError(f"sketch rows must be in [1, {MAX_ROWS}], got {rows}")
        jitter = min(MAX_WIDTH_JITTER, max(rows, width // WIDTH_JITTER_FRACTION))
        if not MIN_WIDTH <= width <= MAX_WIDTH or 2 * jitter > width:
            raise ConfigError(
                f"sketch width must be in [{max(MIN_WIDTH, 2 * rows)}, {MAX_WIDTH}] for "
                f"{rows} rows, got {width}"
            )
        self.where = where or ChunkSeed(0, 0, 0)
        self.rows = rows
        self.width = width
        self.device = torch.device(device or "cpu")
        # Seeded partial Fisher-Yates shuffle of range(jitter): distinct offsets per row.
        key = self.where.key(Purpose.SKETCH_WIDTHS)
        pool = list(range(jitter))
        for r in range(rows):
            j = r + key.below(r, jitter - r)
            pool[r], pool[j] = pool[j], pool[r]
        self.widths: tuple[int, ...] = tuple(width - o for o in pool[:rows])
        self.offsets: tuple[int, ...] = tuple(sum(self.widths[:r]) for r in range(rows))
        self.size = sum(self.widths)
        self.scale = 1.0 / math.sqrt(rows)
        self._keys = [self.where.key(Purpose.SKETCH_SIGNS, r) for r in range(rows)]

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.size, device=self.device)

    def row(self, sketch: torch.Tensor, r: int) -> torch.Tensor:
        return sketch[self.offsets[r] : self.offsets[r] + self.widths[r]]

    def _check_sketch(self, sketch: torch.Tensor) -> None:
        if sketch.shape != (self.size,) or sketch.dtype != torch.float32:
            raise FormatError(
                f"sketch must be float32[{self.size}], got {sketch.dtype}{list(sketch.shape)}"
            )

    def _segment_signs(self, offset: int, length: int) -> tuple[list[int], torch.Tensor]:
        """First segment of each row and the signs of the segments [offset, offset+length)
        touches: (rows, count) with count the largest number over rows."""
        first = [offset // k for k in self.widths]
        last = [(offset + length - 1) // k for k in self.widths]
        count = max(b - a + 1 for a, b in zip(first, last, strict=True))
        return first, signs_rows(self._keys, first, count, self.device)

    def accumulate(self, sketch: torch.Tensor, piece: torch.Tensor, offset: int) -> torch.Tensor:
        """sketch += P[:, offset : offset + len(piece)] @ piece, in place; returns sketch.

        `piece` is float32 elements [offset, offset + len) of the vector being sketched.
        """
        self._check_sketch(sketch)
        if piece.dim() != 1 or piece.dtype != torch.float32 or offset < 0:
            raise FormatError(f"sketch piece must be 1-D float32 at offset >= 0, got {offset}")
        length = piece.numel()
        if length == 0:
            return sketch
        piece = piece.to(self.device).contiguous()
        first, u = self._segment_signs(offset, length)
        for lo in range(0, length, TILE):
            hi = min(length, lo + TILE)
            for r, k in enumerate(self.widths):
                row = self.row(sketch, r)
                self._fold_into(row, piece[lo:hi], offset + lo, k, u[r], first[r])
        return sketch

    def _fold_into(
        self, row: torch.Tensor, x: torch.Tensor, start: int, k: int, u: torch.Tensor, q_first: int
    ) -> None:
        """row[(start + i) mod k] += scale * u[(start + i) div k - q_first] * x[i]."""
        q, p = divmod(start, k)
        q -= q_first
        n = x.numel()
        head = min(k - p, n) if p else 0
        if head:
            row[p : p + head].addcmul_(x[:head], u[q : q + 1], value=self.scale)
            q += 1
        body = (n - head) // k
        if body:
            segments = x[head : head + body * k].view(body, k)
            row.addmv_(segments.t(), u[q : q + body], alpha=self.scale)
            q += body
        tail = n - head - body * k
        if tail:
            row[:tail].addcmul_(x[n - tail :], u[q : q + 1], value=self.scale)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """P x for a whole vector x (float32, 1-D)."""
        return self.accumulate(self.zeros(), x, 0)

    def _unfold_into(
        self,
        out: torch.Tensor,
        y: torch.Tensor,
        start: int,
        k: int,
        u: torch.Tensor,
        q_first: int,
        accumulate: bool,
    ) -> None:
        """out[i] (+)= u[(start + i) div k - q_first] * y[(start + i) mod k]: one row's
        contribution to elements [start, start + len(out))."""
        n = out.numel()
        q, p = divmod(start, k)
        q -= q_first
        head = min(k - p, n) if p else 0
        pieces = []
        if head:
            pieces.append((out[:head], y[p : p + head], u[q : q + 1]))
            q += 1
        body = (n - head) // k
        if body:
            pieces.append(
                (out[head : head + body * k].view(body, k), y[None, :], u[q : q + body, None])
            )
            q += body
        tail = n - head - body * k
        if tail:
            pieces.append((out[n - tail :], y[:tail], u[q : q + 1]))
        for dst, values, signs in pieces:
            if accumulate:
                dst.addcmul_(values, signs)
            else:
                torch.mul(values, signs, out=dst)

    def _prepare(self, sketch: torch.Tensor, offset: int, length: int) -> torch.Tensor:
        self._check_sketch(sketch)
        if offset < 0 or length < 1:
            raise FormatError(f"estimate range [{offset}, {offset + length}) is empty or negative")
        return sketch.to(self.device)

    def row_estimates(
        self, sketch: torch.Tensor, offset: int, length: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(rows, length): row r's estimate sqrt(R) u_r[q] (Px)_r[i mod k_r] of x_i for
        i in [offset, offset + length). Memory: rows x length floats."""
        sketch = self._prepare(sketch, offset, length)
        est = torch.empty(self.rows, length, device=self.device) if out is None else out
        first, u = self._segment_signs(offset, length)
        for r, k in enumerate(self.widths):
            y = self.row(sketch, r) * math.sqrt(self.rows)
            self._unfold_into(est[r], y, offset, k, u[r], first[r], accumulate=False)
        return est

    def _output(self, length: int, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return torch.empty(length, device=self.device)
        if out.shape != (length,) or out.dtype != torch.float32:
            raise FormatError(f"output must be float32[{length}], got {out.dtype}{list(out.shape)}")
        return out

    def adjoint(
        self, y: torch.Tensor, offset: int, length: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(P^T y)[offset : offset + length] for a sketch-shaped y, tile by tile (memory:
        the output only; pass `out` to reuse one)."""
        y = self._prepare(y, offset, length)
        out = self._output(length, out)
        first, u = self._segment_signs(offset, length)
        rows = [self.row(y, r) * self.scale for r in range(self.rows)]
        for lo in range(0, length, TILE):
            part = out[lo : lo + TILE]
            for r, k in enumerate(self.widths):
                self._unfold_into(part, rows[r], offset + lo, k, u[r], first[r], accumulate=r > 0)
        return out

    def estimate(
        self, sketch: torch.Tensor, offset: int, length: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Median over rows of the estimates of x[offset : offset + length] (for an even
        row count, the mean of the two middle rows), tile by tile (memory: the output and
        rows x TILE floats of scratch; pass `out` to reuse an output)."""
        sketch = self._prepare(sketch, offset, length)
        out = self._output(length, out)
        first, u = self._segment_signs(offset, length)
        rows = [self.row(sketch, r) * math.sqrt(self.rows) for r in range(self.rows)]
        width = min(TILE, length)
        est = torch.empty(self.rows, width, device=self.device)
        scratch = torch.empty(MEDIAN_SCRATCH_ROWS, width, device=self.device)
        for lo in range(0, length, TILE):
            n = min(TILE, length - lo)
            for r, k in enumerate(self.widths):
                self._unfold_into(est[r, :n], rows[r], offset + lo, k, u[r], first[r], False)
            _median_rows_into(est[:, :n], out[lo : lo + n], scratch[:, :n])
        return out

    def noise_level(self, sketch: torch.Tensor) -> float:
        """Typical collision noise of one row's estimate: ||Px|| / sqrt(mean width), the
        standard deviation of what the other elements of a bucket add (dense x)."""
        return math.sqrt(self.norm_sq(sketch) * self.rows / self.size)

    def heavy_hitters(
        self, sketch: torch.Tensor, numel: int, count: int, min_magnitude: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to `count` indices in [0, numel) with the largest |median estimate|, at
        least `min_magnitude`, ascending, and their estimates. Scans the range in steps
        of SCAN_STEP (bounded memory)."""
        count = min(count, numel)
        best_i = torch.empty(0, dtype=torch.int64, device=self.device)
        best_v = torch.empty(0, device=self.device)
        for lo in range(0, numel, SCAN_STEP):
            hi = min(numel, lo + SCAN_STEP)
            v = self.estimate(sketch, lo, hi - lo)
            idx = torch.arange(lo, hi, device=self.device)
            if min_magnitude > 0:
                keep = v.abs() >= min_magnitude
                v, idx = v[keep], idx[keep]
            cand_v = torch.cat([best_v, v])
            cand_i = torch.cat([best_i, idx])
            top = cand_v.abs().topk(min(count, cand_v.numel())).indices
            best_v, best_i = cand_v[top], cand_i[top]
        order = best_i.argsort()
        return best_i[order], best_v[order]

    def norm_sq(self, sketch: torch.Tensor) -> float:
        """||Px||^2: the sketch's estimate of ||x||^2."""
        self._check_sketch(sketch)
        return float(sketch.double().square().sum())


def _median_rows_into(est: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """out = median of est over dim 0 (for an even count, the mean of the two middle
    values). 3 and 5 rows use min/max networks in `scratch` (~5x faster than
    torch.median here, and no allocation per tile)."""
    rows = est.shape[0]
    if rows == 1:
        out.copy_(est[0])
    elif rows == 3:
        _median3_into(est[0], est[1], est[2], out, scratch[0])
    elif rows == 5:
        a, b, c, d, e = est
        lo1, hi1, lo2 = scratch[0], scratch[1], scratch[2]
        # Of a..d, the smallest and the largest cannot be the median of five: drop them.
        torch.minimum(a, b, out=lo1)
        torch.maximum(a, b, out=hi1)
        torch.minimum(c, d, out=lo2)
        torch.maximum(lo1, lo2, out=lo1)  # the larger of the two lows
        torch.maximum(c, d, out=lo2)
        torch.minimum(hi1, lo2, out=hi1)  # the smaller of the two highs
        _median3_into(lo1, hi1, e, out, scratch[2])
    elif rows % 2:
        out.copy_(est.median(0).values)
    else:
        mid = est.sort(0).values
        torch.add(mid[rows // 2 - 1], mid[rows // 2], out=out).mul_(0.5)


def _median3_into(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor
) -> None:
    """out = median(a, b, c) = max(min(a, b), min(max(a, b), c)); clobbers tmp, and a or
    b only after reading them."""
    torch.maximum(a, b, out=tmp)
    torch.minimum(tmp, c, out=tmp)
    torch.minimum(a, b, out=out)
    torch.maximum(out, tmp, out=out)
