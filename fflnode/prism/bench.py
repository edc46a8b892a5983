"""`fflnode bench io FILE`: Prism's read paths against the usual ways to read a checkpoint.

Prints ONE table from one run. Methods are interleaved inside each repeat (the machine is
shared and noisy) and each cell is the median over repeats, with the spread beside it.
Every measurement runs in a fresh subprocess, which reports the seconds of its read
loop (interpreter start and imports excluded) and its peak RSS (VmHWM, or for fio the
child's ru_maxrss). Cold runs first take the file out of the page cache (drop_caches
when permitted, plus posix_fadvise DONTNEED on the file; the header says which); each
warm run follows a full buffered read of the file (fio drops the file's cached pages
before its job, its `invalidate=1` default, so warming once per block is not enough).

Methods: Prism with the io_uring and threads backends (cache policy "auto": O_DIRECT
when the file is cold, the page cache when mincore finds it resident), Python
`readinto` of a reused 4 MiB buffer, `safetensors.torch.load_file`, and
`fio --ioengine=io_uring --direct=1` when fio is installed.

With no FILE, a float32 checkpoint of --size-gib GiB of random data is generated (real
blocks written O_DIRECT, not a sparse file) on a real filesystem and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from fflnode.prism.fs import evict_from_page_cache, filesystem_type, peak_rss
from fflnode.prism.pool import PAGE_SIZE
from fflnode.prism.safetensors import build_header
from fflnode.prism.stream import DEFAULT_DEPTH, REQUEST_BYTES

DEFAULT_SIZE_GIB = 2.0
DEFAULT_REPEATS = 3  # a median of three keeps a 2 GiB run under ~2 minutes
GENERATE_PIECE = 64 << 20  # one O_DIRECT write while generating
GENERATE_TENSORS = 8  # load_file then allocates eight tensors, as for a small model
READINTO_BUFFER = 4 << 20  # DESIGN.md: readinto of a reused 4 MiB buffer peaks here
WORKER_TIMEOUT_S = 600
METHODS = ("prism-io_uring", "prism-threads", "readinto", "load_file", "load_file-pread", "fio")
LABELS = {
    "prism-io_uring": "prism io_uring (depth {depth}, 1 MiB, cache=auto)",
    "prism-threads": "prism threads (depth {depth}, 1 MiB, cache=auto)",
    "readinto": "python readinto, reused 4 MiB buffer",
    "load_file": "safetensors.torch.load_file (default mmap; every page touched)",
    "load_file-pread": "safetensors.torch.load_file(backend='pread')",
    "fio": "fio io_uring O_DIRECT (depth {depth}, 1 MiB)",
}
# Targets the design must meet, same run: (numerator, denominator, condition, minimum).
# safetensors 0.8's default load_file maps the file and reads nothing until a page is
# touched, so it is timed with one touch per page; its copying backend ("pread", the
# behaviour DESIGN.md measured at 1.3 GB/s warm) is the second reference.
TARGETS = (
    ("prism-io_uring", "fio", "cold", 0.9),
    ("prism-io_uring", "load_file", "cold", 1.5),
    ("prism-io_uring", "load_file-pread", "cold", 1.5),
    ("prism-io_uring", "load_file", "warm", 5.0),
    ("prism-io_uring", "load_file-pread", "warm", 5.0),
)


def generate_checkpoint(path: Path, nbytes: int, tensors: int = GENERATE_TENSORS) -> Path:
    """A float32 safetensors file of about `nbytes`, random data, written O_DIRECT."""
    numel = max(1, nbytes // 4 // tensors)
    header, _ = build_header({f"w{i}": ("F32", (numel,)) for i in range(tensors)})
    size = len(header) + 4 * numel * tensors
    rng = np.random.default_rng(0)
    buf = mmap.mmap(-1, GENERATE_PIECE)
    piece = np.frombuffer(buf, dtype=np.uint8)
    piece[:] = rng.integers(0, 256, GENERATE_PIECE, dtype=np.uint8)
    stamp = np.empty(8, dtype=np.uint8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for start in range(0, size, GENERATE_PIECE):
            if start == 0:
                piece[: len(header)] = np.frombuffer(header, dtype=np.uint8)
            elif start == GENERATE_PIECE:
                piece[: len(header)] = rng.integers(0, 256, len(header), dtype=np.uint8)
            stamp[:] = np.frombuffer(np.int64(start).tobytes(), dtype=np.uint8)
            piece[-8:] = stamp  # no two pieces are identical
            os.write(fd, buf)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


# --------------------------------------------------------------------- workers


def _worker(method: str, path: str, depth: int) -> dict[str, float]:
    """Run one method in this (fresh) process: seconds of the read loop, bytes, peak RSS."""
    size = os.stat(path).st_size
    if method.startswith("prism-"):
        import trio

        from fflnode.prism.store import TensorStore

        async def run() -> tuple[float, int]:
            with TensorStore.open(path, backend=method.split("-", 1)[1], depth=depth) as store:
                start, total = time.perf_counter(), 0
                async with store.byte_chunks(0, size) as chunks:
                    async for chunk in chunks:
                        total += chunk.nbytes
                        chunk.release()
                return time.perf_counter() - start, total

        seconds, total = trio.run(run)
        return {"seconds": seconds, "bytes": total, "peak_rss": peak_rss()}
    if method == "readinto":
        buf = bytearray(READINTO_BUFFER)
        start, total = time.perf_counter(), 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
        return {"seconds": time.perf_counter() - start, "bytes": total, "peak_rss": peak_rss()}
    if method.startswith("load_file"):
        import torch
        from safetensors.torch import load_file

        start = time.perf_counter()
        tensors = load_file(path, backend="pread" if method.endswith("pread") else "mmap")
        for t in tensors.values():  # a mapped tensor is read only when its pages are touched
            int(t.reshape(-1).view(torch.uint8)[::PAGE_SIZE].sum())
        seconds = time.perf_counter() - start
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        return {"seconds": seconds, "bytes": total, "peak_rss": peak_rss()}
    if method == "fio":
        return _run_fio(path, size, depth)
    raise SystemExit(f"unknown method {method!r}")


def _run_fio(path: str, size: int, depth: int) -> dict[str, float]:
    span = size // REQUEST_BYTES * REQUEST_BYTES
    command = [
        "fio",
        "--name=prism-bench",
        f"--filename={path}",
        "--readonly",
        "--rw=read",
        f"--bs={REQUEST_BYTES}",
        f"--iodepth={depth}",
        "--ioengine=io_uring",
        "--direct=1",
        f"--size={span}",
        "--output-format=json",
    ]
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=WORKER_TIMEOUT_S
    )
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["read"]
    seconds = job["runtime"] / 1000 if job["runtime"] else job["io_bytes"] / job["bw_bytes"]
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"seconds": seconds, "bytes": job["io_bytes"], "peak_rss": rss}


# ---------------------------------------------------------------------- driver


def _measure(method: str, path: Path, depth: int) -> dict[str, float]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fflnode.prism.bench",
            "--worker",
            method,
            str(path),
            "--depth",
            str(depth),
        ],
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _warm(path: Path) -> None:
    buf = bytearray(READINTO_BUFFER)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    mid = statistics.median(values)
    return f"{mid:.2f} ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else f"{mid:.2f}"


def run(
    path: Path,
    methods: Sequence[str],
    repeats: int,
    depth: int,
    drop_all: bool,
    out: TextIO = sys.stdout,
) -> dict[str, dict[str, list[float]]]:
    """Measure, print the table, return {method: {"cold": [GB/s], "warm": [...], "rss": [...]}}."""
    results = {m: {"cold": [], "warm": [], "rss": []} for m in methods}
    eviction = "not run"
    for r in range(repeats):
        order = list(methods[r % len(methods) :]) + list(methods[: r % len(methods)])
        for condition in ("cold", "warm"):
            for method in order:
                if condition == "cold":
                    eviction = evict_from_page_cache(path, drop_all=drop_all)
                else:
                    # Before each method, not once per block: fio drops the file's cached
                    # pages before its job (its invalidate=1 default).
                    _warm(path)
                m = _measure(method, path, depth)
                results[method][condition].append(m["bytes"] / m["seconds"] / 1e9)
                results[method]["rss"].append(m["peak_rss"])
                rate, rss = m["bytes"] / m["seconds"] / 1e9, m["peak_rss"] / 1e6
                print(
                    f"  repeat {r + 1}/{repeats} {condition:4} {method:15} "
                    f"{rate:6.2f} GB/s  peak RSS {rss:7.1f} MB",
                    file=sys.stderr,
                )
    size = path.stat().st_size
    print(
        f"\nPrism I/O: {path} ({size / 2**30:.2f} GiB, {filesystem_type(path)}), {repeats} repeats "
        f"interleaved, median (min–max) GB/s; cold = {eviction} before each run; warm = after a "
        f"full buffered read before each run. Peak RSS: max over runs, fresh process per run.\n",
        file=out,
    )
    print("| method | cold GB/s | warm GB/s | peak RSS MB |", file=out)
    print("|---|---|---|---|", file=out)
    for method in methods:
        res = results[method]
        label = LABELS[method].format(depth=depth)
        rss = f"{max(res['rss']) / 1e6:.0f}" if res["rss"] else "n/a"
        print(f"| {label} | {_cell(res['cold'])} | {_cell(res['warm'])} | {rss} |", file=out)
    lines = []
    for num, den, condition, minimum in TARGETS:
        if (
            num in results
            and den in results
            and results[num][condition]
            and results[den][condition]
        ):
            ratio = statistics.median(results[num][condition]) / statistics.median(
                results[den][condition]
            )
            verdict = "met" if ratio >= minimum else "NOT met"
            lines.append(f"{condition} {num} / {den} = {ratio:.2f} (target ≥ {minimum}: {verdict})")
    if lines:
        print("\nTargets: " + "; ".join(lines), file=out)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fflnode bench io", description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?", help="safetensors file to read (default: generate one)")
    parser.add_argument("--size-gib", type=float, default=DEFAULT_SIZE_GIB)
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH)
    parser.add_argument(
        "--dir", help="where to generate the file (default: a real-filesystem temp dir)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument(
        "--no-drop-caches",
        action="store_true",
        help="cold runs use posix_fadvise DONTNEED only, never /proc/sys/vm/drop_caches",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.file, args.depth)))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    if "fio" in methods and shutil.which("fio") is None:
        print("fio not installed: skipping the fio row (apt-get install fio)", file=sys.stderr)
        methods.remove("fio")
    generated = None
    if args.file:
        path = Path(args.file)
    else:
        directory = Path(args.dir or tempfile.gettempdir())
        if filesystem_type(directory) == "tmpfs":
            directory = Path.cwd()
        if filesystem_type(directory) == "tmpfs":
            parser.error(f"{directory} is tmpfs: pass --dir on a real filesystem")
        generated = directory / f"prism-bench-{os.getpid()}.safetensors"
        print(f"generating {args.size_gib:g} GiB at {generated}", file=sys.stderr)
        generate_checkpoint(generated, int(args.size_gib * 2**30))
        path = generated
    try:
        run(path, methods, args.repeats, args.depth, drop_all=not args.no_drop_caches)
    finally:
        if generated is not None:
            generated.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
