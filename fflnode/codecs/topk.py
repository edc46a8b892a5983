"""The `topk` codec: the k largest-magnitude coordinates, exactly (the strong biased baseline).

Owns the sparse encoding of a chunk: the indices of its k largest |x_i| (ties broken by
torch.topk) in ascending order, and their float32 values. Everything else decodes to 0,
so the estimate is biased toward zero: run it under error feedback (ErrorFeedback), which
carries the dropped mass into the next round.

Wire (exact): indices bit-packed at the smallest width that holds numel - 1
(ceil(log2 numel) bits each, as bit planes: uint8 (bits, ceil(k/8))), values float32 (k,):
k * (index bits / 8 + 4) bytes, plus at most one byte of padding per index bit plane.
k is fixed by the config (`ratio` of numel, or an explicit `k`), so a receiver knows
every shape from the chunk context. No meta.

Validation rejects indices outside [0, numel), repeated or unsorted indices (one
canonical encoding per selection), non-finite values and set padding bits.
"""

from __future__ import annotations

import numpy as np
import torch

from fflnode.codecs._checks import check_context, check_finite, check_no_meta
from fflnode.codecs.base import ChunkContext, Codec, Encoded, register_codec
from fflnode.codecs.packing import pack, packed_shape, unpack
from fflnode.errors import ConfigError, FormatError

DEFAULT_RATIO = 0.01


def index_bits(numel: int) -> int:
    """Bits per index for a chunk of `numel` elements (at least 1)."""
    return max(1, (numel - 1).bit_length())


class TopKCodec(Codec):
    """make_codec("topk", ratio=0.01) or make_codec("topk", k=1000)."""

    name = "topk"

    def __init__(
        self,
        ratio: float = DEFAULT_RATIO,
        k: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ConfigError(f"topk: k must be a positive integer, got {k!r}")
        if k is None and not 0 < ratio <= 1:
            raise ConfigError(f"topk: ratio must be in (0, 1], got {ratio!r}")
        self.ratio = ratio
        self.k = k
        self.device = torch.device(device or "cpu")

    @property
    def biased(self) -> bool:
        return True

    def count(self, numel: int) -> int:
        """Coordinates kept from a chunk of `numel` elements."""
        k = self.k if self.k is not None else max(1, round(self.ratio * numel))
        return min(k, numel)

    def part_spec(self, ctx: ChunkContext) -> dict[str, tuple[str, tuple[int, ...]]]:
        check_context(self.name, ctx)
        k = self.count(ctx.numel)
        return {
            "indices": ("|u1", packed_shape(index_bits(ctx.numel), k)),
            "values": ("<f4", (k,)),
        }

    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> Encoded:
        check_context(self.name, ctx)
        x = chunk.detach().to(self.device, torch.float32).reshape(-1)
        if x.numel() != ctx.numel:
            raise FormatError(f"topk: chunk has {x.numel()} elements, context says {ctx.numel}")
        k = self.count(ctx.numel)
        idx = x.abs().topk(k, sorted=False).indices.sort().values
        values = x[idx].cpu().numpy()
        if not np.isfinite(values).all():  # NaN and inf rank above every finite value
            raise FormatError(f"topk: chunk {ctx.chunk} has non-finite values")
        indices = pack(idx.cpu().numpy(), index_bits(ctx.numel))
        return Encoded(self.name, {"indices": indices, "values": values})

    def _indices(self, enc: Encoded, ctx: ChunkContext) -> np.ndarray:
        k = self.count(ctx.numel)
        idx = unpack(enc.parts["indices"], index_bits(ctx.numel), k).astype(np.int64)
        if k and int(idx.max()) >= ctx.numel:
            raise FormatError(
                f"{self.name}: index {int(idx.max())} out of range for a chunk of {ctx.numel}"
            )
        if k > 1 and not (np.diff(idx) > 0).all():
            raise FormatError(f"{self.name}: indices must be strictly increasing")
        return idx

    def validate(self, enc: Encoded, ctx: ChunkContext) -> None:
        super().validate(enc, ctx)
        check_no_meta(self.name, enc)
        check_finite(self.name, "values", enc.parts["values"])
        self._indices(enc, ctx)

    def decode(self, enc: Encoded, ctx: ChunkContext) -> torch.Tensor:
        self.validate(enc, ctx)
        idx = torch.from_numpy(self._indices(enc, ctx))
        out = torch.zeros(ctx.numel)
        out[idx] = torch.from_numpy(np.ascontiguousarray(enc.parts["values"]))
        return out


register_codec(TopKCodec.name, TopKCodec)
