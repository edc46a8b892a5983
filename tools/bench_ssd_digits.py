"""SSD vs GRU on sequential digits: test accuracy and time per step, same seeds, same steps.

Both models are built with fflnode.train.model.build_model (so from the same seed on the
CPU), trained single-threaded with Adam on the same batches (drawn from the run seed with
numpy's PCG64) and evaluated on the fixed test split. Prints a table; the figures in
docs/benchmarks.md ("F-SSD") come from:

    PYTHONPATH=. .venv/bin/python tools/bench_ssd_digits.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from fflnode.train.data import digits_splits
from fflnode.train.model import build_model

STEPS = 1600  # the GRU baseline's budget (fflnode.train.model docs)
BATCH = 32
LR = 3e-3


def train_and_eval(name: str, seed: int, steps: int) -> dict[str, float]:
    """Train `name` from `seed` for `steps` Adam steps; accuracy, ms/step, parameter count."""
    train, test = digits_splits()
    model = build_model(name, seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    rng = np.random.Generator(np.random.PCG64(seed))
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.as_tensor(rng.integers(0, len(train), BATCH))
        loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = (model(test.x).argmax(-1) == test.y).float().mean().item()
    return {
        "acc": acc,
        "ms_per_step": 1e3 * elapsed / steps,
        "params": sum(p.numel() for p in model.parameters()),
        "loss": loss.item(),
    }


def paired_ms_per_step(names: list[str], seed: int, rounds: int, steps: int) -> dict[str, float]:
    """Median ms per training step, the models timed alternately on the same batches so
    that load from other processes hits both alike."""
    train, _ = digits_splits()
    rng = np.random.Generator(np.random.PCG64(seed))
    batches = [torch.as_tensor(rng.integers(0, len(train), BATCH)) for _ in range(steps)]
    runs: dict[str, list[float]] = {n: [] for n in names}
    models = {n: build_model(n, seed) for n in names}
    opts = {n: torch.optim.Adam(m.parameters(), lr=LR) for n, m in models.items()}
    for r in range(rounds + 1):  # round 0 warms up
        for n in names:
            t0 = time.perf_counter()
            for idx in batches:
                loss = F.cross_entropy(models[n](train.x[idx]), train.y[idx])
                opts[n].zero_grad(set_to_none=True)
                loss.backward()
                opts[n].step()
            if r:
                runs[n].append(1e3 * (time.perf_counter() - t0) / steps)
    return {n: statistics.median(v) for n, v in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--models", nargs="+", default=["gru", "ssd"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"sequential digits, {args.steps} Adam steps, batch {BATCH}, lr {LR}, 1 thread")
    print(f"{'model':<6} {'seed':>4} {'params':>7} {'test acc':>9} {'ms/step':>8}")
    for name in args.models:
        rows = []
        for seed in args.seeds:
            r = train_and_eval(name, seed, args.steps)
            rows.append(r)
            print(
                f"{name:<6} {seed:>4} {r['params']:>7} {r['acc']:>9.4f} {r['ms_per_step']:>8.2f}",
                flush=True,
            )
        accs = [r["acc"] for r in rows]
        ms = [r["ms_per_step"] for r in rows]
        print(
            f"{name:<6} {'mean':>4} {rows[0]['params']:>7} {statistics.mean(accs):>9.4f} "
            f"{statistics.mean(ms):>8.2f}",
            flush=True,
        )
    paired = paired_ms_per_step(args.models, args.seeds[0], rounds=7, steps=20)
    print(
        "paired timing (median of 7 alternating rounds of 20 steps): "
        + ", ".join(f"{n} {v:.2f} ms/step" for n, v in paired.items())
    )


if __name__ == "__main__":
    main()
