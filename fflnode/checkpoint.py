"""Per-round checkpoints: everything a node needs to resume, written atomically.

A checkpoint is one safetensors file, data_dir/checkpoint.safetensors, holding the
flat weights, the outer optimizer's moments, the exchange's error-feedback state and the
local batch sampler's state as tensors, and in its metadata the run id, the round it
follows, the outer step counter and the members of the run. It is written through the
atomic writer (temporary file, fsync, rename, fsync of the directory), so `kill -9` at
any moment leaves either the previous checkpoint or the new one, never a torn file; a
killed writer's temporary is deleted at the next start.

Promise of `load`: a checkpoint is accepted only if it parses, belongs to this run, and
its tensors have the shapes this node's model expects; anything else is a FormatError
naming the file and the problem (the node then refuses to start rather than train from
a state it cannot trust).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fflnode.errors import FormatError
from fflnode.prism.reader import SafetensorsFile
from fflnode.prism.safetensors import TORCH_DTYPE_NAMES
from fflnode.prism.writer import AtomicSafetensorsWriter, remove_stale_temporaries, save_tensors

CHECKPOINT_FILE = "checkpoint.safetensors"
META_KEY = "fflnode.checkpoint"
FORMAT = "fflnode.checkpoint/2"  # 2: "sampler" is the batch position (Task API)


@dataclass(frozen=True)
class Chunked:
    """A float32 flat vector handed to `save` chunk by chunk, never whole: an out-of-core
    node's state read back from its block file. `chunks()` yields (element offset,
    values) covering [0, numel) once."""

    numel: int
    chunks: Callable[[], Iterable[tuple[int, torch.Tensor]]]


@dataclass(frozen=True)
class FileVector:
    """A float32 flat vector of a checkpoint file, read on demand: what `load(...,
    lazy=True)` returns, so an out-of-core node resumes without the state in RAM."""

    path: Path
    name: str
    numel: int
    dtype = torch.float32

    @property
    def shape(self) -> tuple[int]:
        return (self.numel,)

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi)."""
        with SafetensorsFile(self.path) as f:
            start = f.tensor_info(self.name).start
            raw = f.read_range(start + 4 * lo, start + 4 * hi)
        return torch.from_numpy(np.frombuffer(bytearray(raw), dtype="<f4"))

    def whole(self) -> torch.Tensor:
        return self.read(0, self.numel)


Vector = torch.Tensor | Chunked | FileVector


def whole(v: Vector) -> torch.Tensor:
    """A vector in RAM (a lazily loaded one read whole)."""
    if isinstance(v, Chunked):
        out = torch.empty(v.numel)
        for lo, values in v.chunks():
            out[lo : lo + values.numel()] = values
        return out
    return v.whole() if isinstance(v, FileVector) else v


@dataclass
class Checkpoint:
    run_id: str
    round: int  # the last completed round
    members: list[str]
    outer_step: int
    weights: Vector
    outer: dict[str, Vector] = field(default_factory=dict)  # "m", "v" when present
    exchange: dict[str, Vector] = field(default_factory=dict)
    sampler: torch.Tensor | None = None  # torch.Generator state (uint8)


def path_in(data_dir: Path) -> Path:
    return data_dir / CHECKPOINT_FILE


def save(data_dir: Path, ckpt: Checkpoint) -> Path:
    vectors: dict[str, Vector] = {"weights": ckpt.weights}
    vectors.update({f"outer.{k}": v for k, v in ckpt.outer.items()})
    vectors.update({f"exchange.{k}": v for k, v in ckpt.exchange.items()})
    meta = {
        "format": FORMAT,
        "run_id": ckpt.run_id,
        "round": ckpt.round,
        "members": ckpt.members,
        "outer_step": ckpt.outer_step,
    }
    metadata = {META_KEY: json.dumps(meta)}
    vectors = {k: whole(v) if isinstance(v, FileVector) else v for k, v in vectors.items()}
    if not any(isinstance(v, Chunked) for v in vectors.values()):
        tensors = {k: v.detach().contiguous() for k, v in vectors.items()}  # type: ignore[union-attr]
        if ckpt.sampler is not None:
            tensors["sampler"] = ckpt.sampler
        return save_tensors(path_in(data_dir), tensors, metadata)
    # The same file, written chunk by chunk: the same atomic writer, one chunk in RAM.
    specs = {k: ("F32", (_numel(v),)) for k, v in vectors.items()}
    if ckpt.sampler is not None:
        specs["sampler"] = (TORCH_DTYPE_NAMES[str(ckpt.sampler.dtype)], tuple(ckpt.sampler.shape))
    with AtomicSafetensorsWriter(path_in(data_dir), specs, metadata) as w:
        for name, v in vectors.items():
            if isinstance(v, Chunked):
                start = w.tensors[name].start
                for offset, values in v.chunks():
                    w.write_at(start + 4 * offset, values.detach().contiguous())
            else:
                w.write_tensor(name, v.detach().contiguous())
        if ckpt.sampler is not None:
            w.write_tensor("sampler", ckpt.sampler)
        return w.commit()


def _numel(v: Vector) -> int:
    return v.numel if isinstance(v, Chunked) else v.numel()


def load(data_dir: Path, run_id: str, numel: int, lazy: bool = False) -> Checkpoint | None:
    """The node's checkpoint for `run_id`, None when there is none. `lazy`: its float32
    flat vectors are FileVectors, read when asked (the rest is read now)."""
    remove_stale_temporaries(data_dir)
    path = path_in(data_dir)
    if not path.exists():
        return None
    with SafetensorsFile(path) as f:
        raw = f.header.metadata.get(META_KEY)
        try:
            meta = json.loads(raw) if raw else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise FormatError(f"{path}: not an fflnode checkpoint")
        if meta.get("run_id") != run_id:
            raise FormatError(
                f"{path}: checkpoint of run {meta.get('run_id')!r}, this node is configured "
                f"for {run_id!r}: move the file away to start a new run"
            )
        tensors: dict[str, Any] = {}
        for name in f.header.names():
            info = f.tensor_info(name)
            if lazy and info.dtype == "F32" and len(info.shape) == 1:
                tensors[name] = FileVector(path, name, info.numel)
            else:
                tensors[name] = f.tensor(name)
    for key in ("round", "outer_step"):
        if not isinstance(meta.get(key), int) or meta[key] < -1:
            raise FormatError(f"{path}: bad {key} {meta.get(key)!r}")
    members = meta.get("members")
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise FormatError(f"{path}: bad member list")
    weights = tensors.pop("weights", None)
    if weights is None or weights.dtype != torch.float32 or weights.shape != (numel,):
        raise FormatError(f"{path}: weights do not fit this model ({numel} parameters)")
    outer = {k.split(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.startswith("outer.")}
    if any(v.shape != (numel,) for v in outer.values()):
        raise FormatError(f"{path}: optimizer state does not fit this model")
    exchange = {
        k.split(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.startswith("exchange.")
    }
    sampler = tensors.pop("sampler", None)
    return Checkpoint(
        run_id, meta["round"], members, meta["outer_step"], weights, outer, exchange, sampler
    )
