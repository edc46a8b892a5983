#!/usr/bin/env python3
"""Benchmark the final merge: wall time and per-node peak RSS for N nodes merging a
synthetic float32 model, against a tiny model in the same run (the RSS of a node that
merges next to nothing: interpreter, torch, libp2p).

    .venv/bin/python tools/bench_merge.py --nodes 4 --mb 64 --repeats 3

Each repeat runs `fflnode testnet --task synthetic` (real processes, real sockets), big
and tiny runs interleaved; the table shows medians. Every run must end with hashes equal
to the reference the testnet computes itself, or the benchmark fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TINY_MB = 0.1  # a model small enough that its merge costs no measurable memory
RUN_TIMEOUT_S = 900


def run(nodes: int, mb: float, shards: int, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "fflnode",
        "testnet",
        "--task",
        "synthetic",
        "--nodes",
        str(nodes),
        "--synthetic-mb",
        str(mb),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    report = json.loads((out / "report.json").read_text())
    if proc.returncode != 0 or not report["merge"]["hashes_agree"]:
        sys.exit(f"merge run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    nodes_ = report["nodes"].values()
    moved = sum(n["bytes_sent"] for n in nodes_)
    return {
        "seconds": max(n["merge"]["seconds"] for n in nodes_),
        "phases": {
            k: max(n["merge"]["phases"].get(k, 0.0) for n in nodes_)
            for k in ("agree", "reduce_scatter", "all_gather", "verify")
        },
        "rss": [n["peak_rss_mb"] for n in nodes_],
        "moved_mb": moved / 1e6,
        "owned": [len(n["merge"]["owned"]) for n in nodes_],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--mb", type=float, default=64.0)
    p.add_argument("--shards", type=int, default=0, help="M (0 = one per node)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    big, tiny = [], []
    with tempfile.TemporaryDirectory(prefix="bench-merge-", dir=".") as d:
        for r in range(a.repeats):
            tiny.append(run(a.nodes, TINY_MB, a.shards, Path(d) / f"tiny{r}"))
            big.append(run(a.nodes, a.mb, a.shards, Path(d) / f"big{r}"))
            print(
                f"repeat {r + 1}/{a.repeats}: merge {big[-1]['seconds']:.2f} s, "
                f"max RSS {max(big[-1]['rss']):.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    med = statistics.median
    m = a.shards or a.nodes
    print(
        f"\nfinal merge, {a.nodes} nodes, M={m} shards, {a.mb:g} MB float32 model, "
        f"median of {a.repeats} (tiny-model runs interleaved)\n"
    )
    print(
        f"| {'model':>8} | {'merge s':>8} | {'reduce-scatter s':>16} | {'all-gather s':>12} "
        f"| {'verify s':>8} | {'moved MB':>8} | {'peak RSS/node MB (max)':>22} |"
    )
    print(f"|{'-' * 10}|{'-' * 10}|{'-' * 18}|{'-' * 14}|{'-' * 10}|{'-' * 10}|{'-' * 24}|")
    for label, runs in ((f"{TINY_MB:g} MB", tiny), (f"{a.mb:g} MB", big)):
        print(
            f"| {label:>8} | {med(x['seconds'] for x in runs):>8.2f} | "
            f"{med(x['phases']['reduce_scatter'] for x in runs):>16.2f} | "
            f"{med(x['phases']['all_gather'] for x in runs):>12.2f} | "
            f"{med(x['phases']['verify'] for x in runs):>8.2f} | "
            f"{med(x['moved_mb'] for x in runs):>8.1f} | "
            f"{med(max(x['rss']) for x in runs):>22.0f} |"
        )
    delta = med(max(b["rss"]) - max(t["rss"]) for b, t in zip(big, tiny, strict=True))
    per_shard = a.mb / m
    print(
        f"\nRSS the merge adds per node (max node, median): {delta:.0f} MB "
        f"= {delta / per_shard:.1f} x one shard ({per_shard:.0f} MB); the model is {a.mb:g} MB"
    )
    print(f"most shards owned by one node: {max(max(x['owned']) for x in big)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
