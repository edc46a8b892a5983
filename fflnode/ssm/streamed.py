"""Layer-streamed inference: run an SSD model whose weights do not fit in memory.

Theory of operation. An SSD model is a chain of units — the input stem ("embed."), the
blocks ("blocks.{i}.") and the readout ("readout.") — and a unit needs only its own weights
and the activations the previous unit left. So the streamer keeps the activations of the
whole "virtual batch" of sequences (b, T, D) resident, and walks the units once: it loads
unit k's weights into one of two weight arenas while unit k−1 computes from the other
(prefetch on one worker thread), runs unit k over the sequences a micro-batch at a time,
then lets that arena be overwritten by unit k+1. Each block's final LayerState is kept
if asked for (the F-SSD states of every sequence, ready for states.py).

Memory. `plan_stream` accounts for everything the streamer allocates — both arenas, the
read pieces in flight, inputs, resident activations, outputs, kept states and the
micro-batch working set — and picks the largest micro-batch that fits the caller's
budget, or raises ConfigError when not even one sequence fits. Only weights pass through
the arenas; nothing model-sized is ever allocated.

The weight source is a seam: `WeightSource` is all the streamer reads through (metadata,
shapes, and "read tensor `name` into this caller-owned tensor"), called from the prefetch
thread only. `SafetensorsWeightSource` implements it with fflnode.prism.reader's
SafetensorsFile, in byte ranges of READ_PIECE_BYTES. The io_uring TensorStore fits the
same three methods: its read_into would be `trio.from_thread.run(store.read_bytes_into,
info.start, info.stop, out, file, trio_token=token)` when the streamer itself runs in a
trio worker thread (trio.to_thread.run_sync), so the arenas are filled straight from the
store's aligned slots.

Must never: hold more than two units' weights at once, or change results: the output
equals the in-memory forward (bit for bit when the micro-batch is the whole batch).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fflnode.errors import ConfigError, FormatError
from fflnode.prism.reader import SafetensorsFile
from fflnode.ssm.model import (
    CONFIG_METADATA_KEY,
    Readout,
    SSDBlock,
    SSDConfig,
    SSDModel,
    make_embed,
)
from fflnode.ssm.states import LayerState

# Byte ranges are read in 4 MiB pieces: DESIGN.md measured reads into a reused 4 MiB
# buffer at ~8.7 GB/s from page cache, and a piece is transient memory (counted twice:
# the reader's buffer and its bytes copy), so it must stay small next to any budget.
READ_PIECE_BYTES = 4 << 20
# Arena views start on 64-byte boundaries (a cache line; what vectorised kernels like).
ARENA_ALIGN_ELEMENTS = 16
# The working-set estimate below counts the big intermediates of one block's forward.
# Measured (d_model 1024, T = 128, micro-batches 1..16): peak RSS grows by 1.34-1.57x that
# count per sequence with glibc's default malloc (its dynamic mmap threshold keeps freed
# intermediates in the heap), and by 0.62x with MALLOC_MMAP_THRESHOLD_=131072. 2.0 keeps
# the plan above the default-malloc measurement with room to spare.
WORKING_SAFETY = 2.0
# The first forward maps torch's CPU kernels and starts its thread pool: measured +25..30
# MiB of RSS over a process that only imported torch, whatever the model size.
RUNTIME_OVERHEAD_BYTES = 48 << 20
FLOAT_BYTES = 4  # everything the streamer holds is float32 (inputs may be int64: 8)


class WeightSource(Protocol):
    """Where streamed weights come from. Implementations own their file handles."""

    def metadata(self) -> dict[str, str]:
        """The file's string metadata (the model config lives under CONFIG_METADATA_KEY)."""
        ...

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every float32 tensor's shape by name; a non-float32 tensor is a FormatError."""
        ...

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill the contiguous float32 CPU tensor `out` (shaped as the tensor) from storage."""
        ...


class SafetensorsWeightSource:
    """WeightSource over one safetensors file, read by byte range with plain pread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.file = SafetensorsFile(path)
        for name, info in self.file.header.tensors.items():
            if info.dtype != "F32":
                self.file.close()
                raise FormatError(f"{path}: tensor {name!r} is {info.dtype}, streaming needs F32")

    def metadata(self) -> dict[str, str]:
        return dict(self.file.header.metadata)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: info.shape for n, info in self.file.header.tensors.items()}

    def read_into(self, name: str, out: torch.Tensor) -> None:
        info = self.file.tensor_info(name)
        if tuple(out.shape) != info.shape or not out.is_contiguous():
            raise FormatError(f"{self.file.path}: {name!r} is {info.shape}, not {out.shape}")
        dest = out.numpy().reshape(-1).view(np.uint8)  # shares memory with `out`
        for lo in range(0, info.nbytes, READ_PIECE_BYTES):
            hi = min(info.nbytes, lo + READ_PIECE_BYTES)
            piece = self.file.read_range(info.start + lo, info.start + hi)
            dest[lo:hi] = np.frombuffer(piece, dtype=np.uint8)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> SafetensorsWeightSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_for_streaming(model: SSDModel, path: str | os.PathLike[str]) -> None:
    """Write `model`'s weights and config as one safetensors file the streamer can run."""
    from fflnode.prism.writer import save_tensors

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_tensors(path, tensors, {CONFIG_METADATA_KEY: model.cfg.to_json()})


def load_in_memory(source: WeightSource) -> SSDModel:
    """The whole model in memory (the baseline the streamer is checked against)."""
    meta = source.metadata()
    if CONFIG_METADATA_KEY not in meta:
        raise FormatError(f"weight file has no {CONFIG_METADATA_KEY!r} metadata")
    cfg = SSDConfig.from_json(meta[CONFIG_METADATA_KEY])
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = SSDModel(cfg)
    model = model.to_empty(device="cpu")
    params = dict(model.state_dict())
    if set(params) != set(source.shapes()):
        raise FormatError("weight file tensors do not match the model's parameters")
    with torch.no_grad():
        for name, t in params.items():
            source.read_into(name, t)
    return model.eval()


# ---------------------------------------------------------------------------------------
# Planning: what one unit weighs and what a micro-batch needs.


def unit_prefixes(cfg: SSDConfig) -> list[str]:
    return ["embed.", *(f"blocks.{i}." for i in range(cfg.n_layers)), "readout."]


def unit_shapes(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {n[len(prefix) :]: s for n, s in shapes.items() if n.startswith(prefix)}


def arena_elements(unit: dict[str, tuple[int, ...]]) -> int:
    """Float32 elements of an arena that holds `unit`, each tensor 64-byte aligned."""
    total = 0
    for shape in unit.values():
        total += -(-math.prod(shape) // ARENA_ALIGN_ELEMENTS) * ARENA_ALIGN_ELEMENTS
    return total


def working_bytes_per_token(cfg: SSDConfig) -> int:
    """Peak bytes per token of one block's forward (no grad), WORKING_SAFETY included.

    Counted: the normed input, in_proj's output, x after SiLU, dt·x, the within-chunk
    decay L and L ∘ C Bᵀ (H·Q each per token), the two output halves, their sum, the
    gated and normed output, out_proj's output and the residual sum, the MLP hidden
    layer before and after GELU; per-chunk states (2·H·P·N per chunk) spread per token.
    """
    D, Di, N = cfg.d_model, cfg.expand * cfg.d_model, cfg.d_state
    H, P, _ = cfg.state_shape
    Q = cfg.chunk_size
    floats = (
        D
        + (2 * Di + 2 * N + H)
        + 2 * Di
        + 2 * H * Q
        + Q
        + 3 * Di
        + 2 * Di
        + 2 * D
        + 2 * cfg.mlp_ratio * D
        + math.ceil(2 * H * P * N / Q)
    )
    return math.ceil(WORKING_SAFETY * floats * FLOAT_BYTES)


@dataclass(frozen=True)
class StreamPlan:
    """Bytes of every part of a streamed run; `total_bytes` ≤ the budget it was made for."""

    budget_bytes: int
    runtime_bytes: int  # kernels' code and thread pools, first touched by the run
    arena_bytes: int  # one arena; two are held (computing + prefetching)
    read_bytes: int  # pieces in flight on the prefetch thread
    input_bytes: int
    activation_bytes: int  # resident (b, T, D) float32
    output_bytes: int
    state_bytes: int
    micro_batch: int
    working_bytes: int  # one micro-batch's intermediates

    @property
    def total_bytes(self) -> int:
        return (
            self.runtime_bytes
            + 2 * self.arena_bytes
            + self.read_bytes
            + self.input_bytes
            + self.activation_bytes
            + self.output_bytes
            + self.state_bytes
            + self.working_bytes
        )


def plan_stream(
    cfg: SSDConfig,
    shapes: dict[str, tuple[int, ...]],
    n_seq: int,
    seq_len: int,
    budget_bytes: int,
    *,
    input_bytes: int,
    keep_states: bool = False,
    micro_batch: int | None = None,
) -> StreamPlan:
    """The largest micro-batch (or the given one) whose run fits `budget_bytes`."""
    arena = max(arena_elements(unit_shapes(shapes, p)) for p in unit_prefixes(cfg)) * FLOAT_BYTES
    out_per_seq = cfg.n_outputs * (seq_len if cfg.readout == "sequence" else 1) * FLOAT_BYTES
    H, P, N = cfg.state_shape
    state_per_seq = cfg.n_layers * (H * P * N + H) * FLOAT_BYTES if keep_states else 0
    fixed = {
        "runtime_bytes": RUNTIME_OVERHEAD_BYTES,
        "arena_bytes": arena,
        "read_bytes": 2 * READ_PIECE_BYTES,
        "input_bytes": input_bytes,
        "activation_bytes": n_seq * seq_len * cfg.d_model * FLOAT_BYTES,
        "output_bytes": n_seq * out_per_seq,
        "state_bytes": n_seq * state_per_seq,
    }
    base = 2 * arena + sum(v for k, v in fixed.items() if k != "arena_bytes")
    per_seq = seq_len * working_bytes_per_token(cfg)
    fits = (budget_bytes - base) // per_seq
    if micro_batch is None:
        micro_batch = min(n_seq, int(fits))
    if micro_batch < 1 or micro_batch > fits:
        raise ConfigError(
            f"memory budget {budget_bytes / 2**20:.1f} MiB is too small: two weight arenas of "
            f"{arena / 2**20:.1f} MiB, {base / 2**20:.1f} MiB resident in all, and "
            f"{per_seq / 2**20:.1f} MiB per sequence of {seq_len} steps in flight"
        )
    return StreamPlan(
        budget_bytes, micro_batch=micro_batch, working_bytes=micro_batch * per_seq, **fixed
    )


# ---------------------------------------------------------------------------------------
# Running.


class _Arena:
    """One flat float32 buffer; a unit's tensors are aligned views into it."""

    def __init__(self, elements: int) -> None:
        self.flat = torch.empty(elements, dtype=torch.float32)

    def load(self, source: WeightSource, prefix: str, unit: dict[str, tuple[int, ...]]) -> dict:
        params, offset = {}, 0
        for name, shape in unit.items():
            n = math.prod(shape)
            view = self.flat[offset : offset + n].view(shape)
            source.read_into(prefix + name, view)
            params[name] = view
            offset += -(-n // ARENA_ALIGN_ELEMENTS) * ARENA_ALIGN_ELEMENTS
        return params


@dataclass
class StreamResult:
    outputs: torch.Tensor  # (b, n_outputs) or (b, T, n_outputs)
    states: tuple[LayerState, ...] | None  # per block: h (b, H, P, N), log_decay (b, H)
    plan: StreamPlan
    stall_seconds: float  # time compute waited for weights (reads the prefetch did not hide)


def _skeletons(cfg: SSDConfig) -> dict[str, nn.Module]:
    """Weightless modules (on the meta device) whose forward the streamed weights drive.
    Building them draws a few per-head values from torch's CPU generator: fork it, so
    the caller's random stream is untouched."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return {"embed.": make_embed(cfg), "block": SSDBlock(cfg), "readout.": Readout(cfg)}


def _expected_shapes(skeleton: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}


@contextmanager
def _prefetcher() -> Iterator[Callable[[Callable[[], dict]], Future]]:
    """One worker thread for weight reads; leaving the block waits for it (no stray task)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssd-prefetch") as pool:
        yield pool.submit


def streamed_forward(
    source: WeightSource,
    x: torch.Tensor,
    budget_bytes: int,
    *,
    keep_states: bool = False,
    micro_batch: int | None = None,
) -> StreamResult:
    """The model in `source` applied to x (b, T, ...) with weights streamed unit by unit.

    Equal to `load_in_memory(source)(x)` (and its states with keep_states), while holding
    at most two units' weights. Raises ConfigError when `budget_bytes` cannot fit the run
    and FormatError when the file does not hold exactly the model its config describes.
    """
    meta = source.metadata()
    if CONFIG_METADATA_KEY not in meta:
        raise FormatError(f"weight file has no {CONFIG_METADATA_KEY!r} metadata")
    cfg = SSDConfig.from_json(meta[CONFIG_METADATA_KEY])
    shapes = source.shapes()
    skeletons = _skeletons(cfg)
    prefixes = unit_prefixes(cfg)
    units = {p: unit_shapes(shapes, p) for p in prefixes}
    for p in prefixes:
        expected = _expected_shapes(skeletons["block" if p.startswith("blocks.") else p])
        if units[p] != expected:
            raise FormatError(f"weight file: unit {p!r} does not match the model config")
    if sum(len(u) for u in units.values()) != len(shapes):
        raise FormatError("weight file holds tensors outside the model's units")

    b, T = x.shape[:2]
    plan = plan_stream(
        cfg,
        shapes,
        b,
        T,
        budget_bytes,
        input_bytes=x.numel() * x.element_size(),
        keep_states=keep_states,
        micro_batch=micro_batch,
    )
    m = plan.micro_batch
    arenas = [_Arena(plan.arena_bytes // FLOAT_BYTES) for _ in range(2)]
    u = torch.empty(b, T, cfg.d_model)  # the resident activations
    out_shape = (b, T, cfg.n_outputs) if cfg.readout == "sequence" else (b, cfg.n_outputs)
    outputs = torch.empty(out_shape)
    states: list[LayerState] = []
    if keep_states:
        states = [LayerState.zeros(cfg.state_shape, (b,)) for _ in range(cfg.n_layers)]

    stall = 0.0
    with torch.no_grad(), _prefetcher() as submit:
        pending = submit(lambda: arenas[0].load(source, prefixes[0], units[prefixes[0]]))
        for k, prefix in enumerate(prefixes):
            t0 = time.perf_counter()
            params = pending.result()
            stall += time.perf_counter() - t0
            if k + 1 < len(prefixes):
                nxt, arena = prefixes[k + 1], arenas[(k + 1) % 2]
                pending = submit(lambda nxt=nxt, arena=arena: arena.load(source, nxt, units[nxt]))
            for lo in range(0, b, m):
                hi = min(b, lo + m)
                if prefix == "embed.":
                    u[lo:hi] = functional_call(skeletons[prefix], params, (x[lo:hi],))
                elif prefix == "readout.":
                    outputs[lo:hi] = functional_call(skeletons[prefix], params, (u[lo:hi],))
                else:
                    y, s = functional_call(skeletons["block"], params, (u[lo:hi],))
                    u[lo:hi] = y
                    if keep_states:
                        i = int(prefix.split(".")[1])
                        states[i].h[lo:hi] = s.h
                        states[i].log_decay[lo:hi] = s.log_decay
                    del y, s
    return StreamResult(outputs, tuple(states) if keep_states else None, plan, stall)
