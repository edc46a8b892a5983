"""How one context's SSM states travel in a batched state body: raw float32, or holo bits.

Theory of operation. A state body answers a batched request for `count` consecutive
contexts of one version (fflnode.ssm.federation). Each context contributes the same
arrays, concatenated along their first axis, so a server builds a body by concatenating
what it encoded once per context, and a receiver knows every part's exact shape from its
LOCAL model's state spec (L layers of (H, P, N)) and the count it asked for:

    "none"   h (count·L, H, P, N) f32, log_decay (count·L, H) f32: the states themselves.
    "holo"   codes (count, bits, ⌈P'/8⌉) u8 and scales (count, tiles) f32: each context's
             h, flattened, by fflnode.codecs.holo at `bits` bits per entry; log_decay
             (count·L, H) f32 as it is (it is a few bytes and must stay ≤ 0). One rotation,
             seeded by (run seed, epoch), serves every context of the epoch: built once,
             its signs cost ~2 ms, more than the transform of a 32 KiB state.

A lossy codec changes the states every node composes, not their agreement: the sender's
own composition uses decode(encode(its states)), the same bytes every receiver decodes,
so the merged states stay bit-identical everywhere (on CPU). What it costs in recall is
measured in docs/benchmarks.md ("F-SSD": holo on states).

Sans-IO: numpy and torch only. Promises: `decode` validates what it returns exactly as
states.from_arrays does (shapes from the local spec, finite, |x| <= MAX_ABS_STATE,
log_decay <= 0) and raises FormatError for anything else, never another exception type.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fflnode import wire
from fflnode.codecs.base import ChunkContext, Encoded
from fflnode.codecs.holo import HoloCodec
from fflnode.errors import ConfigError, FormatError
from fflnode.sketch.hadamard import RandomizedHadamard
from fflnode.ssm.states import LayerState, StateShape, from_arrays

PART_H, PART_LOG_DECAY, PART_CODES, PART_SCALES = "h", "log_decay", "codes", "scales"
# holo's per-tile scale for states: the least-squares one. Unbiasedness buys nothing
# here (nothing is averaged over rounds), and "mse" has the lower error (measured with
# tools/bench_state_codec.py; docs/benchmarks.md).
HOLO_SCALE = "mse"
Parts = list[tuple[str, np.ndarray]]
# Rotations kept per codec: one per (epoch, state size) in use; an epoch needs one.
ROTATIONS_KEPT = 4


def layer_shape(spec: Sequence[StateShape]) -> StateShape:
    """The one (H, P, N) every layer shares; a stack of unequal layers has no body form."""
    shapes = {tuple(int(d) for d in s) for s in spec}
    if len(spec) == 0 or len(shapes) != 1:
        raise ConfigError(f"state federation needs >= 1 layer of one state shape, got {spec}")
    shape = next(iter(shapes))
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"state shape {shape} is not (heads, head_dim, d_state)")
    return shape  # type: ignore[return-value]


class StateCodec(ABC):
    """Encodes one context's per-layer states into body arrays, and decodes batches."""

    name: str = ""

    @abstractmethod
    def parts_spec(self, spec: Sequence[StateShape], count: int) -> tuple[wire.Part, ...]:
        """The exact parts of a body of `count` contexts for the local model's spec."""

    @abstractmethod
    def encode(self, states: Sequence[LayerState], context: int, epoch: int) -> Parts:
        """One context's unbatched states -> its arrays (first axis: concatenated)."""

    @abstractmethod
    def decode(
        self,
        arrays: Mapping[str, np.ndarray],
        spec: Sequence[StateShape],
        contexts: Sequence[int],
        epoch: int,
        where: str,
    ) -> list[tuple[LayerState, ...]]:
        """The validated states of each of `contexts` from a verified batch body."""

    def body_nbytes(self, spec: Sequence[StateShape], count: int) -> int:
        return sum(p.nbytes for p in self.parts_spec(spec, count))

    def roundtrip(
        self, states: Sequence[LayerState], context: int, epoch: int, spec: Sequence[StateShape]
    ) -> tuple[Parts, tuple[LayerState, ...]]:
        """(what a sender serves for `context`, the states every receiver decodes from it)."""
        parts = self.encode(states, context, epoch)
        decoded = self.decode(dict(parts), spec, [context], epoch, f"own state of {context}")
        return parts, decoded[0]


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy(), dtype="<f4")


def _validated(
    h: np.ndarray, log_decay: np.ndarray, spec: Sequence[StateShape], where: str
) -> tuple[LayerState, ...]:
    """One context's states from (L, H, P, N) and (L, H) arrays, checked by from_arrays."""
    layers = [{"h": h[i], "log_decay": log_decay[i]} for i in range(len(spec))]
    return from_arrays(layers, spec, where)


class RawCodec(StateCodec):
    """float32 as it is: exact."""

    name = "none"

    def parts_spec(self, spec: Sequence[StateShape], count: int) -> tuple[wire.Part, ...]:
        H, P, N = layer_shape(spec)
        L = len(spec)
        return (
            wire.Part(PART_H, "f32", (count * L, H, P, N)),
            wire.Part(PART_LOG_DECAY, "f32", (count * L, H)),
        )

    def encode(self, states: Sequence[LayerState], context: int, epoch: int) -> Parts:
        return [
            (PART_H, np.ascontiguousarray(np.stack([_f32(s.h) for s in states]))),
            (PART_LOG_DECAY, np.ascontiguousarray(np.stack([_f32(s.log_decay) for s in states]))),
        ]

    def decode(
        self,
        arrays: Mapping[str, np.ndarray],
        spec: Sequence[StateShape],
        contexts: Sequence[int],
        epoch: int,
        where: str,
    ) -> list[tuple[LayerState, ...]]:
        _check_parts(arrays, self.parts_spec(spec, len(contexts)), where)
        L = len(spec)
        h, log_decay = arrays[PART_H], arrays[PART_LOG_DECAY]
        return [
            _validated(h[b * L : (b + 1) * L], log_decay[b * L : (b + 1) * L], spec, f"{where}: "
                       f"context {c}")
            for b, c in enumerate(contexts)
        ]  # fmt: skip


class _EpochHolo(HoloCodec):
    """The holo codec with its rotations kept: every context of an epoch shares one.
    A kept rotation is only read after it is built (its lazily built signs are whole
    tensors, assigned at once), so worker threads may share it."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits=bits, scale=HOLO_SCALE)
        self._kept: OrderedDict[ChunkContext, RandomizedHadamard] = OrderedDict()

    def rotation(self, ctx: ChunkContext) -> RandomizedHadamard:
        rot = self._kept.get(ctx)
        if rot is None:
            rot = self._kept[ctx] = super().rotation(ctx)
            while len(self._kept) > ROTATIONS_KEPT:
                self._kept.popitem(last=False)
        return rot


class HoloStateCodec(StateCodec):
    """h by the holo codec at `bits` bits per entry; log_decay as float32."""

    def __init__(self, bits: int, seed: int) -> None:
        self.holo = _EpochHolo(bits)
        self.bits = bits
        self.seed = seed
        self.name = f"holo{bits}"

    def _ctx(self, spec: Sequence[StateShape], context: int, epoch: int) -> ChunkContext:
        """The holo chunk of a context: the same rotation for every context of an epoch."""
        return ChunkContext(self.seed, epoch, 0, len(spec) * math.prod(layer_shape(spec)))

    def parts_spec(self, spec: Sequence[StateShape], count: int) -> tuple[wire.Part, ...]:
        H, _, _ = layer_shape(spec)
        L = len(spec)
        holo = self.holo.part_spec(self._ctx(spec, 0, 0))  # shapes do not depend on the seed
        (codes_dtype, codes), (_, scales) = holo["codes"], holo["scales"]
        assert codes_dtype == "|u1"
        return (
            wire.Part(PART_CODES, "u8", (count, *codes)),
            wire.Part(PART_SCALES, "f32", (count, *scales)),
            wire.Part(PART_LOG_DECAY, "f32", (count * L, H)),
        )

    def encode(self, states: Sequence[LayerState], context: int, epoch: int) -> Parts:
        spec = [tuple(s.h.shape) for s in states]
        flat = torch.cat([s.h.detach().to("cpu", torch.float32).reshape(-1) for s in states])
        enc = self.holo.encode(flat, self._ctx(spec, context, epoch))  # type: ignore[arg-type]
        return [
            (PART_CODES, enc.parts["codes"][None]),
            (PART_SCALES, np.ascontiguousarray(enc.parts["scales"][None], dtype="<f4")),
            (PART_LOG_DECAY, np.ascontiguousarray(np.stack([_f32(s.log_decay) for s in states]))),
        ]

    def decode(
        self,
        arrays: Mapping[str, np.ndarray],
        spec: Sequence[StateShape],
        contexts: Sequence[int],
        epoch: int,
        where: str,
    ) -> list[tuple[LayerState, ...]]:
        _check_parts(arrays, self.parts_spec(spec, len(contexts)), where)
        L = len(spec)
        shape = (L, *layer_shape(spec))
        out = []
        for b, c in enumerate(contexts):
            enc = Encoded(
                "holo", {"codes": arrays[PART_CODES][b], "scales": arrays[PART_SCALES][b]}
            )
            try:
                h = self.holo.decode(enc, self._ctx(spec, c, epoch)).numpy().reshape(shape)
            except FormatError as e:
                raise FormatError(f"{where}: context {c}: {e}") from None
            log_decay = arrays[PART_LOG_DECAY][b * L : (b + 1) * L]
            out.append(_validated(h, log_decay, spec, f"{where}: context {c}"))
        return out


def _check_parts(arrays: Mapping[str, np.ndarray], want: Sequence[wire.Part], where: str) -> None:
    """Exactly the expected parts, dtypes and shapes (the shell checked them already on
    the wire header; this guards every other caller)."""
    if list(arrays) != [p.name for p in want] and set(arrays) != {p.name for p in want}:
        raise FormatError(f"{where}: parts {sorted(arrays)}, expected {[p.name for p in want]}")
    for p in want:
        a = arrays[p.name]
        if not isinstance(a, np.ndarray) or a.dtype != wire.DTYPES[p.dtype]:
            raise FormatError(f"{where}: part {p.name!r} is not {p.dtype}")
        if tuple(a.shape) != p.shape:
            raise FormatError(
                f"{where}: part {p.name!r} has shape {list(a.shape)}, not {list(p.shape)}"
            )


def make_state_codec(name: str, bits: int, seed: int) -> StateCodec:
    """The codec of a [states] section: "none" or "holo" (at `bits`)."""
    if name == "none":
        return RawCodec()
    if name == "holo":
        return HoloStateCodec(bits, seed)
    raise ConfigError(f"states.codec {name!r}: choose 'none' or 'holo'")
