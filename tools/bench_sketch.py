"""Throughput of the holographic-slicing transforms against a numpy copy of the same data.

    .venv/bin/python tools/bench_sketch.py [--mib 64] [--repeats 9] [--threads 1]

Prints one markdown table from one run. Every repeat times each transform once, in a
fixed order, right after a numpy copy (np.copyto into a preallocated array) of the same
input: the copy is the memory-bandwidth reference. Outputs go to preallocated arrays
where the API takes one (fresh allocations page-fault at 0.5-0.8 GB/s in this VM and
would measure the kernel, not the transform); the codec rows allocate, as codecs do.
Reported: GB/s of input (median over repeats) and the ratio to the copy, taken per
repeat and then the median, so load from other processes on this shared machine
cancels as far as it can. Every transform
regenerates its randomness from (seed, round, chunk) inside the timed call, as a node
does each round. The dense Gaussian projection is timed on a much smaller input (it
costs O(k) hashing per element) and compared with the same copy bandwidth.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fflnode.codecs import ChunkContext, HoloCodec  # noqa: E402
from fflnode.sketch.countsketch import ShiftFoldSketch  # noqa: E402
from fflnode.sketch.dense import GaussianProjection  # noqa: E402
from fflnode.sketch.hadamard import RandomizedHadamard  # noqa: E402
from fflnode.sketch.rng import ChunkSeed  # noqa: E402

ROWS = 5
WIDE, NARROW = 1 << 16, 1 << 10  # sketch widths (buckets per row)
GAUSS_K = 1024  # rows of the dense Gaussian projection
GAUSS_ELEMS = 1 << 12  # its input: 16 KiB (a 4 M-entry matrix regenerated per call)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=64, help="input size, MiB of float32")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    n = args.mib * (1 << 20) // 4
    src = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    dst = np.empty_like(src)
    x = torch.from_numpy(src)
    rot0 = RandomizedHadamard(n, ChunkSeed(0, 0, 0))
    z = torch.empty(rot0.padded)
    back = torch.empty(n)
    z_in = rot0.forward(x)
    wide_y = ShiftFoldSketch(WIDE, ROWS, ChunkSeed(0, 0, 0)).project(x)
    holo = HoloCodec(1)
    holo_n = min(n, 1 << 22)  # codec on a 16 MiB chunk: packing is per chunk
    holo_enc = holo.encode(x[:holo_n], ChunkContext(0, 0, 0, holo_n))
    gx = torch.from_numpy(src[:GAUSS_ELEMS].copy())

    def seed(rep: int) -> ChunkSeed:
        return ChunkSeed(1, rep, 0)

    cases: list[tuple[str, int, Callable[[int], object]]] = [
        ("numpy copy (np.copyto, reference)", n, lambda r: np.copyto(dst, src)),
        (
            "randomized Hadamard rotation, forward",
            n,
            lambda r: RandomizedHadamard(n, seed(r)).forward(x, out=z),
        ),
        (
            "randomized Hadamard rotation, inverse",
            n,
            lambda r: RandomizedHadamard(n, seed(r)).inverse(z_in, out=back),
        ),
        (
            f"shift-fold sketch P x, R={ROWS}, k={WIDE}",
            n,
            lambda r: ShiftFoldSketch(WIDE, ROWS, seed(r)).project(x),
        ),
        (
            f"shift-fold sketch P x, R={ROWS}, k={NARROW}",
            n,
            lambda r: ShiftFoldSketch(NARROW, ROWS, seed(r)).project(x),
        ),
        (
            f"sketch adjoint P^T y, R={ROWS}, k={WIDE} (n outputs)",
            n,
            lambda r: ShiftFoldSketch(WIDE, ROWS, ChunkSeed(0, 0, 0)).adjoint(wide_y, 0, n, back),
        ),
        (
            f"heavy-hitter estimates, median of {ROWS} rows (n outputs)",
            n,
            lambda r: ShiftFoldSketch(WIDE, ROWS, ChunkSeed(0, 0, 0)).estimate(wide_y, 0, n, back),
        ),
        (
            "holo codec encode, 1 bit (rotate + quantize + pack)",
            holo_n,
            lambda r: holo.encode(x[:holo_n], ChunkContext(1, r, 0, holo_n)),
        ),
        (
            "holo codec decode, 1 bit (unpack + inverse)",
            holo_n,
            lambda r: holo.decode(holo_enc, ChunkContext(0, 0, 0, holo_n)),
        ),
        (
            f"dense Gaussian projection, k={GAUSS_K}, regenerated",
            GAUSS_ELEMS,
            lambda r: GaussianProjection(GAUSS_K, GAUSS_ELEMS, seed(r)).apply(gx),
        ),
    ]
    for _, _, fn in cases:  # warm up: first-touch page faults, lazy init
        fn(0)
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for rep in range(args.repeats):
        for name, elems, fn in cases:
            t0 = time.perf_counter()
            fn(rep + 1)
            times[name].append(time.perf_counter() - t0)
            copy_rate = n / times[cases[0][0]][-1]
            ratios[name].append(elems / times[name][-1] / copy_rate)

    print(
        f"{cpu_name()}, torch {torch.__version__}, {args.threads} torch thread(s) "
        f"(numpy copy: 1 thread), input {args.mib} MiB float32, "
        f"median of {args.repeats} repeats"
    )
    print()
    print("| transform | input | GB/s of input | × numpy copy |")
    print("|---|---:|---:|---:|")
    for name, elems, _ in cases:
        rate = 4 * elems / statistics.median(times[name]) / 1e9
        size = f"{4 * elems / (1 << 20):g} MiB" if elems >= 1 << 18 else f"{4 * elems >> 10} KiB"
        shown = f"{rate:.2f}" if rate >= 0.01 else f"{rate * 1e3:.3f} MB/s"
        print(f"| {name} | {size} | {shown} | {statistics.median(ratios[name]):.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
