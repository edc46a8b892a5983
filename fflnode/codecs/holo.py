"""The `holo` codec: rotate, slice, quantize to b bits per coordinate (DRIVE / EDEN style).

Owns the holographic encoding of a chunk. The chunk is rotated by the seeded randomized
Hadamard transform (fflnode.sketch.hadamard), which makes its coordinates look Gaussian
whatever the chunk holds; the rotated vector is sliced into the rotation's tiles and
each tile z is quantized on its own: with sigma = ||z|| / sqrt(T), each coordinate gets
the b-bit code of a uniform midrise quantizer of step STEP[b] * sigma (2**b levels
q = code + 1/2 - 2**(b-1), in steps), and the tile one float32 scale S so that z ~ S q:
  * scale="unbiased": S = ||z||^2 / <z, q>. Over the seeded rotation the estimate is
    unbiased (DRIVE/EDEN); 1 bit on Gaussian-like data gives NMSE ~ pi/2 - 1 = 0.57.
  * scale="mse": S = <z, q> / ||q||^2, the least-squares scale: lower error (1 bit:
    1 - 2/pi = 0.36) but biased; pair it with error feedback.
Each tile is quantized right after it is rotated, while it is still in cache, so the
rotated chunk is never written out whole. The receiver rebuilds S q per tile and applies
the inverse rotation tile by tile.

Wire (exact): codes as `bits` bit planes, packed 8 per byte (uint8 (bits, ceil(P/8)) for
P = numel rounded up to 256), and one float32 scale per tile (<= 261376 coordinates):
bits * ceil(P/8) + 4 * tiles bytes, e.g. 1.0005 bits per parameter at 1 bit on a large
chunk. No meta. Randomness comes only from (seed, round, chunk): nothing is sent for it.

Must never: keep state between chunks (error feedback is the sender's wrapper), or decode
an encoding that `validate` would reject (decode validates first).
"""

from __future__ import annotations

import numpy as np
import torch

from fflnode.codecs._checks import check_context, check_finite, check_no_meta
from fflnode.codecs.base import ChunkContext, Codec, Encoded, register_codec
from fflnode.codecs.packing import check_padding, pack, packed_shape, unpack
from fflnode.errors import ConfigError, FormatError
from fflnode.sketch.hadamard import BLOCK, RandomizedHadamard
from fflnode.sketch.rng import ChunkSeed

MIN_BITS, MAX_BITS = 1, 8  # codes are packed from uint8
# Step (in units of sigma) of the MSE-optimal uniform midrise quantizer of N(0, 1) with
# 2**b levels (Max 1960; recomputed by numeric minimization, checked in tests).
STEP = {
    1: 1.59577,
    2: 0.99569,
    3: 0.58602,
    4: 0.33520,
    5: 0.18814,
    6: 0.10406,
    7: 0.05687,
    8: 0.03076,
}
SCALES = ("unbiased", "mse")


class HoloCodec(Codec):
    """make_codec("holo", bits=1..8, scale="unbiased"|"mse", device=None)."""

    name = "holo"

    def __init__(
        self, bits: int = 1, scale: str = "unbiased", device: str | torch.device | None = None
    ) -> None:
        if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ConfigError(f"holo: bits must be an integer in [{MIN_BITS}, {MAX_BITS}]")
        if scale not in SCALES:
            raise ConfigError(f"holo: scale must be one of {SCALES}, got {scale!r}")
        self.bits = bits
        self.scale = scale
        self.device = torch.device(device or "cpu")

    @property
    def biased(self) -> bool:
        return self.scale == "mse"

    def for_mean(self) -> HoloCodec:
        """The least-squares scale: a shard's mean is encoded once and the owner feeds
        back what it lost, so the lower error wins over an unbiased estimate. Measured
        on the LM (docs/benchmarks.md, "Lossy reduce-scatter"): unbiased members and an
        mse owner 4.678 perplexity, unbiased both 4.941, mse both 5.221."""
        return HoloCodec(self.bits, "mse", self.device)

    def rotation(self, ctx: ChunkContext) -> RandomizedHadamard:
        check_context(self.name, ctx)
        where = ChunkSeed(ctx.seed, ctx.round, ctx.chunk)
        return RandomizedHadamard(ctx.numel, where, self.device)

    def part_spec(self, ctx: ChunkContext) -> dict[str, tuple[str, tuple[int, ...]]]:
        rot = self.rotation(ctx)
        return {
            "codes": ("|u1", packed_shape(self.bits, rot.padded)),
            "scales": ("<f4", (len(rot.tiles),)),
        }

    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> Encoded:
        rot = self.rotation(ctx)
        x = chunk.detach().to(self.device, torch.float32).reshape(-1).contiguous()
        if x.numel() != ctx.numel:
            raise FormatError(f"holo: chunk has {x.numel()} elements, context says {ctx.numel}")
        codes = torch.empty(rot.padded, dtype=torch.uint8, device=self.device)
        scales = torch.empty(len(rot.tiles), device=self.device)
        work = rot.scratch()
        z_tile = torch.empty_like(work.mixed)
        scratch = torch.empty_like(work.mixed)
        for t, (start, m) in enumerate(rot.tiles):
            size = m * BLOCK
            zt = z_tile[:size]
            rot.forward_tile(x, t, zt, work)  # quantized below while still in cache
            energy = torch.dot(zt, zt)
            if self.bits == 1:  # levels +-1/2: code = (z >= 0), <z, q> = ||z||_1 / 2
                torch.ge(zt, 0, out=codes[start : start + size])
                dot = torch.linalg.vector_norm(zt, 1) / 2
                qq = torch.tensor(size / 4, device=self.device)
            else:
                dot, qq = self._quantize(zt, energy, codes[start : start + size], scratch[:size])
            s = energy / dot if self.scale == "unbiased" else dot / qq
            scales[t] = torch.where(energy != 0, s, torch.zeros_like(s))
        if not bool(torch.isfinite(scales).all()):  # NaN/inf in x reach every tile's energy
            raise FormatError(f"holo: chunk {ctx.chunk} has non-finite (or overflowing) values")
        return Encoded(
            self.name,
            {"codes": pack(codes.cpu().numpy(), self.bits), "scales": scales.cpu().numpy()},
        )

    def _quantize(
        self, zt: torch.Tensor, energy: torch.Tensor, codes: torch.Tensor, q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of one tile into `codes`; returns <z, q> and ||q||^2 (q in steps)."""
        levels = 1 << self.bits
        sigma = (energy / zt.numel()).sqrt()
        # a zero tile: any step gives code 2**(b-1), level +1/2, and scale 0
        step = torch.where(sigma > 0, sigma * STEP[self.bits], torch.ones_like(sigma))
        torch.div(zt, step, out=q).add_(levels / 2).floor_().clamp_(0, levels - 1)
        codes.copy_(q)
        q.sub_(levels / 2 - 0.5)
        return torch.dot(zt, q), torch.dot(q, q)  # <z, q> >= ||z||_1 / 2: signs agree

    def validate(self, enc: Encoded, ctx: ChunkContext) -> None:
        super().validate(enc, ctx)
        check_no_meta(self.name, enc)
        scales = enc.parts["scales"]
        check_finite(self.name, "scales", scales)
        if (scales < 0).any():
            raise FormatError(f"{self.name}: negative scale in chunk {ctx.chunk}")
        check_padding(enc.parts["codes"], self.rotation(ctx).padded)

    def decode(self, enc: Encoded, ctx: ChunkContext) -> torch.Tensor:
        self.validate(enc, ctx)
        rot = self.rotation(ctx)
        codes = torch.from_numpy(unpack(enc.parts["codes"], self.bits, rot.padded))
        codes = codes.to(self.device)
        half = (1 << self.bits) / 2 - 0.5  # level = code - half, in steps
        scales = enc.parts["scales"].astype(np.float64).tolist()
        x = torch.empty(ctx.numel, device=self.device)
        work = rot.scratch()
        q = torch.empty_like(work.mixed)
        for t, (start, m) in enumerate(rot.tiles):
            size = m * BLOCK
            qt = q[:size].copy_(codes[start : start + size]).sub_(half).mul_(scales[t])
            rot.inverse_tile(qt, t, x, work)
        return x.cpu()


register_codec(HoloCodec.name, HoloCodec)
