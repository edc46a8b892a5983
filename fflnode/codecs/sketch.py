"""The `sketch` codec: a linear shift-fold count sketch, decoded by heavy-hitter recovery.

Owns the linear encoding of a chunk: P x (fflnode.sketch.countsketch), R rows of ~width
float32 buckets. Linearity is the point: peers that share (seed, round, chunk) can add
their sketches (`SketchCodec.sum`) and recover the heavy coordinates of the *sum* once,
and inner products of sketches estimate similarity of updates. Decoding takes the median
over rows of each coordinate's estimate and keeps at most the `heavy` fraction with the
largest magnitude, and only those above `threshold` times the collision noise of a row;
everything else decodes to 0. That is biased (and poor on dense updates,
whose coordinates drown in the collision noise ~||x|| / sqrt(width)): run it under
error feedback, and prefer `holo` to ship a dense update.

Wire (exact): one float32 vector of sum(widths) bucket values, widths fixed by
(seed, round, chunk) and the config, so the receiver knows the shape. No meta.
"""

from __future__ import annotations

import numpy as np
import torch

from fflnode.codecs._checks import check_context, check_finite, check_no_meta
from fflnode.codecs.base import ChunkContext, Codec, Encoded, register_codec
from fflnode.errors import ConfigError, FormatError
from fflnode.sketch.countsketch import DEFAULT_ROWS, MAX_ROWS, MIN_WIDTH, ShiftFoldSketch
from fflnode.sketch.rng import ChunkSeed

DEFAULT_RATIO = 1 / 32  # sketch floats per coordinate: ~1 bit per parameter
DEFAULT_HEAVY = 0.01  # at most this fraction of coordinates is recovered
# Only estimates above THRESHOLD x the collision noise of one row (||Px|| / sqrt(width))
# are recovered: a coordinate below it is noise as often as signal, and feeding that
# noise back through error feedback made the residual grow without bound (measured on
# GRU deltas: NMSE 4e5 after 8 rounds without the threshold).
DEFAULT_THRESHOLD = 3.0


class SketchCodec(Codec):
    """make_codec("sketch", ratio=1/32, rows=5, heavy=0.01) or with an explicit width."""

    name = "sketch"

    def __init__(
        self,
        ratio: float = DEFAULT_RATIO,
        rows: int = DEFAULT_ROWS,
        heavy: float = DEFAULT_HEAVY,
        threshold: float = DEFAULT_THRESHOLD,
        width: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if width is None and not 0 < ratio <= 1:
            raise ConfigError(f"sketch: ratio must be in (0, 1], got {ratio!r}")
        if not isinstance(rows, int) or not 1 <= rows <= MAX_ROWS:
            raise ConfigError(f"sketch: rows must be an integer in [1, {MAX_ROWS}], got {rows!r}")
        if not 0 < heavy <= 1:
            raise ConfigError(f"sketch: heavy must be in (0, 1], got {heavy!r}")
        if not threshold >= 0:
            raise ConfigError(f"sketch: threshold must be >= 0, got {threshold!r}")
        self.threshold = threshold
        self.ratio = ratio
        self.rows = rows
        self.heavy = heavy
        self.width = width
        self.device = torch.device(device or "cpu")
        self.sketcher(ChunkContext(0, 0, 0, 1 << 20))  # reject bad rows / width now

    @property
    def biased(self) -> bool:
        return True

    def sketcher(self, ctx: ChunkContext) -> ShiftFoldSketch:
        """The sketch operator of a chunk (its widths depend on seed, round and chunk)."""
        check_context(self.name, ctx)
        per_row = round(self.ratio * ctx.numel / self.rows)
        width = self.width or max(MIN_WIDTH, 2 * self.rows, per_row)
        where = ChunkSeed(ctx.seed, ctx.round, ctx.chunk)
        return ShiftFoldSketch(width, self.rows, where, self.device)

    def part_spec(self, ctx: ChunkContext) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"sketch": ("<f4", (self.sketcher(ctx).size,))}

    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> Encoded:
        x = chunk.detach().to(self.device, torch.float32).reshape(-1)
        if x.numel() != ctx.numel:
            raise FormatError(f"sketch: chunk has {x.numel()} elements, context says {ctx.numel}")
        sketch = self.sketcher(ctx).project(x).cpu().numpy()
        if not np.isfinite(sketch).all():  # a NaN or inf in x reaches R buckets
            raise FormatError(f"sketch: chunk {ctx.chunk} has non-finite values")
        return Encoded(self.name, {"sketch": sketch})

    def validate(self, enc: Encoded, ctx: ChunkContext) -> None:
        super().validate(enc, ctx)
        check_no_meta(self.name, enc)
        check_finite(self.name, "sketch", enc.parts["sketch"])

    def recover(self, sketch: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """The heavy-hitter estimate (numel,) from a sketch of this chunk, or of a sum."""
        op = self.sketcher(ctx)
        count = max(1, round(self.heavy * ctx.numel))
        sketch = sketch.to(self.device)
        floor = self.threshold * op.noise_level(sketch)
        idx, values = op.heavy_hitters(sketch, ctx.numel, count, floor)
        out = torch.zeros(ctx.numel)
        out[idx.cpu()] = values.cpu()
        return out

    def decode(self, enc: Encoded, ctx: ChunkContext) -> torch.Tensor:
        self.validate(enc, ctx)
        return self.recover(torch.from_numpy(np.ascontiguousarray(enc.parts["sketch"])), ctx)

    def sum(self, encodings: list[Encoded], ctx: ChunkContext) -> Encoded:
        """The encoding of the sum of the chunks behind `encodings` (all validated first):
        the sketch of a sum is the sum of the sketches."""
        if not encodings:
            raise FormatError("sketch: cannot sum zero encodings")
        total = np.zeros(self.sketcher(ctx).size, dtype=np.float64)
        for enc in encodings:
            self.validate(enc, ctx)
            total += enc.parts["sketch"]
        return Encoded(self.name, {"sketch": total.astype(np.float32)})


register_codec(SketchCodec.name, SketchCodec)
