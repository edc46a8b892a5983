#!/usr/bin/env python3
"""Benchmark state pulls inside the daemons: one request per context (before) vs batched.

    .venv/bin/python tools/bench_state_pull.py --repeats 2

Each trial is a real run, `fflnode states` (the testnet on the mqar task): 4 node
processes on 127.0.0.1, one training round (the weights do not change what is pulled),
the weight merge, then the state phase, in which every node pulls the 256 one-layer
MQAR states (4 heads x 32 x 64, 32 KiB in float32) of each of the 3 others at once, 768
per node, each body validated against the node's own model before it is kept. Modes,
interleaved (repeat r starts at mode r mod M), differ only in [states]:

  batch 1          one `get` per context, 8 in flight: the path before batching
  batch 32         runs of 32 consecutive contexts per request, 2 in flight
  batch 32, holo8  the same with states shipped at 8 bits (the default codec)

From each node's result.json: the seconds of its pull step (all four pull concurrently;
the table shows the slowest node's, median and min-max over repeats) and bytes pulled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = (
    ("batch 1", ["states.batch=1", 'states.codec="none"']),
    ("batch 32", ["states.batch=32", 'states.codec="none"']),
    ("batch 32, holo8", ["states.batch=32", 'states.codec="holo"', "states.bits=8"]),
)
NODES, CONTEXTS = 4, 256
RUN_TIMEOUT_S = 900


def trial(sets: list[str], out: Path) -> tuple[float, int, int]:
    """(slowest node's pull seconds, bytes pulled per node, requests per node)."""
    cmd = [sys.executable, "-m", "fflnode", "states", "--nodes", str(NODES), "--rounds", "1",
           "--local-steps", "1", "--no-baseline", "--no-plot", "--quiet", "--out", str(out),
           "--task-option", f"contexts={CONTEXTS}"]  # fmt: skip
    for kv in sets:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        raise SystemExit(f"trial {sets} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    epochs = [n["states"]["epochs"][0] for n in report["nodes"].values()]
    batch = next(n["states"]["batch"] for n in report["nodes"].values())
    requests = (NODES - 1) * -(-CONTEXTS // batch)
    slowest = max(e["seconds"]["pull"] for e in epochs)
    return slowest, max(e["bytes_pulled"] for e in epochs), requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name, _ in MODES}
    info: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-state-pull-") as tmp:
        for r in range(args.repeats):
            for k in range(len(MODES)):
                name, sets = MODES[(r + k) % len(MODES)]
                s, nbytes, requests = trial(sets, Path(tmp) / f"r{r}-{k}")
                seconds[name].append(s)
                info[name] = (nbytes, requests)
                print(f"  repeat {r}: {name}: slowest pull {s:.2f} s", flush=True)
    base = statistics.median(seconds["batch 1"])
    print(f"{NODES} daemons, each pulling {CONTEXTS} states from each of the other {NODES - 1} "
          f"at once; {args.repeats} repeats")  # fmt: skip
    print(f"{'mode':<17}{'requests/node':>14}{'MB/node':>9}{'slowest pull s':>16}"
          f"{'min-max':>14}{'speed-up':>10}")  # fmt: skip
    for name, _ in MODES:
        xs = seconds[name]
        med = statistics.median(xs)
        nbytes, requests = info[name]
        print(f"{name:<17}{requests:>14}{nbytes / 1e6:>9.2f}{med:>16.2f}"
              f"{f'{min(xs):.2f}-{max(xs):.2f}':>14}{base / med:>9.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
