"""Canonical tensor order, the flat parameter vector, and the model hash.

Rule: everything that must agree bit-for-bit across nodes (the flat vector that shards
cut, the safetensors layout on disk, the model hash) uses one order: tensor names sorted
ascending by their UTF-8 bytes. This file is the only place that order is defined.

Model hash (DESIGN.md): sha256 over, for each tensor in that order, the UTF-8 name, a
zero byte, then the tensor's raw little-endian bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fflnode.errors import FormatError

if TYPE_CHECKING:  # torch is imported where tensors are touched: the Prism streaming
    import torch  # path and its memory tests must run without its ~220 MB

# The merge and the exchange move float32 only: the canonical mean is defined on it.
PARAM_ITEMSIZE = 4


@dataclass(frozen=True)
class TensorSlot:
    """One tensor's place in the flat vector: elements [offset, offset + numel)."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class FlatLayout:
    """The flat vector of a model: its tensors in canonical order, back to back."""

    slots: tuple[TensorSlot, ...]

    @property
    def numel(self) -> int:
        return self.slots[-1].offset + self.slots[-1].numel if self.slots else 0

    @property
    def nbytes(self) -> int:
        return self.numel * PARAM_ITEMSIZE

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Iterable[int]]) -> FlatLayout:
        slots, offset = [], 0
        for name in canonical_names(shapes):
            shape = tuple(int(d) for d in shapes[name])
            numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
            slots.append(TensorSlot(name, shape, offset, numel))
            offset += numel
        return cls(tuple(slots))

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> FlatLayout:
        return cls.from_shapes({k: tuple(v.shape) for k, v in tensors.items()})

    def slots_overlapping(self, lo: int, hi: int) -> Iterator[tuple[TensorSlot, int, int]]:
        """(slot, start, stop) within each tensor covering flat elements [lo, hi)."""
        for slot in self.slots:
            start = max(lo, slot.offset)
            stop = min(hi, slot.offset + slot.numel)
            if start < stop:
                yield slot, start - slot.offset, stop - slot.offset


def canonical_names(names: Iterable[str]) -> list[str]:
    """Tensor names in canonical order: ascending UTF-8 bytes."""
    return sorted(names, key=lambda n: n.encode("utf-8"))


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The flat float32 CPU vector of `tensors` in canonical order (a copy)."""
    import torch

    names = canonical_names(tensors)
    for n in names:
        if tensors[n].dtype != torch.float32:
            raise FormatError(f"tensor {n!r} is {tensors[n].dtype}, the flat vector is float32")
    if not names:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat([tensors[n].detach().reshape(-1).cpu() for n in names])


def unflatten(flat: torch.Tensor, layout: FlatLayout) -> dict[str, torch.Tensor]:
    """Views of `flat` shaped as the tensors of `layout`."""
    if flat.numel() != layout.numel:
        raise FormatError(f"flat vector has {flat.numel()} elements, layout needs {layout.numel}")
    return {s.name: flat[s.offset : s.offset + s.numel].view(s.shape) for s in layout.slots}


class ModelHasher:
    """Incremental model hash: feed each tensor's bytes in canonical order, in pieces."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._last: bytes | None = None

    def begin_tensor(self, name: str) -> None:
        key = name.encode("utf-8")
        if self._last is not None and key <= self._last:
            raise FormatError(f"tensor {name!r} hashed out of canonical order")
        self._last = key
        self._h.update(key + b"\x00")

    def update(self, data: bytes | memoryview | np.ndarray) -> None:
        self._h.update(memoryview(data).cast("B") if not isinstance(data, bytes) else data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def model_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 model hash of in-memory tensors (little-endian bytes, canonical order)."""
    import torch

    hasher = ModelHasher()
    for name in canonical_names(tensors):
        t = tensors[name].detach().cpu().contiguous()
        hasher.begin_tensor(name)
        hasher.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def canonical_mean(
    members: list[tuple[bytes, Mapping[str, torch.Tensor]]],
) -> dict[str, torch.Tensor]:
    """The merge's definition, in plain torch: float32(sum_i float64(x_i) / N).

    `members` are (peer-ID bytes, tensors); the sum runs in ascending peer-ID-bytes order.
    This is the reference the network merge must reproduce bit for bit.
    """
    import torch

    if not members:
        raise FormatError("canonical mean of no members")
    ordered = sorted(members, key=lambda m: m[0])
    names = canonical_names(ordered[0][1])
    out = {}
    for name in names:
        acc = torch.zeros(ordered[0][1][name].shape, dtype=torch.float64)
        for _, tensors in ordered:
            acc += tensors[name].to(torch.float64)
        out[name] = (acc / len(ordered)).to(torch.float32)
    return out
