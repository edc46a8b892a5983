"""Out-of-core training vs in-memory training of the same SSD LM: peak RSS, tokens/s, I/O.

Each arm runs in a fresh subprocess, so its peak RSS (VmHWM) is its own, with the page
cache dropped before it (`sync; echo 3 > /proc/sys/vm/drop_caches`, root only; the table
says when it could not). Arms alternate (ooc, mem, ooc, mem, ...) and the table gives
medians of the repeats. "ooc" is fflnode.train.outofcore.OutOfCoreTrainer under
--budget-mb; "mem" is LocalTrainer with the budget lifted. Both use the text task's SSD
LM with Adam, the same seed and batches; one warm-up step is excluded from tokens/s.

Columns: peak RSS (VmHWM) over the baseline during the timed steps, and over everything
after the baseline: building the model (the out-of-core arm builds it from its meta
skeleton, one stage at a time into the block file, so it is never whole in memory; on
CUDA it is still built whole, then moved), the warm-up step and the steps; tokens/s;
the out-of-core arm's I/O wait fraction (time blocked on reads and write-backs / step
time) and GB read and written per step, beside the schedule's minimum (computed: reads
4·|θ|·(1 + s) bytes, weights twice and state once, writes 4·|θ|·s, for s = 3 tensors
per parameter with Adam).

    sudo PYTHONPATH=. .venv/bin/python tools/bench_outofcore.py --dir /work/scratch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

MiB = 1 << 20
CHILD_TIMEOUT_S = 3600  # a step of a 2 GiB model on one core takes minutes

CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    from fflnode.prism.fs import peak_rss, reset_peak_rss, status_bytes
    from fflnode.train.outofcore import OutOfCoreTrainer, in_memory_bytes, pin_allocator
    from fflnode.train.task import build_model, build_skeleton, load_task, task_chain
    from fflnode.train.trainer import BatchStream, LocalTrainer, TrainSettings

    arm, directory = sys.argv[1], Path(sys.argv[2])
    budget, steps, threads = map(int, sys.argv[3:6])
    opts = json.loads(sys.argv[6])
    device = torch.device(sys.argv[7])
    torch.set_num_threads(threads)
    loaded = load_task("text", opts, Path("."))
    w = torch.zeros(4, requires_grad=True)  # torch's lazy parts belong to the baseline
    (w * 2).sum().backward()
    torch.optim.Adam([w]).step()
    next(iter(loaded.task.train_data(0, 1, 1)))
    baseline = status_bytes("VmRSS")
    reset_peak_rss()  # whole_peak: building the model, the warm-up and the steps
    settings = TrainSettings(seed=1, local_steps=1, inner_lr=1e-4, outer_lr=1e-3,
                             outer_momentum=0.0, inner_optimizer="adam")
    if arm == "ooc":
        pin_allocator()  # as compose does when a budget is set
    if arm == "ooc" and device.type == "cpu":  # never whole: stage by stage into the file
        model, chain = build_skeleton(loaded, 1)
    else:  # a CUDA out-of-core arm still builds the model whole, then moves it
        model = build_model(loaded, 1).to(device)
        chain = task_chain(loaded, model)
    numel = sum(p.numel() for p in model.parameters())
    batches = BatchStream(lambda: (b.to(device) for b in loaded.task.train_data(0, 1, 1)))
    if arm == "ooc":
        trainer = OutOfCoreTrainer(loaded, model, chain, settings, batches,
                                   directory=directory, memory_budget=budget)
    else:
        trainer = LocalTrainer(loaded, model, settings, batches)
    trainer.inner_steps(1)  # warm-up
    start_peak = peak_rss()  # since the baseline: the build and the warm-up step
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    io0 = dict(getattr(trainer, "io", {}))
    t0 = time.perf_counter()
    trainer.inner_steps(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    io1 = dict(getattr(trainer, "io", {}))
    out = dict(arm=arm, numel=numel, baseline=baseline, step_peak=peak_rss(),
               whole_peak=max(start_peak, peak_rss()), elapsed=elapsed,
               tokens=steps * opts["batch_size"] * opts["seq_len"],
               read=(io1.get("read", 0) - io0.get("read", 0)) / steps,
               written=(io1.get("written", 0) - io0.get("written", 0)) / steps,
               wait=io1.get("wait_s", 0) - io0.get("wait_s", 0),
               in_memory=in_memory_bytes(numel, "adam"),
               device_peak=(torch.cuda.max_memory_allocated(device)
                            if device.type == "cuda" else 0))
    trainer.close()
    print(json.dumps(out))
    """
)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_arm(arm: str, args: argparse.Namespace, opts: dict) -> dict:
    directory = Path(args.dir) / "bench-outofcore"
    directory.mkdir(parents=True, exist_ok=True)
    dropped = drop_caches()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-c", CHILD, arm, str(directory), str(args.budget_mb * MiB)]
    cmd += [str(args.steps), str(args.threads), json.dumps(opts), args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env)
    if done.returncode:
        sys.exit(f"{arm} arm failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    r["dropped"] = dropped
    print(f"  {arm}: {json.dumps(r)}", file=sys.stderr)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".", help="where the block files go (a real disk)")
    ap.add_argument("--budget-mb", type=int, default=96)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--n-layers", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--device", default="cpu", help="where the model computes: cpu, or cuda (arenas on it)"
    )
    args = ap.parse_args()
    opts = dict(seq_len=args.seq_len, batch_size=args.batch, d_model=args.d_model,
                n_layers=args.n_layers, d_state=16)  # fmt: skip
    runs: dict[str, list[dict]] = {"ooc": [], "mem": []}
    for _ in range(args.repeats):
        for arm in ("ooc", "mem"):
            runs[arm].append(run_arm(arm, args, opts))

    def med(arm: str, f) -> float:
        return statistics.median(f(r) for r in runs[arm])

    o = runs["ooc"][0]
    dropped = all(r["dropped"] for arm_runs in runs.values() for r in arm_runs)
    numel, budget = o["numel"], args.budget_mb * MiB
    weights = 4 * numel
    print(
        f"SSD LM d_model {args.d_model} x {args.n_layers} blocks: {numel / 1e6:.1f}M parameters, "
        f"weights {weights / MiB:.0f} MiB, Adam in memory {o['in_memory'] / MiB:.0f} MiB; "
        f"budget {args.budget_mb} MiB (weights/budget {weights / budget:.1f}x, computed); "
        f"batch {args.batch} x {args.seq_len} bytes; {args.steps} steps x {args.repeats} "
        f"repeats, medians; page cache dropped: {dropped}; device {args.device}"
    )
    print(
        "| arm | baseline MiB | step peak - baseline MiB | whole peak - baseline MiB | tokens/s |"
    )
    print("|---|---|---|---|---|")
    for arm in ("ooc", "mem"):
        print(
            f"| {arm} | {med(arm, lambda r: r['baseline']) / MiB:.0f} "
            f"| {med(arm, lambda r: r['step_peak'] - r['baseline']) / MiB:.0f} "
            f"| {med(arm, lambda r: r['whole_peak'] - r['baseline']) / MiB:.0f} "
            f"| {med(arm, lambda r: r['tokens'] / r['elapsed']):.0f} |"
        )
    ratio = med("ooc", lambda r: r["tokens"] / r["elapsed"]) / med(
        "mem", lambda r: r["tokens"] / r["elapsed"]
    )
    wait = med("ooc", lambda r: r["wait"] / r["elapsed"])
    min_read, min_written = 4 * numel * 4, 4 * numel * 3
    print(f"tokens/s ooc / mem: {ratio:.2f} (computed from the medians)")
    print(f"ooc I/O wait fraction: {wait:.3f}")
    print(
        f"ooc per step: read {med('ooc', lambda r: r['read']) / 1e9:.3f} GB "
        f"(schedule minimum {min_read / 1e9:.3f}, computed), written "
        f"{med('ooc', lambda r: r['written']) / 1e9:.3f} GB (minimum {min_written / 1e9:.3f})"
    )
    if args.device != "cpu":
        for arm in ("ooc", "mem"):
            print(f"{arm} device memory peak: {med(arm, lambda r: r['device_peak']) / MiB:.0f} MiB")
    limit = budget + 100 * MiB
    for what, key in (("step", "step_peak"), ("whole", "whole_peak")):
        peak = med("ooc", lambda r, key=key: r[key] - r["baseline"])
        print(
            f"ooc {what} peak - baseline {peak / MiB:.0f} MiB vs budget + 100 MiB = "
            f"{limit / MiB:.0f} MiB: {'within' if peak <= limit else 'OVER'}"
        )


if __name__ == "__main__":
    main()
