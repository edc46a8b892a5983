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
`readinto` of a reused 4 MiB buffer, `safetensors.torch.load_file`, and, when fio is
installed, `fio --ioengine=io_uring --direct=1` twice: with fio's default buffers (4 KiB
pages) and with `--iomem=mmaphuge` (2 MiB huge pages, as Prism's pool uses). The
device limit is the faster of the two, and Prism's cold rate is reported against both.

Huge pages for fio: `--iomem=mmaphuge` maps hugetlb pages, so it needs vm.nr_hugepages
(HUGEPAGES_FOR_FIO). Run as root, the benchmark raises /proc/sys/vm/nr_hugepages for the
run and always writes the previous value back (finally, also on error, Ctrl-C or
SIGTERM); otherwise the huge-page row is skipped with the sysctl to run.

Cold as root means `echo 3 > /proc/sys/vm/drop_caches` (page cache, dentries and
inodes) plus posix_fadvise(DONTNEED) on the file before every cold run; not root, only
the fadvise, and the header says so.

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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import numpy as np

from fflnode.prism.fs import evict_from_page_cache, filesystem_type, peak_rss
from fflnode.prism.pool import HUGE_PAGE, PAGE_SIZE
from fflnode.prism.safetensors import build_header
from fflnode.prism.stream import DEFAULT_DEPTH, REQUEST_BYTES

DEFAULT_SIZE_GIB = 2.0
DEFAULT_REPEATS = 3  # a median of three keeps a 2 GiB run under ~2 minutes
GENERATE_PIECE = 64 << 20  # one O_DIRECT write while generating
GENERATE_TENSORS = 8  # load_file then allocates eight tensors, as for a small model
READINTO_BUFFER = 4 << 20  # DESIGN.md: readinto of a reused 4 MiB buffer peaks here
WORKER_TIMEOUT_S = 600
METHODS = (
    "prism-io_uring",
    "prism-threads",
    "readinto",
    "load_file",
    "load_file-pread",
    "fio",
    "fio-hugepage",
)
FIO_METHODS = ("fio", "fio-hugepage")
# fio's buffers for --iomem=mmaphuge are depth x 1 MiB (8 MiB, 4 huge pages, at depth 8)
# rounded up to a huge page; DESIGN.md measured 32 as enough, so at least that many are
# reserved. 32 x 2 MiB = 64 MiB taken from the machine for the run, then given back.
HUGEPAGES_FOR_FIO = 32
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
MEMINFO = Path("/proc/meminfo")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# 3 = page cache + dentries and inodes (proc(5)): the coldest state short of a reboot.
DROP_ALL_CACHES = "3"
LABELS = {
    "prism-io_uring": "prism io_uring (depth {depth}, 1 MiB, cache=auto)",
    "prism-threads": "prism threads (depth {depth}, 1 MiB, cache=auto)",
    "readinto": "python readinto, reused 4 MiB buffer",
    "load_file": "safetensors.torch.load_file (default mmap; every page touched)",
    "load_file-pread": "safetensors.torch.load_file(backend='pread')",
    "fio": "fio io_uring O_DIRECT (depth {depth}, 1 MiB), default buffers (4 KiB pages)",
    "fio-hugepage": "fio io_uring O_DIRECT (depth {depth}, 1 MiB), --iomem=mmaphuge (2 MiB pages)",
}
# Targets the design must meet, same run: (numerator, denominator, condition, minimum).
# FIO_BEST is the faster fio variant by median cold rate: the device limit. safetensors
# 0.8's default load_file maps the file and reads nothing until a page is touched, so
# it is timed with one touch per page; its copying backend ("pread", the behaviour
# DESIGN.md measured at 1.3 GB/s warm) is the second reference.
FIO_BEST = "faster fio"
TARGETS = (
    ("prism-io_uring", FIO_BEST, "cold", 0.9),
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
    if method in FIO_METHODS:
        return _run_fio(path, size, depth, hugepages=method == "fio-hugepage")
    raise SystemExit(f"unknown method {method!r}")


def fio_command(path: str, size: int, depth: int, hugepages: bool) -> list[str]:
    """The fio job: io_uring, O_DIRECT, sequential 1 MiB reads at `depth` over the whole
    file (rounded down to 1 MiB); with `hugepages`, buffers from hugetlb pages."""
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
    if hugepages:
        command.append("--iomem=mmaphuge")  # anonymous MAP_HUGETLB: needs vm.nr_hugepages
    return command


def _run_fio(path: str, size: int, depth: int, hugepages: bool) -> dict[str, float]:
    command = fio_command(path, size, depth, hugepages)
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=WORKER_TIMEOUT_S
    )
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["read"]
    seconds = job["runtime"] / 1000 if job["runtime"] else job["io_bytes"] / job["bw_bytes"]
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"seconds": seconds, "bytes": job["io_bytes"], "peak_rss": rss}


# ------------------------------------------------------------ machine settings


def hugepages_needed(depth: int) -> int:
    """Huge pages to reserve for fio's --iomem=mmaphuge at `depth` 1 MiB requests."""
    buffers = -(-depth * REQUEST_BYTES // HUGE_PAGE)
    return max(HUGEPAGES_FOR_FIO, buffers + 1)


def _free_hugepages() -> int:
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


@contextmanager
def reserved_hugepages(
    count: int,
    control: Path = NR_HUGEPAGES,
    free_pages: Callable[[], int] = _free_hugepages,
) -> Iterator[str | None]:
    """Make at least `count` hugetlb pages available for the block; yields None when it
    could, else why not (the caller skips the huge-page row and says so).

    When too few are free and `control` is writable (root), writes `count` there and,
    whatever happens in the block (error, Ctrl-C, SIGTERM turned into SystemExit by
    `main`), writes the previous value back afterwards. Never lowers the pool.
    """
    previous = int(control.read_text().split()[0])
    if free_pages() >= count:
        yield None
        return
    refused = None
    try:
        control.write_text(f"{max(previous, count)}\n")
    except OSError as e:
        refused = e.strerror
    if refused is not None:
        yield (
            f"vm.nr_hugepages={previous} with {free_pages()} free and it cannot be raised "
            f"({refused}): run as root, or `sysctl vm.nr_hugepages={count}` first and set "
            f"it back to {previous} afterwards"
        )
        return
    try:
        got = free_pages()
        yield (
            None
            if got >= count
            else f"vm.nr_hugepages raised to {count} but only {got} pages are free "
            "(memory too fragmented for 2 MiB pages?)"
        )
    finally:
        control.write_text(f"{previous}\n")


def make_cold(path: Path, drop_all: bool) -> str:
    """Take `path` out of the page cache; returns what was done, for the table header.

    Always posix_fadvise(DONTNEED) on the file (no privilege needed). With `drop_all`,
    also `echo 3 > /proc/sys/vm/drop_caches`, which needs root.
    """
    evict_from_page_cache(path, drop_all=False)
    if not drop_all:
        return "posix_fadvise(DONTNEED) (drop_caches disabled by --no-drop-caches)"
    os.sync()  # drop_caches drops only clean pages
    try:
        DROP_CACHES.write_text(DROP_ALL_CACHES + "\n")
    except OSError as e:
        return (
            f"posix_fadvise(DONTNEED) only: drop_caches refused ({e.strerror}; "
            f"needs root: echo {DROP_ALL_CACHES} > {DROP_CACHES})"
        )
    return f"drop_caches={DROP_ALL_CACHES} + posix_fadvise(DONTNEED)"


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so every `finally` (nr_hugepages, the file) runs


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


def faster_fio(results: dict[str, dict[str, list[float]]], condition: str) -> str | None:
    """The fio variant with the higher median rate under `condition` (None without fio)."""
    present = [m for m in FIO_METHODS if m in results and results[m][condition]]
    if not present:
        return None
    return max(present, key=lambda m: statistics.median(results[m][condition]))


def ratio_lines(
    results: dict[str, dict[str, list[float]]], numerator: str, condition: str
) -> list[tuple[str, float, list[float]]]:
    """(denominator, ratio of medians, per-repeat ratios) of `numerator`'s rate against
    each fio variant and the faster one. Per-repeat ratios pair runs of the same repeat
    (interleaved, so they shared the machine's load)."""
    out = []
    num = results.get(numerator, {}).get(condition, [])
    if not num:
        return out
    best = faster_fio(results, condition)
    for den in (*FIO_METHODS, FIO_BEST):
        key = best if den == FIO_BEST else den
        if key is None or key not in results or not results[key][condition]:
            continue
        vals = results[key][condition]
        paired = [a / b for a, b in zip(num, vals, strict=False)]
        out.append((den, statistics.median(num) / statistics.median(vals), paired))
    return out


def run(
    path: Path,
    methods: Sequence[str],
    repeats: int,
    depth: int,
    drop_all: bool,
    out: TextIO = sys.stdout,
    hugepages_note: str | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Measure, print the table, return {method: {"cold": [GB/s], "warm": [...], "rss": [...]}}."""
    results = {m: {"cold": [], "warm": [], "rss": []} for m in methods}
    eviction = "not run"
    for r in range(repeats):
        order = list(methods[r % len(methods) :]) + list(methods[: r % len(methods)])
        for condition in ("cold", "warm"):
            for method in order:
                if condition == "cold":
                    eviction = make_cold(path, drop_all)
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
    if hugepages_note:
        print(f"fio --iomem=mmaphuge not run: {hugepages_note}\n", file=out)
    print("| method | cold GB/s | warm GB/s | peak RSS MB |", file=out)
    print("|---|---|---|---|", file=out)
    for method in methods:
        res = results[method]
        label = LABELS[method].format(depth=depth)
        rss = f"{max(res['rss']) / 1e6:.0f}" if res["rss"] else "n/a"
        print(f"| {label} | {_cell(res['cold'])} | {_cell(res['warm'])} | {rss} |", file=out)
    comparisons = ratio_lines(results, "prism-io_uring", "cold")
    if comparisons:
        best = faster_fio(results, "cold")
        print(
            "\nCold prism io_uring against fio, same run: ratio of medians (min–max of the "
            "per-repeat ratios)\n",
            file=out,
        )
        print("| against | ratio |", file=out)
        print("|---|---|", file=out)
        for den, ratio, paired in comparisons:
            name = f"{FIO_BEST} ({best})" if den == FIO_BEST else den
            spread = f" ({min(paired):.2f}–{max(paired):.2f})" if len(paired) > 1 else ""
            print(f"| {name} | {ratio:.2f}{spread} |", file=out)
    lines = []
    for num, den, condition, minimum in TARGETS:
        den_key = faster_fio(results, condition) if den == FIO_BEST else den
        if (
            num in results
            and den_key in results
            and results[num][condition]
            and results[den_key][condition]
        ):
            ratio = statistics.median(results[num][condition]) / statistics.median(
                results[den_key][condition]
            )
            verdict = "met" if ratio >= minimum else "NOT met"
            name = f"{den} ({den_key})" if den == FIO_BEST else den
            lines.append(
                f"{condition} {num} / {name} = {ratio:.2f} (target ≥ {minimum}: {verdict})"
            )
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
    if any(m in methods for m in FIO_METHODS) and shutil.which("fio") is None:
        print(
            "fio not installed: skipping the fio rows, so there is no device-limit reference "
            "(install it: apt-get install fio)",
            file=sys.stderr,
        )
        methods = [m for m in methods if m not in FIO_METHODS]
    drop_all = not args.no_drop_caches
    if drop_all and os.geteuid() != 0:
        print(
            f"not root: cold runs use posix_fadvise(DONTNEED) on the file only; "
            f"echo {DROP_ALL_CACHES} > {DROP_CACHES} needs root",
            file=sys.stderr,
        )
    previous_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    generated = None
    try:
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
        if filesystem_type(path) == "tmpfs":
            print(f"warning: {path} is on tmpfs: these are RAM copies, not reads", file=sys.stderr)
        if "fio-hugepage" in methods:
            with reserved_hugepages(hugepages_needed(args.depth)) as why_not:
                if why_not:
                    print(f"skipping fio --iomem=mmaphuge: {why_not}", file=sys.stderr)
                    methods = [m for m in methods if m != "fio-hugepage"]
                run(path, methods, args.repeats, args.depth, drop_all, hugepages_note=why_not)
        else:
            run(path, methods, args.repeats, args.depth, drop_all)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if generated is not None:
            generated.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
