"""Sketch a safetensors model of any size with bounded memory (`fflnode sketch FILE --k K`).

Owns `sketch_file`: the shift-fold count sketch (fflnode.sketch.countsketch) of a model's
flat vector, every floating tensor in canonical name order (fflnode.tensors) converted
to float32 and laid end to end, as it streams past in pieces of at most `piece_bytes`.
The file is read by byte range (SafetensorsFile.read_range, until the Prism streamer
replaces it) and never loaded whole: memory is one piece, its float32 copy and the
sketch (rows x k floats), whatever the model size. Non-float tensors are skipped and
listed.

The result carries the sketch, ||x||^2 accumulated on the way (float32 within a piece,
float64 across pieces), so
the summary shows the sketch's own distortion ||Px||^2 / ||x||^2 - 1 beside the
Gaussian JL bound for its size, and optionally the heavy hitters (largest-magnitude
weights) recovered from the sketch alone, named by tensor and index.

`sketch_file_async` does the same through a ProjectionPool: reads and projections run in
worker threads (never on the trio thread), `depth` pieces in flight, partial sketches
summed in file order. `main(argv)` is the command-line entry.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import trio

from fflnode.errors import ConfigError, FflError
from fflnode.prism.reader import SafetensorsFile
from fflnode.prism.safetensors import DTYPES, Header
from fflnode.sketch.countsketch import DEFAULT_ROWS, ShiftFoldSketch
from fflnode.sketch.dense import jl_bound
from fflnode.sketch.rng import ChunkSeed
from fflnode.sketch.workers import ProjectionPool

# 4 MiB per read: large enough that a read costs far more than its call overhead, small
# enough that a piece and its float32 copy stay a few MiB (device reads plateau at
# >= 128 KiB requests, DESIGN.md).
DEFAULT_PIECE_BYTES = 4 << 20
MIN_PIECE_BYTES = 8  # one element of the widest dtype
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# One intra-op thread: on the shared 2-core machine two threads made every sketch
# operation ~30x slower whenever another process held a core (OpenMP threads wait for
# each other); measured 0.45 GB/s with 1 thread against 0.016 GB/s with 2.
CLI_TORCH_THREADS = 1
# The flat vector is a sketch's "chunk": one chunk per model, chunk index 0.
MODEL_CHUNK = 0


@dataclass(frozen=True)
class TensorSpan:
    """A floating tensor's place in the flat vector: elements [offset, offset + numel)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class Piece:
    """Bytes [start, stop) of the file: elements [flat, flat + n) of the flat vector."""

    name: str
    dtype: str
    start: int
    stop: int
    flat: int


def flat_spans(header: Header) -> tuple[list[TensorSpan], list[str]]:
    """The floating tensors in canonical order with their flat offsets, and the skipped."""
    spans, skipped, offset = [], [], 0
    for name in header.names():
        info = header.tensors[name]
        if info.dtype not in FLOAT_DTYPES:
            skipped.append(name)
            continue
        spans.append(TensorSpan(name, info.dtype, info.shape, offset, info.numel))
        offset += info.numel
    return spans, skipped


def plan_pieces(header: Header, spans: list[TensorSpan], piece_bytes: int) -> Iterator[Piece]:
    """Byte ranges of at most `piece_bytes` (whole elements) covering every span."""
    for span in spans:
        info = header.tensors[span.name]
        item = DTYPES[span.dtype].itemsize
        step = max(item, piece_bytes - piece_bytes % item)
        for start in range(info.start, info.stop, step):
            stop = min(info.stop, start + step)
            flat = span.offset + (start - info.start) // item
            yield Piece(span.name, span.dtype, start, stop, flat)


def to_float32(data: bytes, dtype: str) -> torch.Tensor:
    """The little-endian elements in `data` as a float32 CPU tensor."""
    with warnings.catch_warnings():  # read-only buffer: we only read it
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(np.frombuffer(data, dtype=DTYPES[dtype]))
    if dtype == "BF16":
        return raw.view(torch.bfloat16).to(torch.float32)
    return raw if dtype == "F32" else raw.to(torch.float32)


@dataclass
class ModelSketch:
    """The sketch of a model file's flat vector and what was measured on the way."""

    path: str
    op: ShiftFoldSketch
    values: torch.Tensor  # (op.size,) float32: P x
    spans: list[TensorSpan]
    skipped: list[str]
    numel: int
    norm_sq: float  # ||x||^2 measured while streaming
    bytes_read: int
    max_piece_bytes: int
    seconds: float
    heavy: list[tuple[str, tuple[int, ...], float]] = field(default_factory=list)

    @property
    def sketch_norm_sq(self) -> float:
        return self.op.norm_sq(self.values)

    @property
    def distortion(self) -> float:
        """||Px||^2 / ||x||^2 - 1 (0 for an all-zero model)."""
        return self.sketch_norm_sq / self.norm_sq - 1 if self.norm_sq > 0 else 0.0

    def locate(self, flat_index: int) -> tuple[str, tuple[int, ...]]:
        """(tensor name, multi-index) of flat element `flat_index`."""
        for span in self.spans:
            if span.offset <= flat_index < span.offset + span.numel:
                local = flat_index - span.offset
                return span.name, tuple(int(i) for i in np.unravel_index(local, span.shape))
        raise IndexError(f"flat index {flat_index} outside the model's {self.numel} elements")

    def find_heavy(self, count: int) -> list[tuple[str, tuple[int, ...], float]]:
        """The `count` largest-magnitude weights as the sketch estimates them (median
        over rows), scanning the flat index in bounded steps."""
        idx, est = self.op.heavy_hitters(self.values, self.numel, count)
        found = [(*self.locate(int(i)), float(v)) for i, v in zip(idx, est, strict=True)]
        self.heavy = sorted(found, key=lambda h: -abs(h[2]))
        return self.heavy

    def summary(self) -> dict[str, object]:
        m = self.op.size
        return {
            "file": self.path,
            "tensors": len(self.spans),
            "skipped": len(self.skipped),
            "parameters": self.numel,
            "bytes_read": self.bytes_read,
            "max_read_bytes": self.max_piece_bytes,
            "seconds": self.seconds,
            "read_and_sketch_GBps": self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0,
            "rows": self.op.rows,
            "width": self.op.width,
            "sketch_values": m,
            "sketch_bytes": 4 * m,
            "norm_sq": self.norm_sq,
            "sketch_norm_sq": self.sketch_norm_sq,
            "distortion": self.distortion,
            "jl_bound_95": jl_bound(m),
            "heavy": self.heavy,
        }

    def format_summary(self) -> str:
        s = self.summary()
        lines = [
            f"sketch of {s['file']}",
            f"  parameters      {s['parameters']:,} in {s['tensors']} float tensors"
            + (f" ({s['skipped']} non-float skipped)" if s["skipped"] else ""),
            f"  read            {s['bytes_read']:,} bytes in pieces of <= "
            f"{s['max_read_bytes']:,} bytes, {s['seconds']:.3f} s "
            f"({s['read_and_sketch_GBps']:.2f} GB/s read + sketch)",
            f"  sketch          {s['rows']} rows x ~{s['width']} buckets = "
            f"{s['sketch_values']:,} floats ({s['sketch_bytes']:,} bytes)",
            f"  ||x||^2         {s['norm_sq']:.6g} exact, {s['sketch_norm_sq']:.6g} from "
            f"the sketch: distortion {s['distortion']:+.4f} "
            f"(Gaussian JL bound at 95%: +-{s['jl_bound_95']:.4f})",
        ]
        for name, index, value in self.heavy:
            lines.append(f"  heavy hitter    {name}{list(index)} ~ {value:+.6g}")
        return "\n".join(lines)


def _open(
    path: str | Path, k: int, rows: int, seed: int, round: int, device: torch.device | str | None
) -> tuple[SafetensorsFile, list[TensorSpan], list[str], ShiftFoldSketch]:
    op = ShiftFoldSketch(k, rows, ChunkSeed(seed, round, MODEL_CHUNK), device)
    f = SafetensorsFile(path)
    spans, skipped = flat_spans(f.header)
    return f, spans, skipped, op


def sketch_file(
    path: str | Path,
    k: int,
    rows: int = DEFAULT_ROWS,
    seed: int = 0,
    round: int = 0,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    device: torch.device | str | None = None,
    heavy: int = 0,
) -> ModelSketch:
    """Sketch the model at `path` into `rows` rows of ~`k` buckets, streaming it in pieces
    of at most `piece_bytes` bytes; optionally recover `heavy` heavy hitters."""
    if piece_bytes < MIN_PIECE_BYTES:
        raise ConfigError(f"sketch: piece size {piece_bytes} bytes is below {MIN_PIECE_BYTES}")
    t0 = time.perf_counter()
    f, spans, skipped, op = _open(path, k, rows, seed, round, device)
    values = op.zeros()
    norm_sq, read, widest = 0.0, 0, 0
    with f:
        for piece in plan_pieces(f.header, spans, piece_bytes):
            data = f.read_range(piece.start, piece.stop)
            x = to_float32(data, piece.dtype)
            op.accumulate(values, x, piece.flat)
            norm_sq += float(torch.dot(x, x))
            read += len(data)
            widest = max(widest, len(data))
    numel = sum(s.numel for s in spans)
    seconds = time.perf_counter() - t0
    result = ModelSketch(
        str(path), op, values, spans, skipped, numel, norm_sq, read, widest, seconds
    )
    if heavy and numel:
        result.find_heavy(heavy)
    return result


async def sketch_file_async(
    path: str | Path,
    k: int,
    pool: ProjectionPool,
    rows: int = DEFAULT_ROWS,
    seed: int = 0,
    round: int = 0,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    depth: int | None = None,
) -> ModelSketch:
    """`sketch_file` through a ProjectionPool: each piece is read and projected into a
    partial sketch in a worker thread (on the pool's device), at most `depth` pieces in
    flight; partial sketches are added in file order, in a worker thread too."""
    if piece_bytes < MIN_PIECE_BYTES:
        raise ConfigError(f"sketch: piece size {piece_bytes} bytes is below {MIN_PIECE_BYTES}")
    t0 = time.perf_counter()
    f, spans, skipped, op = await trio.to_thread.run_sync(
        _open, path, k, rows, seed, round, pool.device
    )
    values = op.zeros()
    totals = {"norm_sq": 0.0, "read": 0, "widest": 0}

    def project(piece: Piece) -> tuple[torch.Tensor, float, int]:
        data = f.read_range(piece.start, piece.stop)
        x = to_float32(data, piece.dtype)
        partial = op.accumulate(op.zeros(), x, piece.flat)
        return partial, float(torch.dot(x, x)), len(data)

    async def consume(result: tuple[torch.Tensor, float, int]) -> None:
        partial, sq, nbytes = result
        await trio.to_thread.run_sync(values.add_, partial)
        totals["norm_sq"] += sq
        totals["read"] += nbytes
        totals["widest"] = max(totals["widest"], nbytes)

    try:
        # planning reads only the parsed header: no I/O on the trio thread
        await pool.map_ordered(project, plan_pieces(f.header, spans, piece_bytes), consume, depth)
    finally:
        f.close()
    numel = sum(s.numel for s in spans)
    return ModelSketch(
        str(path),
        op,
        values,
        spans,
        skipped,
        numel,
        totals["norm_sq"],
        int(totals["read"]),
        int(totals["widest"]),
        time.perf_counter() - t0,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fflnode sketch",
        description="Sketch a safetensors model with bounded memory and print a summary.",
    )
    p.add_argument("file", help="safetensors model file")
    p.add_argument("--k", type=int, default=4096, help="buckets per sketch row (default 4096)")
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="sketch rows (default 5)")
    p.add_argument("--seed", type=int, default=0, help="shared seed (default 0)")
    p.add_argument("--round", type=int, default=0, help="round the randomness is drawn for")
    p.add_argument(
        "--piece-mib",
        type=float,
        default=DEFAULT_PIECE_BYTES / (1 << 20),
        help="largest read, MiB (default 4)",
    )
    p.add_argument("--heavy", type=int, default=8, help="heavy hitters to report (default 8)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=CLI_TORCH_THREADS,
        help=f"torch intra-op threads (default {CLI_TORCH_THREADS})",
    )
    p.add_argument("--out", default=None, help="write the sketch to this safetensors file")
    return p


def save_sketch(result: ModelSketch, out: str | Path) -> Path:
    """Write the sketch atomically as a one-tensor safetensors file with its parameters."""
    from fflnode.prism.writer import AtomicSafetensorsWriter

    op = result.op
    meta = {
        "source": result.path,
        "rows": str(op.rows),
        "width": str(op.width),
        "widths": ",".join(map(str, op.widths)),
        "seed": str(op.where.seed),
        "round": str(op.where.round),
        "numel": str(result.numel),
    }
    with AtomicSafetensorsWriter(out, {"sketch": ("F32", (op.size,))}, meta) as w:
        w.write_tensor("sketch", result.values.cpu().contiguous())
        return w.commit()


def main(argv: Sequence[str] | None = None) -> int:
    """`fflnode sketch FILE --k K ...`: print the summary; 0 on success, 2 on a bad
    argument or config, 1 on any other fflnode error (message on stderr)."""
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        print("fflnode sketch: --threads must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        result = sketch_file(
            args.file,
            args.k,
            rows=args.rows,
            seed=args.seed,
            round=args.round,
            piece_bytes=int(args.piece_mib * (1 << 20)),
            device=args.device,
            heavy=args.heavy,
        )
        print(result.format_summary())
        if args.out:
            print(f"  written         {save_sketch(result, args.out)}")
    except ConfigError as e:
        print(f"fflnode sketch: {e}", file=sys.stderr)
        return 2
    except (FflError, OSError) as e:
        print(f"fflnode sketch: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
