"""Validation helpers shared by the codecs: each raises FormatError naming codec and part."""

from __future__ import annotations

import numpy as np

from fflnode.codecs.base import ChunkContext, Encoded
from fflnode.errors import FormatError

# The rotation and the sketches index a chunk with int32 counters; a context claiming
# more (a hostile or corrupt header) is rejected before anything is sized from it.
MAX_CHUNK_NUMEL = (1 << 31) - 256


def check_context(codec: str, ctx: ChunkContext) -> None:
    if not 0 < ctx.numel <= MAX_CHUNK_NUMEL:
        raise FormatError(f"{codec}: chunk of {ctx.numel} elements, not in [1, {MAX_CHUNK_NUMEL}]")
    for what, value in (("seed", ctx.seed), ("round", ctx.round), ("chunk", ctx.chunk)):
        if not 0 <= value < 1 << 64:
            raise FormatError(f"{codec}: {what} {value} outside [0, 2**64)")


def check_no_meta(codec: str, enc: Encoded) -> None:
    if enc.meta:
        raise FormatError(f"{codec}: unexpected meta {sorted(enc.meta)}; this codec sends none")


def check_finite(codec: str, part: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        raise FormatError(f"{codec}: part {part!r} holds non-finite values")
