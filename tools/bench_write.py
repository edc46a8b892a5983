#!/usr/bin/env python3
"""Prism write benchmark: the io_uring writer against fio and buffered Python writes.

Usage: .venv/bin/python tools/bench_write.py [--dir DIR] [--size-gib 2] [--repeats 5]
       [--depth 8] [--methods prism-io_uring,fio,...]

Prints ONE table from one run. Every repeat runs every method once, in a shuffled order
(seeded; the machine is shared and noisy, and a fixed rotation would give each method
the same predecessor every time), each in a fresh subprocess that writes a fresh file
of the same size: the file is deleted, recreated and preallocated with fallocate before
each run, outside the timing (fio's own default, fallocate=native, so every method
writes into the same kind of extents). Cells are medians over repeats with (min–max).

Methods:
- prism-io_uring: fflnode.prism.WriteStream, io_uring backend, 1 MiB requests, queue
  depth 8, O_DIRECT from a reused 4 MiB source; timed to the last completion (no fsync,
  as fio: an O_DIRECT completion means the device has the data).
- prism-io_uring+fdatasync: the same, timed through a final fdatasync.
- prism-threads: the same WriteStream on the threads backend (os.pwritev O_DIRECT).
- fio: `fio --rw=write --ioengine=io_uring --direct=1 --bs=1M --iodepth=8
  --iomem=mmaphuge`. mmaphuge needs hugetlb pages: around each fio run the script makes
  32 available with fflnode.prism.bench.reserved_hugepages (as root it raises
  vm.nr_hugepages and always writes the previous value back, also on an error or
  SIGTERM); where it cannot, that fio run is skipped and the header says why. fio is not
  installed by this script (apt-get install fio).
- python-buffered+fsync: `open(path, "wb")` writes of a reused 4 MiB buffer through the
  page cache, then os.fsync, timed through the fsync.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

METHODS = (
    "prism-io_uring",
    "prism-io_uring+fdatasync",
    "prism-threads",
    "fio",
    "python-buffered+fsync",
)
LABELS = {
    "prism-io_uring": "prism WriteStream io_uring (depth {depth}, 1 MiB, O_DIRECT)",
    "prism-io_uring+fdatasync": "prism WriteStream io_uring + fdatasync",
    "prism-threads": "prism WriteStream threads (depth {depth}, 1 MiB, O_DIRECT)",
    "fio": "fio io_uring O_DIRECT (depth {depth}, 1 MiB, --iomem=mmaphuge)",
    "python-buffered+fsync": "python buffered write, reused 4 MiB buffer, + fsync",
}
# (numerator, denominator) ratios printed under the table.
RATIOS = (
    ("prism-io_uring", "fio"),
    ("prism-threads", "fio"),
    ("prism-io_uring", "python-buffered+fsync"),
    ("prism-io_uring+fdatasync", "python-buffered+fsync"),
)
DEFAULT_SIZE_GIB = 2.0
DEFAULT_REPEATS = 5
DEFAULT_DEPTH = 8  # DESIGN.md: queue depth 4-8 with 1 MiB requests reaches the device
SOURCE_BYTES = 4 << 20  # one reused source buffer, as a producer of chunks would have
REQUEST_BYTES = 1 << 20
WORKER_TIMEOUT_S = 600
SHUFFLE_SEED = 20261205  # the order of methods in each repeat; fixed so runs compare


# --------------------------------------------------------------------- workers


def _source() -> bytearray:
    import numpy as np

    return bytearray(np.random.default_rng(0).integers(0, 256, SOURCE_BYTES, dtype=np.uint8))


def _worker(method: str, path: str, size: int, depth: int) -> dict[str, float]:
    """Run one method in this fresh process: seconds of the timed part, bytes, peak RSS."""
    if method.startswith("prism-"):
        import trio

        from fflnode.prism.fs import peak_rss
        from fflnode.prism.write_stream import WriteStream

        backend = "threads" if method == "prism-threads" else "io_uring"
        source = _source()

        async def run() -> float:
            async with WriteStream(path, backend=backend, depth=depth) as w:
                if w.backend != backend:
                    raise SystemExit(f"{method}: got backend {w.backend}: {w.reason}")
                start = time.perf_counter()
                for offset in range(0, size, SOURCE_BYTES):
                    source[:8] = offset.to_bytes(8, "little")  # no two pieces identical
                    await w.write(offset, memoryview(source)[: min(SOURCE_BYTES, size - offset)])
                await w.flush()
                if method.endswith("+fdatasync"):
                    await w.sync()
                return time.perf_counter() - start

        seconds = trio.run(run)
        return {"seconds": seconds, "bytes": size, "peak_rss": peak_rss()}
    if method == "python-buffered+fsync":
        from fflnode.prism.fs import peak_rss

        source = _source()
        start = time.perf_counter()
        with open(path, "r+b") as f:  # the harness created and preallocated it
            for offset in range(0, size, SOURCE_BYTES):
                source[:8] = offset.to_bytes(8, "little")
                f.write(memoryview(source)[: min(SOURCE_BYTES, size - offset)])
            f.flush()
            os.fsync(f.fileno())
        return {"seconds": time.perf_counter() - start, "bytes": size, "peak_rss": peak_rss()}
    if method == "fio":
        return _run_fio(path, size, depth)
    raise SystemExit(f"unknown method {method!r}")


def _run_fio(path: str, size: int, depth: int) -> dict[str, float]:
    command = [
        "fio",
        "--name=prism-write-bench",
        f"--filename={path}",
        "--rw=write",
        "--ioengine=io_uring",
        "--direct=1",
        "--bs=1M",
        f"--iodepth={depth}",
        "--iomem=mmaphuge",  # hugetlb buffers: the driver reserved the pages
        f"--size={size}",
        "--output-format=json",
    ]
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=WORKER_TIMEOUT_S
    )
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["write"]
    seconds = job["runtime"] / 1000 if job["runtime"] else job["io_bytes"] / job["bw_bytes"]
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"seconds": seconds, "bytes": job["io_bytes"], "peak_rss": rss}


# ---------------------------------------------------------------------- driver


def _fresh_file(path: Path, size: int) -> None:
    """Delete, recreate and preallocate `path` (outside any timing), then flush the
    machine's dirty pages so one run's writeback does not land in the next run."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    os.sync()


def _measure(method: str, path: Path, size: int, depth: int) -> dict[str, float]:
    """Run one method in a fresh worker process, in its own process group: on an error,
    a timeout or SIGTERM the whole group (the worker and the fio it started) is killed
    before the driver deletes the file, so nothing keeps writing behind it."""
    command = [sys.executable, __file__, "--worker", method, "--file", str(path)]
    command += ["--bytes", str(size), "--depth", str(depth)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=WORKER_TIMEOUT_S)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed: {stderr.strip()[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    mid = statistics.median(values)
    return f"{mid:.2f} ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else f"{mid:.2f}"


def run(
    directory: Path, methods: Sequence[str], size: int, repeats: int, depth: int
) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {m: {"rate": [], "rss": []} for m in methods}
    from fflnode.prism.bench import hugepages_needed, reserved_hugepages
    from fflnode.prism.fs import filesystem_type

    path = directory / f"prism-write-bench-{os.getpid()}.bin"
    shuffle = random.Random(SHUFFLE_SEED)
    skipped: list[str] = []
    try:
        for r in range(repeats):
            order = list(methods)
            shuffle.shuffle(order)
            for method in order:
                _fresh_file(path, size)
                if method == "fio":
                    # Raised for this run only (and put back), so a setting another
                    # process changes meanwhile cannot leave fio without its pages.
                    with reserved_hugepages(hugepages_needed(depth)) as why_not:
                        if why_not is not None:
                            skipped.append(why_not)
                            print(f"  skipping fio: {why_not}", file=sys.stderr)
                            continue
                        m = _measure(method, path, size, depth)
                else:
                    m = _measure(method, path, size, depth)
                rate = m["bytes"] / m["seconds"] / 1e9
                results[method]["rate"].append(rate)
                results[method]["rss"].append(m["peak_rss"])
                print(
                    f"  repeat {r + 1}/{repeats} {method:26} {rate:6.2f} GB/s  "
                    f"peak RSS {m['peak_rss'] / 1e6:7.1f} MB",
                    file=sys.stderr,
                )
    finally:
        path.unlink(missing_ok=True)
    print(
        f"\nPrism writes: {size / 2**30:.2f} GiB sequential into a fresh preallocated file on "
        f"{directory} ({filesystem_type(directory)}), {repeats} repeats interleaved in a "
        f"shuffled order, median (min–max) GB/s. Peak RSS: max over runs, fresh process per "
        f"run. fio's hugetlb buffers: vm.nr_hugepages at least {hugepages_needed(depth)} "
        f"around each fio run (raised as root and put back).\n"
    )
    if skipped:
        print(f"fio --iomem=mmaphuge skipped {len(skipped)} times: {skipped[0]}\n")
    print("| method | write GB/s | peak RSS MB |")
    print("|---|---|---|")
    for method in methods:
        res = results[method]
        label = LABELS[method].format(depth=depth)
        rss = f"{max(res['rss']) / 1e6:.0f}" if res["rss"] else "n/a"
        print(f"| {label} | {_cell(res['rate'])} | {rss} |")
    lines = []
    for num, den in RATIOS:
        if results.get(num, {}).get("rate") and results.get(den, {}).get("rate"):
            ratio = statistics.median(results[num]["rate"]) / statistics.median(
                results[den]["rate"]
            )
            lines.append(f"{num} / {den} = {ratio:.2f}")
    if lines:
        print("\nRatios of medians: " + "; ".join(lines))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=DEFAULT_SIZE_GIB)
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH)
    parser.add_argument("--dir", help="where to write (default: a real-filesystem temp dir)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.file, args.bytes, args.depth)))
        return 0
    from fflnode.prism.fs import filesystem_type

    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    if "fio" in methods and shutil.which("fio") is None:
        print("fio not installed: skipping the fio row (apt-get install fio)", file=sys.stderr)
        methods.remove("fio")
    directory = Path(args.dir or tempfile.gettempdir())
    if filesystem_type(directory) == "tmpfs" and not args.dir:
        directory = Path.cwd()
    if filesystem_type(directory) == "tmpfs":
        parser.error(f"{directory} is tmpfs: O_DIRECT writes are moot there; pass --dir")
    size = int(args.size_gib * 2**30) // REQUEST_BYTES * REQUEST_BYTES
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        run(directory, methods, size, args.repeats, args.depth)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so every `finally` (nr_hugepages, the file) runs


if __name__ == "__main__":
    sys.exit(main())
