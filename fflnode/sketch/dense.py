"""A dense Gaussian projection regenerated from the seed: the textbook JL baseline.

Owns `GaussianProjection`, P (k x numel) with i.i.d. N(0, 1/k) entries, which no node
stores: every product regenerates P tile by tile from the counter hash (Box-Muller on
two 24-bit uniforms per entry). It is the reference the structured transforms are
measured against (tools/bench_sketch.py): its cost is O(k) hash-and-transcendental work
per input element, where the shift-fold sketch spends O(R) multiply-adds.

Promise: the integer bits behind P are identical on every device; the Gaussian floats
come from log/cos/sqrt, which may differ in the last bit between CPU and CUDA libraries,
so use it as a benchmark and a statistical reference, never for cross-device agreement.
Memory: one tile of k x COLUMN_TILE floats at a time.
"""

from __future__ import annotations

import math

import torch

from fflnode.errors import ConfigError, FormatError
from fflnode.sketch.rng import ChunkSeed, Purpose

# Columns regenerated per step: k x 4096 float32 is 16 MiB at k = 1024.
COLUMN_TILE = 4096
UNIFORM_BITS = 24  # float32 represents every multiple of 2**-24 in [0, 1) exactly
MAX_ROWS = (1 << 31) // (2 * COLUMN_TILE)  # two words per entry in a tile's stream
JL_DELTA = 0.05  # tail probability of the JL bounds printed and tested
JL_BISECTIONS = 60  # halvings of [0, 2/3]: far below float64 resolution


def jl_bound(m: int, delta: float = JL_DELTA) -> float:
    """The Gaussian JL distortion bound for m output dimensions: the eps in (0, 2/3] with
    2 exp(-m (eps^2 - eps^3) / 4) = delta, so that |‖Px‖²/‖x‖² - 1| <= eps with
    probability >= 1 - delta for a dense N(0, 1/m) projection (Dasgupta-Gupta tail
    bounds); inf when m is too small for any such eps."""
    target = 4 * math.log(2 / delta) / m
    lo, hi = 0.0, 2 / 3  # eps^2 - eps^3 increases on [0, 2/3], peaking at 4/27
    if hi * hi - hi**3 < target:
        return math.inf
    for _ in range(JL_BISECTIONS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid * mid - mid**3 < target else (lo, mid)
    return hi


class GaussianProjection:
    """P x and P^T y for a seeded dense Gaussian P of shape (k, numel)."""

    def __init__(
        self, k: int, numel: int, where: ChunkSeed, device: torch.device | str | None = None
    ) -> None:
        if not 1 <= k <= MAX_ROWS or numel < 1:
            raise ConfigError(f"Gaussian projection {k} x {numel}: k must be in [1, {MAX_ROWS}]")
        self.k = k
        self.numel = numel
        self.where = where
        self.device = torch.device(device or "cpu")

    def tile(self, c: int) -> torch.Tensor:
        """Columns [c * COLUMN_TILE, ...) of P, shape (k, width), entries N(0, 1/k)."""
        lo = c * COLUMN_TILE
        width = min(COLUMN_TILE, self.numel - lo)
        key = self.where.key(Purpose.GAUSSIAN, c)
        w = key.words(0, 2 * self.k * COLUMN_TILE, self.device).view(self.k, COLUMN_TILE, 2)
        w = w[:, :width]
        mask = (1 << UNIFORM_BITS) - 1
        scale = 2.0**-UNIFORM_BITS
        u1 = ((w[..., 0] >> (32 - UNIFORM_BITS)) & mask).add_(1).to(torch.float32).mul_(scale)
        u2 = ((w[..., 1] >> (32 - UNIFORM_BITS)) & mask).to(torch.float32).mul_(scale)
        radius = u1.log_().mul_(-2.0).sqrt_()
        return radius.mul_(torch.cos(u2.mul_(2 * math.pi))).mul_(1 / math.sqrt(self.k))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """P x (k,) for x float32 (numel,)."""
        if x.shape != (self.numel,):
            raise FormatError(f"projection input must have shape ({self.numel},)")
        x = x.to(self.device, torch.float32)
        y = torch.zeros(self.k, device=self.device)
        for c in range(-(-self.numel // COLUMN_TILE)):
            lo = c * COLUMN_TILE
            y.addmv_(self.tile(c), x[lo : lo + COLUMN_TILE])
        return y

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """P^T y (numel,) for y float32 (k,)."""
        if y.shape != (self.k,):
            raise FormatError(f"adjoint input must have shape ({self.k},)")
        y = y.to(self.device, torch.float32)
        out = torch.empty(self.numel, device=self.device)
        for c in range(-(-self.numel // COLUMN_TILE)):
            lo = c * COLUMN_TILE
            tile = self.tile(c)
            torch.mv(tile.t(), y, out=out[lo : lo + tile.shape[1]])
        return out
