"""NMSE against bits per parameter for every codec, on real model deltas from training.

    .venv/bin/python tools/bench_codecs.py [--rounds 8] [--steps 20] [--seeds 3]

Produces the deltas the way a node does: the default model (build_model("gru", seed))
trains with Adam on one node's non-IID share of the digits (node_train_split) for
`steps` local steps per round; each round's pseudo-gradient is
Delta_r = theta_start - theta_local over the flat vector (canonical order), and the
node continues from theta_local. The same recorded deltas are then sent through every
codec, round after round (error-feedback state carried across rounds), as one chunk.

Columns: bits/param = 8 x wire bytes / parameters (exact, scales and padding
included); NMSE/round = mean over rounds and seeds of ||est_r - Delta_r||^2 / ||Delta_r||^2
(for an EF codec est_r also carries earlier residuals); cumulative NMSE = the same after
summing all rounds (what the model drifts by: ||sum est - sum Delta||^2 / ||sum Delta||^2);
for sketch rows, the measured |‖Px‖²/‖x‖² - 1| (mean over rounds) and the Gaussian JL
bound eps(m, 95 %) for the sketch's m floats. Two ablation rows quantize like holo at
1 bit but with contiguous 256-element Hadamard blocks (with and without a uniformly
random permutation first), to show what the strided in-tile layout buys. Prints one
markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fflnode.codecs import (  # noqa: E402
    ChunkContext,
    Codec,
    ErrorFeedback,
    HoloCodec,
    SketchCodec,
    TopKCodec,
    make_codec,
)
from fflnode.codecs.topk import index_bits  # noqa: E402
from fflnode.sketch.dense import GaussianProjection, jl_bound  # noqa: E402
from fflnode.sketch.hadamard import BLOCK, hadamard16  # noqa: E402
from fflnode.sketch.rng import ChunkSeed  # noqa: E402
from fflnode.tensors import flatten  # noqa: E402
from fflnode.train.data import node_train_split  # noqa: E402
from fflnode.train.model import build_model  # noqa: E402

NODES, ALPHA, NODE = 4, 0.5, 0  # one node's non-IID share, as in a 4-node testnet
SKETCH_ROWS = 5


def training_deltas(
    rounds: int, steps: int, seed: int, lr: float, batch: int
) -> tuple[list[torch.Tensor], list[float]]:
    """Delta_r for r < rounds, and the last training loss of each round."""
    model = build_model("gru", seed)
    split = node_train_split(NODE, NODES, ALPHA, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    deltas, losses = [], []
    for _ in range(rounds):
        start = flatten({k: v.detach().clone() for k, v in model.state_dict().items()})
        for _ in range(steps):
            idx = torch.randint(0, len(split), (batch,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(split.x[idx]), split.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        deltas.append(start - flatten(dict(model.state_dict())))
        losses.append(float(loss.detach()))
    return deltas, losses


def nmse(est: torch.Tensor, x: torch.Tensor) -> float:
    return float((est - x).double().square().sum() / x.double().square().sum())


def run_codec(
    codec: Codec, ef: bool, deltas: list[torch.Tensor], seeds: int
) -> tuple[float, float, float, float, float]:
    """(bits/param, NMSE/round, cumulative NMSE, mean |distortion|, m) over seeds."""
    n = deltas[0].numel()
    per_round, cumulative, distortion = [], [], []
    bits = 0.0
    for s in range(seeds):
        wrapper = ErrorFeedback(codec) if ef else None
        sent = torch.zeros(n)
        for r, delta in enumerate(deltas):
            ctx = ChunkContext(seed=s, round=r, chunk=0, numel=n)
            if wrapper is not None:
                enc, est = wrapper.encode(delta, ctx)
            else:
                enc = codec.encode(delta, ctx)
                est = codec.decode(enc, ctx)
            bits = 8 * enc.wire_bytes / n
            per_round.append(nmse(est, delta))
            sent += est
            if isinstance(codec, SketchCodec):
                op = codec.sketcher(ctx)
                norm_sq = float(delta.double().square().sum())
                distortion.append(abs(op.norm_sq(op.project(delta)) / norm_sq - 1))
        cumulative.append(nmse(sent, sum(deltas)))
    m = codec.sketcher(ChunkContext(0, 0, 0, n)).size if isinstance(codec, SketchCodec) else 0
    dist = statistics.mean(distortion) if distortion else float("nan")
    return bits, statistics.mean(per_round), statistics.mean(cumulative), dist, m


def projection_only(deltas: list[torch.Tensor], m: int, seeds: int) -> tuple[float, float]:
    """NMSE/round and cumulative NMSE of the JL reconstruction P^T P x (dense Gaussian)."""
    n = deltas[0].numel()
    per_round, cumulative = [], []
    for s in range(seeds):
        sent = torch.zeros(n)
        for r, delta in enumerate(deltas):
            p = GaussianProjection(m, n, ChunkSeed(s, r, 0))
            est = p.adjoint(p.apply(delta))
            per_round.append(nmse(est, delta))
            sent += est
        cumulative.append(nmse(sent, sum(deltas)))
    return statistics.mean(per_round), statistics.mean(cumulative)


def layout_ablation(deltas: list[torch.Tensor], layout: str, seeds: int) -> tuple[float, float]:
    """holo at 1 bit with the unbiased scale, but 256-point Hadamard blocks of *contiguous*
    elements after i.i.d. signs, optionally after a uniformly random permutation: what the
    strided in-tile layout of fflnode.sketch.hadamard is compared with. (Benchmark-local
    randomness: torch.Generator is fine here, nothing is shared.)"""
    h = hadamard16(torch.device("cpu"))
    n = deltas[0].numel()
    padded = -(-n // BLOCK) * BLOCK
    per_round, cumulative = [], []
    for s in range(seeds):
        g = torch.Generator().manual_seed(s)
        sent = torch.zeros(n)
        for delta in deltas:
            x = torch.zeros(padded)
            x[:n] = delta
            signs = torch.randint(0, 2, (padded,), generator=g).float() * 2 - 1
            perm = torch.randperm(padded, generator=g) if layout == "permuted" else None
            u = (x[perm] if perm is not None else x) * signs
            z = (h @ u.view(-1, 16, 16) @ h).reshape(-1)  # H16 x H16 on each block
            zh = z.sign() * (z.square().sum() / z.abs().sum())  # DRIVE unbiased scale
            back = (h @ zh.view(-1, 16, 16) @ h).reshape(-1) * signs
            est = torch.empty(padded)
            if perm is not None:
                est[perm] = back
            else:
                est = back
            per_round.append(nmse(est[:n], delta))
            sent += est[:n]
        cumulative.append(nmse(sent, sum(deltas)))
    return statistics.mean(per_round), statistics.mean(cumulative)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="local Adam steps per round (H)")
    p.add_argument("--seeds", type=int, default=3, help="codec seeds averaged over")
    p.add_argument("--seed", type=int, default=0, help="model / data seed")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    deltas, losses = training_deltas(args.rounds, args.steps, args.seed, args.lr, args.batch)
    n = deltas[0].numel()
    rows: list[tuple[str, str, bool, tuple[float, float, float, float, float]]] = []

    def add(label: str, params: str, codec: Codec, ef: bool) -> None:
        rows.append((label, params, ef, run_codec(codec, ef, deltas, args.seeds)))

    add("none", "float32", make_codec("none"), False)
    for bits in (1, 2, 4):
        for scale in ("unbiased", "mse"):
            for ef in (False, True):
                add("holo", f"{bits} bit, {scale} scale", HoloCodec(bits, scale), ef)
    for bits in (1, 2, 4):
        budget = HoloCodec(bits).encode(deltas[0], ChunkContext(0, 0, 0, n)).wire_bytes
        k = int(8 * budget // (32 + index_bits(n)))  # same bytes as holo at `bits`
        for ef in (False, True):
            add(
                "topk",
                f"k={k} ({100 * k / n:.1f} %), budget of holo {bits} bit",
                TopKCodec(k=k),
                ef,
            )
    for bits in (1, 2, 4):
        width = round(bits * n / 32 / SKETCH_ROWS)
        for ef in (False, True):
            codec = SketchCodec(rows=SKETCH_ROWS, width=width, heavy=0.05)
            add("sketch", f"R={SKETCH_ROWS} x ~{width}, heavy <= 5 %, threshold 3", codec, ef)
        codec = SketchCodec(rows=SKETCH_ROWS, width=width, heavy=0.05, threshold=0.0)
        add(
            "sketch",
            f"R={SKETCH_ROWS} x ~{width}, top 5 % of estimates, no threshold",
            codec,
            False,
        )
    for layout, what in (
        ("contiguous", "1 bit, unbiased; contiguous 256-blocks instead of the strided tile"),
        ("permuted", "1 bit, unbiased; uniform random permutation + contiguous blocks"),
    ):
        pr, cum = layout_ablation(deltas, layout, args.seeds)
        bits = 8 * HoloCodec(1).encode(deltas[0], ChunkContext(0, 0, 0, n)).wire_bytes / n
        rows.append(("holo layout ablation", what, False, (bits, pr, cum, float("nan"), 0)))
    m = n // 32  # 1 bit per parameter of float32 sketch values
    pr, cum = projection_only(deltas, m, args.seeds)
    rows.append(("JL projection P^T P x", f"dense Gaussian, k={m}", False, (1.0, pr, cum, 0.0, m)))

    print(
        f"GRU (hidden 64) deltas: {n} parameters, {args.rounds} rounds x {args.steps} Adam "
        f"steps (lr {args.lr}, batch {args.batch}), node {NODE} of {NODES} "
        f"(Dirichlet {ALPHA}); loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"mean over {args.seeds} codec seeds"
    )
    print()
    print(
        "| codec | parameters | EF | bits/param | NMSE/round | cumulative NMSE | "
        "‖Px‖² distortion | JL bound ε (95 %) |"
    )
    print("|---|---|:-:|---:|---:|---:|---:|---:|")
    for label, params, ef, (bits, per_round, cumulative, dist, mm) in rows:
        jl = f"{dist:.3f}" if dist == dist else ""
        bound = f"{jl_bound(mm):.3f}" if mm else ""
        if label.startswith("JL"):
            jl, bound = "", f"{jl_bound(mm):.3f}"
            per_round_s = f"{per_round:.1f} (d/k = {n / mm:.1f})"
        else:
            per_round_s = f"{per_round:.4f}"
        print(
            f"| {label} | {params} | {'yes' if ef else ''} | {bits:.3f} | {per_round_s} | "
            f"{cumulative:.4f} | {jl} | {bound} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
