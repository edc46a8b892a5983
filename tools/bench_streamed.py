"""Layer-streamed SSD inference vs the in-memory forward: tokens/s, peak RSS, equal outputs.

The parent writes (once) a seeded SSD model whose float32 weights are at least 4x the
memory budget, one block at a time, so it never holds the model either. Each measurement
then runs in a fresh subprocess, so its peak RSS (VmHWM) is its own: "streamed" runs
fflnode.ssm.streamed.streamed_forward under the budget, "in-memory" loads every weight and
runs the plain forward. RSS includes the interpreter and torch (~230 MB here before any
work); the budget covers everything the streamer allocates on top of that. The weight
file sits in the page cache after it is written (warm reads).

    PYTHONPATH=. .venv/bin/python tools/bench_streamed.py          # docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fflnode.prism.writer import AtomicSafetensorsWriter
from fflnode.ssm.model import (
    CONFIG_METADATA_KEY,
    Readout,
    SSDBlock,
    SSDConfig,
    SSDModel,
    make_embed,
)
from fflnode.ssm.streamed import SafetensorsWeightSource, load_in_memory, streamed_forward

MIB = 1 << 20
WEIGHTS_OVER_BUDGET = 4  # the target: a model at least this many budgets large
RSS_SLACK = 200 * MIB  # the target: peak RSS under budget + this


def bench_config(args: argparse.Namespace) -> SSDConfig:
    """A byte-token SSD model with enough blocks that its weights exceed 4 budgets."""
    cfg = SSDConfig(
        vocab_sizes=(256,),
        d_model=args.d_model,
        n_layers=1,
        d_state=64,
        headdim=64,
        expand=2,
        mlp_ratio=4,
        chunk_size=64,
        n_outputs=256,
        readout="last",
    )
    with torch.device("meta"):
        block_bytes = 4 * sum(p.numel() for p in SSDBlock(cfg).parameters())
    layers = math.ceil(WEIGHTS_OVER_BUDGET * args.budget_mib * MIB / block_bytes) + 1
    return dataclasses.replace(cfg, n_layers=layers)


def write_model(cfg: SSDConfig, path: Path, seed: int) -> None:
    """The model as a safetensors file, built one unit at a time (never whole in memory)."""
    with torch.device("meta"):
        skeleton = SSDModel(cfg)
    specs = {k: ("F32", tuple(v.shape)) for k, v in skeleton.state_dict().items()}
    torch.manual_seed(seed)
    with AtomicSafetensorsWriter(path, specs, {CONFIG_METADATA_KEY: cfg.to_json()}) as w:
        units = [("embed.", lambda: make_embed(cfg))]
        units += [(f"blocks.{i}.", lambda: SSDBlock(cfg)) for i in range(cfg.n_layers)]
        units += [("readout.", lambda: Readout(cfg))]
        for prefix, build in units:
            for name, t in build().state_dict().items():
                w.write_tensor(prefix + name, t)
        w.commit()


def peak_rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rng = np.random.Generator(np.random.PCG64(args.seed))
    x = torch.as_tensor(rng.integers(0, 256, (args.seqs, args.seq_len)), dtype=torch.long)
    baseline, _ = peak_rss()
    with SafetensorsWeightSource(args.file) as source:
        t0 = time.perf_counter()
        plan = None
        if args.child == "streamed":
            result = streamed_forward(source, x, args.budget_mib * MIB)
            out, plan = result.outputs, result.plan
            load_s = 0.0  # reads overlap compute; they are inside the run time
            stall_s = result.stall_seconds
        else:
            model = load_in_memory(source)
            load_s = stall_s = time.perf_counter() - t0
            with torch.no_grad():
                out = model(x)
        seconds = time.perf_counter() - t0
    _, hwm = peak_rss()
    np.save(args.out, out.numpy())
    report = {
        "seconds": seconds,
        "load_seconds": load_s,
        "stall_seconds": stall_s,
        "tokens": x.numel(),
        "baseline_rss": baseline,
        "peak_rss": hwm,
        "plan_bytes": plan.total_bytes if plan else None,
        "micro_batch": plan.micro_batch if plan else None,
    }
    print(json.dumps(report))


def run_child(mode: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--file",
        str(args.file),
        "--out",
        str(out),
        "--budget-mib",
        str(args.budget_mib),
        "--seqs",
        str(args.seqs),
        "--seq-len",
        str(args.seq_len),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mib", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--seqs", type=int, default=16, help="sequences in the virtual batch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=Path("bench-out/streamed"))
    parser.add_argument("--child", choices=["streamed", "in-memory"], help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    cfg = bench_config(args)
    args.dir.mkdir(parents=True, exist_ok=True)
    args.file = args.dir / f"ssd-d{cfg.d_model}-l{cfg.n_layers}-s{args.seed}.safetensors"
    if not args.file.exists():
        t0 = time.perf_counter()
        write_model(cfg, args.file, args.seed)
        print(f"wrote {args.file} in {time.perf_counter() - t0:.0f} s")
    weights = args.file.stat().st_size
    budget = args.budget_mib * MIB
    print(
        f"model: d_model {cfg.d_model}, {cfg.n_layers} blocks, {weights / MIB:.0f} MiB of "
        f"float32 weights = {weights / budget:.1f} x the {args.budget_mib} MiB budget; "
        f"virtual batch {args.seqs} x {args.seq_len} tokens; {args.threads} threads"
    )
    results = {}
    for mode in ("streamed", "in-memory"):
        results[mode] = run_child(mode, args, args.dir / f"{mode}.npy")
    out_s = np.load(args.dir / "streamed.npy")
    out_m = np.load(args.dir / "in-memory.npy")
    diff = float(np.abs(out_s - out_m).max())
    scale = float(np.abs(out_m).max())
    print(
        f"{'mode':<10} {'tokens/s':>9} {'excl. load':>10} {'waited on reads s':>17} "
        f"{'peak RSS MiB':>12} {'before run':>10} {'plan MiB':>8} {'micro-batch':>11}"
    )
    for mode, r in results.items():
        plan = f"{r['plan_bytes'] / MIB:.0f}" if r["plan_bytes"] else "-"
        mb = str(r["micro_batch"]) if r["micro_batch"] else "-"
        compute = r["tokens"] / (r["seconds"] - r["load_seconds"])
        print(
            f"{mode:<10} {r['tokens'] / r['seconds']:>9.1f} {compute:>10.1f} "
            f"{r['stall_seconds']:>17.2f} {r['peak_rss'] / MIB:>12.0f} "
            f"{r['baseline_rss'] / MIB:>10.0f} {plan:>8} {mb:>11}"
        )
    peak = results["streamed"]["peak_rss"]
    print(
        f"outputs: max |streamed - in-memory| = {diff:.2e} (max |logit| {scale:.2f}), "
        f"bit-identical: {bool(np.array_equal(out_s, out_m))}"
    )
    print(
        f"target: streamed peak RSS {peak / MIB:.0f} MiB < budget + 200 MiB = "
        f"{(budget + RSS_SLACK) / MIB:.0f} MiB: {'met' if peak < budget + RSS_SLACK else 'MISSED'}"
        f"; weights {weights / budget:.1f} x budget >= {WEIGHTS_OVER_BUDGET}: "
        f"{'met' if weights >= WEIGHTS_OVER_BUDGET * budget else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
