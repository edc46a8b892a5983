#!/usr/bin/env python3
"""End-to-end comparisons on the real testnet, one table per suite, all runs in one go.

    .venv/bin/python tools/bench_testnet.py codecs              # digits: codecs, same seed
    .venv/bin/python tools/bench_testnet.py codecs --task text  # the byte-level LM task
    .venv/bin/python tools/bench_testnet.py byzantine           # 1 of 5 nodes corrupt
    .venv/bin/python tools/bench_testnet.py scaling             # 4, 8, 16 nodes, exact codec

Every row is one `fflnode testnet` run (real processes, real sockets) with the same seed,
task, rounds, local steps and recipe; only the codec (or the attack and the defence)
changes. A run must end with the merged hashes agreeing with the testnet's own
reference, or the benchmark stops. The first run also trains the centralized baselines
(same model, the union of the data): data-parallel (the run's steps, a batch per node in
each: the same samples and steps) and sequential (N x the steps, one batch each). The
"vs central" column compares with the data-parallel one; both are printed below.

Recipe: DiLoCo (inner Adam, H local steps; outer Nesterov SGD lr 0.7, momentum 0.9;
--set and --lossy-set change it),
complete graph. Bytes are the exchange's (the /fflnode/shard/1.0.0 protocol, summed over
nodes); the final merge costs the same for every codec and is left out.

The codecs suite also RUNS the dense per-step baseline it is compared with: codec none,
one local step per round (R x H rounds), the FedOpt recipe the testnet uses by default
(inner SGD, outer Adam), so its bytes and its metric are measured in the same run. A
column "computed" prices a server-based FedAvg by formula (2 x 4 x params bytes per
node per step); it is labelled as computed, never as measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN_TIMEOUT_S = 3600  # one run; ~10 min each on a loaded 2-core machine
SHARD_PROTOCOL = "/fflnode/shard/1.0.0"
DILOCO = [
    'train.inner_optimizer="adam"',
    "train.inner_lr=0.003",
    'train.outer_optimizer="sgd"',
    "train.outer_lr=0.7",
    "train.outer_momentum=0.9",
    'train.lr_schedule="constant"',
]


def run_testnet(out: Path, nodes: int, rounds: int, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fflnode", "testnet", "--nodes", str(nodes)]
    cmd += ["--rounds", str(rounds), "--local-steps", str(steps), "--eval-every", str(rounds)]
    cmd += ["--no-plot", "--quiet", "--out", str(out), "--deadline", str(RUN_TIMEOUT_S - 60)]
    for kv in DILOCO:
        cmd += ["--set", kv]
    cmd += extra
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    wall = time.perf_counter() - t0
    if proc.returncode == 2:  # the configuration was refused (fflnode.config says why)
        return {"refused": proc.stderr.strip().splitlines()[-1], "wall": wall}
    report = json.loads((out / "report.json").read_text())
    if not report["merge"]["hashes_agree"]:
        sys.exit(f"run {extra} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    exchange = sum(
        n.get("traffic", {}).get("sent", {}).get(SHARD_PROTOCOL, 0)
        for n in report["nodes"].values()
    )
    return {"report": report, "exchange_bytes": exchange, "wall": wall}


def params(task: str) -> int:
    from fflnode.train.task import build_model, federated_parameters, load_task

    loaded = load_task(task, {}, Path.cwd())
    return sum(p.numel() for _, p in federated_parameters(build_model(loaded, 0)))


def primary(report: dict) -> tuple[str, float]:
    metrics = report["merge"]["merged_metrics"] or {}
    names = [n["primary_metric"] for n in report["nodes"].values() if n.get("primary_metric")]
    name = names[0] if names else next(iter(metrics))
    return name, metrics[name]


def shown(name: str, value: float) -> str:
    return f"{100 * value:.2f}%" if "accuracy" in name else f"{value:.4g}"


def gap(name: str, value: float, central: dict | None) -> str:
    """Merged against the data-parallel centralized baseline: points of accuracy, else
    the relative difference."""
    if not central or name not in central["metrics"]:
        return "-"
    c = central["metrics"][name]
    if not c:
        return "-"
    if "accuracy" in name:
        return f"{100 * (value - c):+.2f} pts"
    return f"{100 * (value - c) / c:+.1f}%"


def codecs(args: argparse.Namespace, tmp: Path) -> None:
    n, r, h = args.nodes, args.rounds, args.local_steps
    # top-k at 1 bit/parameter: a kept coordinate costs a 4-byte value and a 4-byte index
    topk_ratio = 1 / 64
    # Error feedback is on for every lossy codec, and exchange.scheme "auto" reduce-
    # scatters them (owners re-encode their shard's mean); one row all-gathers instead.
    all_gather = ["--set", 'exchange.scheme="all-gather"']
    rows = [
        ("none", []),
        ("holo 1 bit", ["--codec", "holo", "--bits", "1"]),
        ("holo 2 bits", ["--codec", "holo", "--bits", "2"]),
        ("holo 1 bit all-gather", ["--codec", "holo", "--bits", "1", *all_gather]),
        ("topk 1/64 (= 1 bit)", ["--codec", "topk", "--ratio", str(topk_ratio)]),
        ("sketch 1/64", ["--codec", "sketch", "--ratio", str(topk_ratio)]),
        ("dense per-step (H=1)", ["DENSE"]),
    ]
    if args.only:
        rows = [row for row in rows if row[0].split()[0] in args.only or row[0] in args.only]
    p = params(args.task)
    server = r * h * n * 2 * 4 * p
    print(
        f"task {args.task}, {n} nodes, {r} rounds x {h} local steps, {p} parameters, "
        f"seed {args.seed}"
    )
    head = f"{'codec':<24}{'merged':>11}{'vs central':>12}{'exchange MB':>13}{'vs none':>9}"
    head += f"{'vs FedAvg (computed)':>22}{'wall s':>8}"
    print(head)
    base, central, sequential = None, None, None
    for name, extra in rows:
        slug = "".join(c if c.isalnum() else "-" for c in name)
        task = ["--task", args.task, "--seed", str(args.seed)]
        if extra != ["DENSE"]:  # the DiLoCo recipe's overrides (after DILOCO: they win)
            task += [word for kv in args.set for word in ("--set", kv)]
            if "--codec" in extra:  # a lossy codec's own recipe, after the common one
                task += [word for kv in args.lossy_set for word in ("--set", kv)]
        if central is not None:
            task.append("--no-baseline")  # the same baseline: trained once, in the first run
        if extra == ["DENSE"]:  # one local step per round, the default (FedOpt) recipe
            res = run_dense(tmp / slug, n, r * h, task)
        else:
            res = run_testnet(tmp / slug, n, r, h, [*extra, *task])
        if "refused" in res:
            print(f"{name:<24} refused: {res['refused']}", flush=True)
            continue
        report = res["report"]
        central = central or report.get("centralized")
        sequential = sequential or report.get("centralized_sequential")
        metric, value = primary(report)
        b = res["exchange_bytes"]
        base = base or (b if name == "none" else None)
        vs_none = f"{base / b:.1f}x" if base else "-"
        print(
            f"{name:<24}{shown(metric, value):>11}{gap(metric, value, central):>12}"
            f"{b / 1e6:>13.3f}{vs_none:>9}"
            f"{server / b:>21.0f}x{res['wall']:>8.0f}",
            flush=True,
        )
    for label, cen in (("data-parallel", central), ("sequential", sequential)):
        if cen:
            shown_c = ", ".join(f"{k} {shown(k, v)}" for k, v in cen["metrics"].items())
            steps = f"{cen['steps']} steps x {cen.get('batches_per_step', 1)} batches"
            print(f"centralized baseline, {label} ({steps}): {shown_c}")


def run_dense(out: Path, nodes: int, rounds: int, extra: list[str]) -> dict:
    """Per-step dense exchange: codec none, H = 1, the testnet's default recipe."""
    cmd = [sys.executable, "-m", "fflnode", "testnet", "--nodes", str(nodes)]
    cmd += ["--rounds", str(rounds), "--local-steps", "1", "--eval-every", str(rounds)]
    cmd += ["--no-plot", "--quiet", "--out", str(out), "--deadline", str(RUN_TIMEOUT_S - 60)]
    cmd += extra
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    report = json.loads((out / "report.json").read_text())
    if not report["merge"]["hashes_agree"]:
        sys.exit(f"dense run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    exchange = sum(
        n.get("traffic", {}).get("sent", {}).get(SHARD_PROTOCOL, 0)
        for n in report["nodes"].values()
    )
    return {"report": report, "exchange_bytes": exchange, "wall": time.perf_counter() - t0}


def byzantine(args: argparse.Namespace, tmp: Path) -> None:
    n, r, h = args.nodes, args.rounds, args.local_steps
    rows = [
        ("honest, exact mean", []),
        ("1 signflip, exact mean", ["--corrupt", "1"]),
        ("1 signflip, trimmed mean", ["--corrupt", "1", "--set", 'exchange.robust="trimmed-mean"']),
        ("1 signflip, MAD mean", ["--corrupt", "1", "--set", 'exchange.robust="mad-mean"']),
        (
            "1 signflip, centered clip",
            ["--corrupt", "1", "--set", 'exchange.robust="centered-clip"'],
        ),
    ]
    rows.append(("1 NaN (data lost), exact mean", ["--corrupt", "1", "--corrupt-mode", "nan"]))
    if args.only:
        rows = [row for row in rows if any(o in row[0] for o in args.only)]
    rows = [(name, [*extra, "--task-option", f"alpha={args.alpha}"]) for name, extra in rows]
    print(
        f"{n} nodes, {r} rounds x {h} local steps, seed {args.seed}, Dirichlet alpha"
        f" {args.alpha}; corrupt = node{n - 1}"
    )
    print(
        f"{'run':<28}{'merged acc':>11}{'participants':>14}{'excluded at merge':>20}{'wall s':>8}"
    )
    for name, extra in rows:
        slug = "".join(c if c.isalnum() else "-" for c in name)
        res = run_testnet(tmp / slug, n, r, h, [*extra, "--seed", str(args.seed)])
        m = res["report"]["merge"]
        outl = ", ".join(m.get("outliers") or {}) or "-"
        metric, value = primary(res["report"])
        print(
            f"{name:<28}{shown(metric, value):>11}{len(m['participants']):>14}"
            f"{outl:>20}{res['wall']:>8.0f}",
            flush=True,
        )


def scaling(args: argparse.Namespace, tmp: Path) -> None:
    """Bytes per node per round, round time, memory and the metric at equal rounds, for
    4, 8 and 16 nodes with the exact codec: the default recipe (inner SGD, outer Adam,
    one local step a round) and the default scheme (reduce-scatter + all-gather); the
    all-to-all all-gather of whole Deltas is measured beside it where --allgather names N."""
    r = args.rounds
    p = params(args.task)
    print(
        f"task {args.task}, {r} rounds x 1 local step, {p} parameters ({4 * p / 1e6:.3f} MB"
        f" float32), seed {args.seed}, exact codec"
    )
    print(
        f"{'nodes':>5} {'scheme':<15}{'MB/node/round':>14}{'x 2|theta|':>11}"
        f"{'round s (median)':>17}{'peak RSS MB':>12}{'merged':>10}{'wall s':>8}"
    )
    first: dict[str, float] = {}
    runs = [(n, "reduce-scatter") for n in args.sizes]
    runs += [(n, "all-gather") for n in args.allgather]
    for n, scheme in runs:
        out = tmp / f"n{n}-{scheme}"
        cmd = [sys.executable, "-m", "fflnode", "testnet", "--nodes", str(n), "--rounds", str(r)]
        cmd += ["--local-steps", "1", "--eval-every", str(r), "--no-plot", "--quiet"]
        cmd += ["--no-baseline", "--out", str(out), "--deadline", str(RUN_TIMEOUT_S - 60)]
        cmd += ["--task", args.task, "--seed", str(args.seed)]
        cmd += ["--set", f'exchange.scheme="{scheme}"']
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        wall = time.perf_counter() - t0
        report = json.loads((out / "report.json").read_text())
        if not report["merge"]["hashes_agree"]:
            sys.exit(f"{n} nodes failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
        nodes = list(report["nodes"].values())
        per_round = sorted(
            node["traffic"]["sent"].get(SHARD_PROTOCOL, 0) / max(1, len(node["rounds"]))
            for node in nodes
        )
        mb = per_round[len(per_round) // 2] / 1e6  # median node
        secs = sorted(rec["seconds"] for node in nodes for rec in node["rounds"][1:])
        rss = max(node["peak_rss_mb"] or 0 for node in nodes)
        metric, value = primary(report)
        first.setdefault(scheme, mb)
        print(
            f"{n:>5} {scheme:<15}{mb:>14.3f}{mb / (8 * p / 1e6):>11.2f}"
            f"{secs[len(secs) // 2]:>17.2f}{rss:>12.0f}{shown(metric, value):>10}{wall:>8.0f}",
            flush=True,
        )
        if n == max(args.sizes) and scheme == "reduce-scatter":
            print(
                f"growth {min(args.sizes)} -> {n} nodes: "
                f"{mb / first[scheme]:.2f}x bytes per node per round (measured)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite", choices=["codecs", "byzantine", "scaling"])
    ap.add_argument("--sizes", type=int, nargs="*", default=[4, 8, 16], help="scaling: nodes")
    ap.add_argument(
        "--allgather",
        type=int,
        nargs="*",
        default=[4, 8],
        help="scaling: sizes also run with the all-gather of whole Deltas",
    )
    ap.add_argument("--nodes", type=int, default=0, help="4 for codecs, 5 for byzantine")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local-steps", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--only", nargs="*", help="rows: a codec or a whole row name (codecs), run-name parts"
    )
    ap.add_argument("--alpha", type=float, default=0.5, help="digits: Dirichlet alpha")
    ap.add_argument("--task", default="digits", help="the testnet's --task (digits, text, ...)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="codecs: a recipe override for every DiLoCo row (not the dense one)",
    )
    ap.add_argument(
        "--lossy-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="codecs: an override after --set for the rows of a lossy codec",
    )
    args = ap.parse_args()
    args.nodes = args.nodes or (4 if args.suite == "codecs" else 5)
    with tempfile.TemporaryDirectory(prefix="fflnode-bench-") as tmp:
        {"codecs": codecs, "byzantine": byzantine, "scaling": scaling}[args.suite](args, Path(tmp))


if __name__ == "__main__":
    main()
