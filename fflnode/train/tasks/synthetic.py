"""Synthetic: random float32 weights of a chosen size, for merge benchmarks (no training).

A merge-only task: each node writes its premerge weights piece by piece from a seeded
generator (never the whole model in memory), in 4 MiB [1024, 1024] tensors like a
transformer's weight matrices. Needs run.rounds = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fflnode.errors import ConfigError
from fflnode.prism.writer import AtomicSafetensorsWriter
from fflnode.tensors import FlatLayout

SYNTHETIC_ROWS = 1024  # tensors are [1024, cols] float32
SYNTHETIC_TENSOR_ELEMS = 1 << 20  # 4 MiB tensors
MAX_MB = 1 << 20


@dataclass
class SyntheticTask:
    mb: float = 64.0  # model size in MB (1e6 bytes) of float32

    def __post_init__(self) -> None:
        if not 0 < self.mb <= MAX_MB:
            raise ConfigError(f"synthetic: mb must be in (0, {MAX_MB}], got {self.mb}")

    def layout(self, seed: int) -> dict[str, tuple[int, ...]]:
        total = max(1, int(self.mb * 1e6) // 4)
        shapes: dict[str, tuple[int, ...]] = {}
        i = 0
        while total > 0:
            n = min(total, SYNTHETIC_TENSOR_ELEMS)
            shapes[f"layer.{i:04d}.weight"] = (
                (SYNTHETIC_ROWS, n // SYNTHETIC_ROWS) if n % SYNTHETIC_ROWS == 0 else (n,)
            )
            total -= n
            i += 1
        return shapes

    def write_premerge(self, path: Path, seed: int, partition: int) -> None:
        layout = FlatLayout.from_shapes(self.layout(seed))
        gen = torch.Generator().manual_seed(seed * 1_000_003 + partition)
        with AtomicSafetensorsWriter.for_flat(path, layout) as w:
            for lo in range(0, layout.numel, SYNTHETIC_TENSOR_ELEMS):
                hi = min(lo + SYNTHETIC_TENSOR_ELEMS, layout.numel)
                w.write_flat(lo, torch.randn(hi - lo, generator=gen))
            w.commit()
