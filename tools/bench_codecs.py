"""Codecs at equal bits per coordinate: fflnode's holo against the codecs people ship.

    .venv/bin/python tools/bench_codecs.py [--rounds 50] [--steps 20] [--inner adam|sgd]
                                           [--seeds 3] [--repeats 5]

Prints three markdown tables from one run.

1. Equal bits. Codecs are grouped by a nominal budget (1, 2, 4, 8, 16, 32 bits per
   coordinate); within a group each is configured to spend at most the budget, or its
   smallest format when that is within 1.1x of it (OVERSHOOT), and every bits/coord
   figure is measured: 8 x the bytes of the
   encoding / coordinates (codebooks, norms, scales, indices and padding included).
   Codecs: fflnode's `holo` (seeded randomized Hadamard rotation + b-bit quantization,
   unbiased or least-squares scale), `topk` (fflnode's, k set by the budget), and from
   tools/codecs_reference.py: hivemind's uniform and quantile quantizers (the 8-bit ones
   are bit-identical to hivemind 1.1.12; 1-4 bits are their analogues), QSGD (s levels,
   one L2 norm per 512-coordinate bucket), scaled sign (EF-signSGD's compressor), PowerSGD
   (rank chosen by the budget; equal to torch's powerSGD_hook), float16. When hivemind is
   importable, its own classes are run too ("hivemind package" rows).
   * deltas: real pseudo-gradients. The default model (build_model("gru", seed)) trains
     with Adam (lr 1e-3; or --inner sgd, the daemon's default inner optimizer, lr 0.1) on
     one node's non-IID share of the digits (node_train_split), `steps` local steps per
     round; Delta_r = theta_start - theta_local over the flat vector
     (canonical order), one chunk. NMSE/round = mean over rounds and seeds of
     ||est_r - Delta_r||^2 / ||Delta_r||^2, each round encoded alone (no error feedback;
     PowerSGD keeps its warm-started Q, as it always does).
   * Gaussian: a fresh N(0, 1) vector of 2**20 coordinates per seed (PowerSGD sees it as
     a 1024 x 1024 matrix), one encoding each: the i.i.d. case the rotation is built for,
     and the worst case for low rank.
   * enc+dec MB/s: float32 input bytes / (encode + decode seconds) on the Gaussian vector,
     one torch thread, codecs interleaved in each of `repeats` repeats, median (min-max);
     a numpy copy of the same vector is timed in each repeat as the memory reference.
2. Error feedback over rounds: for the 1-, 2- and 4-bit rows on the deltas, the accumulated
   error ||sum_r est_r - sum_r Delta_r||^2 / ||sum_r Delta_r||^2 after 1, 5, 10, 25 and
   `rounds` rounds, without and with error feedback (fflnode's ErrorFeedback: the
   residual of each round is added to the next round's input). Mean over seeds.
3. For explanation only, not baselines: the plain JL reconstruction P^T P x at 1 bit,
   fflnode's count sketch of a dense update, and two layouts of holo's rotation.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from codecs_reference import (  # noqa: E402
    QSGD,
    Float16,
    HivemindCodec,
    PowerSGD,
    QuantileQuantization,
    SignScale,
    UniformQuantization,
    hivemind_version,
)

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
from fflnode.tensors import FlatLayout, flatten  # noqa: E402
from fflnode.train.data import node_train_split  # noqa: E402
from fflnode.train.model import build_model  # noqa: E402

NODES, ALPHA, NODE = 4, 0.5, 0  # one node's non-IID share, as in a 4-node testnet
SKETCH_ROWS = 5
GAUSSIAN_LOG2 = 20  # 2**20 coordinates, 4 MiB of float32: per-call overheads fade
QSGD_BUCKET = 512  # coordinates per norm, one size for every budget (QSGD's bucketing)
SIGN_BLOCK = 512  # the per-tile variant of the scaled sign: 1 + 32/512 bits
# Every row spends at most this much over its budget (QSGD's norms, codebooks, scales;
# PowerSGD's smallest rank: on the GRU deltas rank 1 costs 2.17 bits, because the 586
# bias values and the (192, 1) input matrix always go raw).
OVERSHOOT = 1.1
LR = {"adam": 1e-3, "sgd": 0.1}  # sgd: the daemon's default inner lr (config.py)
BUDGETS = (1, 2, 4, 8, 16, 32)
EF_BUDGETS = (1, 2, 4)  # the regime holo is built for: error feedback table
EF_CHECKPOINTS = (1, 5, 10, 25)


def training_deltas(
    rounds: int, steps: int, seed: int, lr: float, batch: int, inner: str = "adam"
) -> tuple[list[torch.Tensor], list[float], list[tuple[int, ...]]]:
    """Delta_r for r < rounds, the last training loss of each round, and the tensors'
    shapes in flat (canonical) order. `inner`: "adam" (moments kept across rounds) or
    "sgd" (plain, the daemon's default inner optimizer)."""
    model = build_model("gru", seed)
    split = node_train_split(NODE, NODES, ALPHA, seed)
    if inner == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
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
    shapes = [slot.shape for slot in FlatLayout.of(dict(model.state_dict())).slots]
    return deltas, losses, shapes


def nmse(est: torch.Tensor, x: torch.Tensor) -> float:
    return float((est - x).double().square().sum() / x.double().square().sum())


# ------------------------------------------------------------------ the codecs


@dataclass(frozen=True)
class Target:
    """What a codec is built for: a vector of n coordinates made of tensors of `shapes`."""

    kind: str  # "deltas" or "Gaussian"
    n: int
    shapes: tuple[tuple[int, ...], ...]


Built = tuple[Codec, str] | str  # (codec, parameters for this target) or why there is none


@dataclass(frozen=True)
class Spec:
    budget: int  # nominal bits per coordinate: the group of the row
    codec: str
    source: str
    build: Callable[[Target], Built]
    biased: bool


def topk_build(bits: int) -> Callable[[Target], Built]:
    def build(t: Target) -> Built:
        k = int(bits * t.n // (32 + index_bits(t.n)))  # k (index + float32) <= budget
        return TopKCodec(k=k), f"k={k} ({100 * k / t.n:.2f} %)"

    return build


def powersgd_build(bits: int) -> Callable[[Target], Built]:
    def build(t: Target) -> Built:
        best = None
        for rank in range(1, max(min(s[0], math.prod(s[1:])) for s in t.shapes if s) + 1):
            codec = PowerSGD(t.shapes, rank)
            if 32 * codec.wire_floats() <= bits * t.n:
                best = rank
        floor = 32 * PowerSGD(t.shapes, 1).wire_floats() / t.n
        if best is None and floor <= OVERSHOOT * bits:
            best = 1  # its smallest configuration, as QSGD's norms overshoot too
        if best is None:
            return f"n/a: rank 1 costs {floor:.2f} bits (1-D tensors go raw)"
        return PowerSGD(t.shapes, best), f"rank {best}"

    return build


def fixed(codec: Callable[[], Codec], params: str) -> Callable[[Target], Built]:
    return lambda t: (codec(), params)


def specs(with_hivemind: bool) -> list[Spec]:
    hm = "reference = hivemind {} (bit-identical)"
    hm_analogue = "reference: {}-bit analogue of hivemind {}"
    out: list[Spec] = []
    for bits in BUDGETS[:4]:
        for scale in ("unbiased", "mse") if bits <= 4 else ("unbiased",):
            out.append(
                Spec(
                    bits,
                    "holo",
                    "fflnode",
                    fixed(lambda b=bits, s=scale: HoloCodec(b, s), f"{bits} bit, {scale} scale"),
                    scale == "mse",
                )
            )
        if bits == 1:
            out.append(
                Spec(
                    1, "sign + scale", "reference (EF-signSGD)", fixed(SignScale, "one scale"), True
                )
            )
            out.append(
                Spec(
                    1,
                    "sign + scale",
                    "reference (EF-signSGD)",
                    fixed(lambda: SignScale(SIGN_BLOCK), f"scale per {SIGN_BLOCK}"),
                    True,
                )
            )
        else:
            s = (1 << (bits - 1)) - 1  # 2s + 1 signed levels fit in `bits` bits
            out.append(
                Spec(
                    bits,
                    "QSGD",
                    "reference (Alistarh et al. 2017)",
                    fixed(lambda s=s: QSGD(s, QSGD_BUCKET), f"s={s}, bucket {QSGD_BUCKET}"),
                    False,
                )
            )
            source = (
                hm.format("Uniform8BitQuantization")
                if bits == 8
                else hm_analogue.format(bits, "Uniform8BitQuantization")
            )
            out.append(
                Spec(
                    bits,
                    "uniform quantization",
                    source,
                    fixed(lambda b=bits: UniformQuantization(b), "±3σ, bin means"),
                    True,
                )
            )
        source = (
            hm.format("Quantile8BitQuantization")
            if bits == 8
            else hm_analogue.format(bits, "Quantile8BitQuantization")
        )
        out.append(
            Spec(
                bits,
                "quantile quantization",
                source,
                fixed(lambda b=bits: QuantileQuantization(b), "equal-count bins"),
                True,
            )
        )
        out.append(
            Spec(
                bits,
                "PowerSGD",
                "reference = torch powerSGD_hook",
                powersgd_build(bits),
                True,
            )
        )
        out.append(Spec(bits, "top-k", "fflnode", topk_build(bits), True))
    if with_hivemind:
        version = hivemind_version()
        for cls, bits in (
            ("Uniform8BitQuantization", 8),
            ("Quantile8BitQuantization", 8),
            ("Float16Compression", 16),
        ):
            out.append(
                Spec(
                    bits,
                    f"hivemind {cls}",
                    f"hivemind {version} package",
                    fixed(lambda c=cls: HivemindCodec(c), "protobuf message"),
                    True,
                )
            )
    out.append(
        Spec(16, "float16", "reference = hivemind Float16Compression", fixed(Float16, ""), True)
    )
    out.append(Spec(32, "none", "fflnode", fixed(lambda: make_codec("none"), "float32"), False))
    return out


# ------------------------------------------------------------------ measurements


@dataclass
class Pass:
    """One codec over the rounds of one seed: wire bits and errors."""

    bits: float
    per_round: list[float]
    cumulative: list[float]  # after 1, 2, ... rounds


def run_rounds(codec: Codec, ef: bool, deltas: list[torch.Tensor], seed: int) -> Pass:
    n = deltas[0].numel()
    wrapper = ErrorFeedback(codec) if ef else None
    sent, truth = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    bits, per_round, cumulative = 0.0, [], []
    for r, delta in enumerate(deltas):
        ctx = ChunkContext(seed=seed, round=r, chunk=0, numel=n)
        if wrapper is not None:
            enc, est = wrapper.encode(delta, ctx)
        else:
            enc = codec.encode(delta, ctx)
            est = codec.decode(enc, ctx)
        bits = 8 * enc.wire_bytes / n
        per_round.append(nmse(est, delta))
        sent += est.double()
        truth += delta.double()
        cumulative.append(float((sent - truth).square().sum() / truth.square().sum()))
    return Pass(bits, per_round, cumulative)


def gaussian(seed: int, log2: int = GAUSSIAN_LOG2) -> torch.Tensor:
    return torch.randn(1 << log2, generator=torch.Generator().manual_seed(1000 + seed))


def gaussian_shape(log2: int) -> tuple[int, int]:
    """How PowerSGD sees the Gaussian vector: a (near-)square matrix."""
    return 1 << (log2 - log2 // 2), 1 << (log2 // 2)


def time_codec(codec: Codec, x: torch.Tensor) -> float:
    ctx = ChunkContext(seed=0, round=0, chunk=0, numel=x.numel())
    start = time.perf_counter()
    codec.decode(codec.encode(x, ctx), ctx)
    return time.perf_counter() - start


def time_copy(x: np.ndarray, out: np.ndarray) -> float:
    start = time.perf_counter()
    np.copyto(out, x)
    return time.perf_counter() - start


def err(v: float) -> str:
    """An NMSE with three significant digits."""
    return f"{v:.3g}"


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return ""
    mid = fmt.format(statistics.median(values))
    if len(values) == 1:
        return mid
    return f"{mid} ({fmt.format(min(values))}–{fmt.format(max(values))})"


# ------------------------------------------------------------------ explanatory rows


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


def explanatory_rows(deltas: list[torch.Tensor], seeds: int) -> list[tuple[str, str, str, str]]:
    """(what, parameters, NMSE/round, cumulative NMSE after all rounds) on the deltas."""
    n = deltas[0].numel()
    rows = []
    m = n // 32  # 1 bit per parameter of float32 projections
    pr, cum = projection_only(deltas, m, seeds)
    rows.append(
        (
            "plain JL projection P^T P x (explanatory: nobody ships it)",
            f"dense Gaussian, k={m}, 1.000 bit/coord, JL ε(95 %) {jl_bound(m):.3f}",
            f"{pr:.1f} (d/k = {n / m:.1f})",
            err(cum),
        )
    )
    for layout, what in (
        ("contiguous", "contiguous 256-blocks instead of the strided tile"),
        ("permuted", "uniform random permutation + contiguous blocks"),
    ):
        pr, cum = layout_ablation(deltas, layout, seeds)
        rows.append(("holo layout ablation, 1 bit, unbiased", what, err(pr), err(cum)))
    for bits in (1, 2):
        width = round(bits * n / 32 / SKETCH_ROWS)
        for threshold, what in ((3.0, "heavy <= 5 %, threshold 3"), (0.0, "top 5 %, no threshold")):
            codec = SketchCodec(rows=SKETCH_ROWS, width=width, heavy=0.05, threshold=threshold)
            passes = [run_rounds(codec, False, deltas, s) for s in range(seeds)]
            pr = statistics.mean(v for p in passes for v in p.per_round)
            cum = statistics.mean(p.cumulative[-1] for p in passes)
            rows.append(
                (
                    "fflnode sketch (count sketch + heavy hitters)",
                    f"R={SKETCH_ROWS} x ~{width}, {passes[0].bits:.3f} bit/coord, {what}",
                    err(pr),
                    err(cum),
                )
            )
    return rows


# ---------------------------------------------------------------------- main


@dataclass
class Row:
    """Everything measured for one spec."""

    spec: Spec
    params: dict[str, str]  # per target kind: the configuration, or why there is none
    plain: list[Pass] = field(default_factory=list)  # deltas, per seed, no EF
    ef: list[Pass] = field(default_factory=list)  # deltas, per seed, with EF
    gauss: tuple[float, float] | None = None  # (bits/coord, mean NMSE)
    seconds: list[float] = field(default_factory=list)  # enc+dec of the Gaussian vector


def codec_for(spec: Spec, target: Target) -> Codec | None:
    built = spec.build(target)
    return None if isinstance(built, str) else built[0]


def measure_errors(
    spec: Spec, targets: dict[str, Target], deltas: list[torch.Tensor], seeds: int
) -> Row:
    """A fresh codec per seed and pass: PowerSGD keeps state between rounds."""
    row = Row(spec, {})
    for kind, target in targets.items():
        built = spec.build(target)
        row.params[kind] = built if isinstance(built, str) else built[1]
    deltas_target, gauss_target = targets["deltas"], targets["Gaussian"]
    if codec_for(spec, deltas_target) is not None:
        row.plain = [
            run_rounds(codec_for(spec, deltas_target), False, deltas, s) for s in range(seeds)
        ]
        if spec.budget in EF_BUDGETS:
            row.ef = [
                run_rounds(codec_for(spec, deltas_target), True, deltas, s) for s in range(seeds)
            ]
    if codec_for(spec, gauss_target) is not None:
        errs, bits = [], 0.0
        for s in range(seeds):
            codec = codec_for(spec, gauss_target)
            x = gaussian(s, gauss_target.n.bit_length() - 1)
            ctx = ChunkContext(seed=s, round=0, chunk=0, numel=x.numel())
            enc = codec.encode(x, ctx)
            bits = 8 * enc.wire_bytes / x.numel()
            errs.append(nmse(codec.decode(enc, ctx), x))
        row.gauss = (bits, statistics.mean(errs))
    return row


def measure_throughput(rows: list[Row], gauss_target: Target, repeats: int) -> list[float]:
    """Fills row.seconds, codecs interleaved in a rotated order per repeat; returns the
    seconds of a numpy copy of the same vector, timed at the start of each repeat."""
    x = gaussian(0, gauss_target.n.bit_length() - 1)
    x_np, out_np = x.numpy(), np.empty_like(x.numpy())
    timed = [row for row in rows if row.gauss is not None]
    copy_s = []
    for r in range(repeats):
        order = timed[r % len(timed) :] + timed[: r % len(timed)]
        copy_s.append(time_copy(x_np, out_np))
        for row in order:
            row.seconds.append(time_codec(codec_for(row.spec, gauss_target), x))
        print(f"  throughput repeat {r + 1}/{repeats}", file=sys.stderr)
    return copy_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--steps", type=int, default=20, help="local steps per round (H)")
    p.add_argument("--inner", choices=sorted(LR), default="adam", help="inner optimizer")
    p.add_argument("--lr", type=float, help="inner lr (default: adam 1e-3, sgd 0.1)")
    p.add_argument("--seeds", type=int, default=3, help="codec seeds averaged over")
    p.add_argument("--seed", type=int, default=0, help="model / data seed")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="interleaved throughput repeats")
    p.add_argument("--no-hivemind", action="store_true", help="skip hivemind's own classes")
    p.add_argument("--gaussian-log2", type=int, default=GAUSSIAN_LOG2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lr = args.lr if args.lr is not None else LR[args.inner]

    deltas, losses, shapes = training_deltas(
        args.rounds, args.steps, args.seed, lr, args.batch, args.inner
    )
    n = deltas[0].numel()
    targets = {
        "deltas": Target("deltas", n, tuple(shapes)),
        "Gaussian": Target(
            "Gaussian", 1 << args.gaussian_log2, (gaussian_shape(args.gaussian_log2),)
        ),
    }
    with_hivemind = not args.no_hivemind and hivemind_version() is not None
    rows = []
    for spec in specs(with_hivemind):
        rows.append(measure_errors(spec, targets, deltas, args.seeds))
        print(f"  errors measured: {spec.codec} ({spec.budget} bits)", file=sys.stderr)
    copy_s = measure_throughput(rows, targets["Gaussian"], args.repeats)
    mb = 4 * targets["Gaussian"].n / 1e6

    print(
        f"GRU (hidden 64) deltas: {n} parameters, {args.rounds} rounds x {args.steps} "
        f"{args.inner} steps (lr {lr:g}, batch {args.batch}), node {NODE} of {NODES} "
        f"(Dirichlet {ALPHA}); loss {losses[0]:.3f} -> {losses[-1]:.3f}; errors are means "
        f"over {args.seeds} codec seeds; Gaussian: {targets['Gaussian'].n} coordinates; "
        f"{args.threads} torch thread(s), torch {torch.__version__}"
        + (f", hivemind {hivemind_version()}" if with_hivemind else ", hivemind not installed")
    )
    print(
        f"\nnumpy copy of the Gaussian vector, same repeats: "
        f"{spread([mb / s for s in copy_s])} MB/s (median (min–max) of {args.repeats})\n"
    )
    print(
        "| budget | codec | source | deltas: parameters | deltas: bits/coord | "
        "deltas: NMSE/round | Gaussian: parameters | Gaussian: bits/coord | "
        "Gaussian: NMSE | enc+dec MB/s (Gaussian) |"
    )
    print("|---:|---|---|---|---:|---:|---|---:|---:|---:|")
    for row in rows:
        spec = row.spec
        d_bits = d_err = g_bits = g_err = "n/a"
        if row.plain:
            d_bits = f"{row.plain[0].bits:.3f}"
            d_err = err(statistics.mean(v for q in row.plain for v in q.per_round))
        if row.gauss is not None:
            g_bits, g_err = f"{row.gauss[0]:.3f}", err(row.gauss[1])
        rate = spread([mb / s for s in row.seconds])
        print(
            f"| {spec.budget} | {spec.codec} | {spec.source} | {row.params['deltas']} | "
            f"{d_bits} | {d_err} | {row.params['Gaussian']} | {g_bits} | {g_err} | {rate} |"
        )

    checkpoints = [c for c in EF_CHECKPOINTS if c < args.rounds] + [args.rounds]
    print(
        f"\nAccumulated error on the deltas, ||Σ est - Σ Δ||² / ||Σ Δ||² after R rounds "
        f"(mean over {args.seeds} seeds), without and with error feedback (EF)\n"
    )
    head = " | ".join(f"R={c}" for c in checkpoints)
    print(f"| budget | codec | parameters | biased | bits/coord | EF | {head} |")
    print("|---:|---|---|:-:|---:|:-:|" + "---:|" * len(checkpoints))
    for row in rows:
        if not row.ef:
            continue
        for ef, passes in (("", row.plain), ("yes", row.ef)):
            cells = " | ".join(
                err(statistics.mean(q.cumulative[c - 1] for q in passes)) for c in checkpoints
            )
            print(
                f"| {row.spec.budget} | {row.spec.codec} | {row.params['deltas']} | "
                f"{'yes' if row.spec.biased else 'no'} | {passes[0].bits:.3f} | {ef} | {cells} |"
            )

    print(
        "\nError feedback needs a contractive codec (NMSE/round < 1): an unbiased codec "
        "whose\nNMSE/round exceeds 1 (QSGD at few levels) makes the residual grow under it."
    )
    print("\nFor explanation only (not baselines), on the same deltas:\n")
    print("| what | parameters | NMSE/round | cumulative NMSE |")
    print("|---|---|---:|---:|")
    for what, params, pr, cum in explanatory_rows(deltas, args.seeds):
        print(f"| {what} | {params} | {pr} | {cum} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
