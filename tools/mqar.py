"""F-SSD knowledge transfer on multi-query associative recall (MQAR), pairs split over N nodes.

Task. A sequence holds P key→value pairs with distinct keys, then one query per key; the
model must answer each query with its value. A context token carries one pair as two
fields (key, value); a query token is (key, QUERY). So one SSD layer can store a pair in
one step, with no convolution whose window would cross a node boundary.

Experiment. The P pairs are cut into N contiguous segments, one per node; each node has a
random peer ID. For every node and every query about a pair it never saw ("foreign"):
  alone        the node's model reads its own segment, then the queries;
  merged       every node's per-layer states (from h0 = 0 on its own segment) are merged in
               ascending peer-ID order (states.merge_canonical), then the queries read them;
  merged-avg   as merged, but layers ≥ 2 use the order-free states.merge_average;
  L1-only      as merged for layer 1, empty states (h = 0) for the layers above: how much
               of the recall needs the deeper layers' (approximate) merged states;
  centralized  one sequence holds every segment in that same order, then the queries.
For one layer "merged" is exactly "centralized" (states.py); for 2 and 4 layers the table
shows how far it drifts, with the relative error of each layer's merged state against the
centralized one. Bytes: one node's states on the wire vs its raw tokens vs a weight delta.

The task and its training recipe live in fflnode/ssm/mqar.py (shared with `fflnode states`).

    PYTHONPATH=. .venv/bin/python tools/mqar.py            # the docs/benchmarks.md table
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from fflnode.ssm.model import SSDModel
from fflnode.ssm.mqar import (  # noqa: F401  (re-exported: the task lives in the package)
    KEYS,
    PAIRS,
    QUERY,
    VALUES,
    Batch,
    config,
    sample,
    train,
)
from fflnode.ssm.states import (
    LayerState,
    merge_model,
    relative_error,
    to_wire,
    wire_nbytes,
)

NODE_COUNTS = (2, 4, 8)
EVAL_SEQUENCES = 256
PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])  # identity multihash, Ed25519


def peer_ids(n: int, rng: np.random.Generator) -> list[bytes]:
    return [PEER_ID_PREFIX + bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(n)]


@dataclass
class Row:
    layers: int
    nodes: int
    alone_foreign: float
    alone_own: float
    merged: float
    merged_avg: float
    first_only: float
    centralized: float
    state_err: list[float]  # per layer, merged vs centralized
    state_err_avg: list[float]


def evaluate(model: SSDModel, nodes: int, seed: int) -> Row:
    rng = np.random.Generator(np.random.PCG64(seed))
    b = sample(rng, EVAL_SEQUENCES)
    ids = peer_ids(nodes, rng)
    per = PAIRS // nodes
    segment = {p: b.pairs[:, j * per : (j + 1) * per] for j, p in enumerate(ids)}
    owner = torch.empty(EVAL_SEQUENCES, KEYS, dtype=torch.long)  # which node saw each key
    for j in range(nodes):
        owner.scatter_(1, b.pairs[:, j * per : (j + 1) * per, 0], j)
    query_owner = torch.gather(owner, 1, b.queries[..., 0])  # (S, PAIRS)

    def correct(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1) == b.answers  # (S, PAIRS) bool

    with torch.no_grad():
        states = {p: model.forward_with_states(segment[p])[1] for p in ids}
        merged = merge_model(states)
        merged_avg = merge_model(states, average_from_layer=1)
        empty = LayerState.zeros(model.cfg.state_shape, (EVAL_SEQUENCES,))
        first_only = (merged[0], *(empty for _ in merged[1:]))
        context = torch.cat([segment[p] for p in sorted(ids)], dim=1)  # canonical order
        _, central_states = model.forward_with_states(context)
        central_logits, _ = model.forward_with_states(b.queries, central_states)
        hit_central = correct(central_logits)
        hit_merged = correct(model.forward_with_states(b.queries, merged)[0])
        hit_avg = correct(model.forward_with_states(b.queries, merged_avg)[0])
        hit_first = correct(model.forward_with_states(b.queries, first_only)[0])
        alone_f, alone_o, central_f, merged_f, avg_f, first_f = [], [], [], [], [], []
        for j, p in enumerate(ids):
            hit_alone = correct(model.forward_with_states(b.queries, states[p])[0])
            foreign = query_owner != j
            alone_f.append(hit_alone[foreign].float().mean())
            alone_o.append(hit_alone[~foreign].float().mean())
            central_f.append(hit_central[foreign].float().mean())
            merged_f.append(hit_merged[foreign].float().mean())
            avg_f.append(hit_avg[foreign].float().mean())
            first_f.append(hit_first[foreign].float().mean())

    def mean(xs: list[torch.Tensor]) -> float:
        return float(torch.stack(xs).mean())

    return Row(
        layers=len(model.blocks),
        nodes=nodes,
        alone_foreign=mean(alone_f),
        alone_own=mean(alone_o),
        merged=mean(merged_f),
        merged_avg=mean(avg_f),
        first_only=mean(first_f),
        centralized=mean(central_f),
        state_err=[relative_error(m, c) for m, c in zip(merged, central_states, strict=True)],
        state_err_avg=[
            relative_error(m, c) for m, c in zip(merged_avg, central_states, strict=True)
        ],
    )


def bytes_table(model: SSDModel, nodes: int) -> dict[str, int]:
    """What one node ships: its states (payload and msgpack message) vs alternatives."""
    spec = model.state_spec()
    one = tuple(LayerState.zeros(s) for s in spec)
    id_bytes = max(1, math.ceil(math.log2(max(KEYS, VALUES + 1)) / 8))
    return {
        "state_payload": wire_nbytes(spec),
        "state_message": len(msgpack.packb(to_wire(one))),
        "tokens": (PAIRS // nodes) * 2 * id_bytes,
        "weight_delta": 4 * sum(p.numel() for p in model.parameters()),
        "token_bytes_each": 2 * id_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"MQAR: {PAIRS} pairs/sequence, {KEYS} keys, {VALUES} values (chance "
        f"{1 / VALUES:.1%}), {EVAL_SEQUENCES} test sequences, {args.steps} training steps "
        f"(batch {args.batch}, lr {args.lr}, seed {args.seed}), {args.threads} threads"
    )
    print("recall of foreign pairs (pairs the node never saw), mean over nodes")
    header = (
        f"{'layers':>6} {'nodes':>5} {'alone':>7} {'merged':>7} {'merged-avg':>10} "
        f"{'L1-only':>7} {'central':>7} {'alone(own)':>10}  state rel. error per layer "
        f"(merged | avg)"
    )
    rows, models = [], {}
    for layers in args.layers:
        model, seconds = train(layers, args.steps, args.seed, args.batch, args.lr)
        models[layers] = model
        print(f"trained {layers}-layer model in {seconds:.0f} s", flush=True)
    print(header)
    for model in models.values():
        for nodes in NODE_COUNTS:
            r = evaluate(model, nodes, seed=1000 + nodes)
            rows.append(r)
            err = " ".join(f"{e:.1e}" for e in r.state_err)
            err_avg = " ".join(f"{e:.1e}" for e in r.state_err_avg)
            print(
                f"{r.layers:>6} {r.nodes:>5} {r.alone_foreign:>7.1%} {r.merged:>7.1%} "
                f"{r.merged_avg:>10.1%} {r.first_only:>7.1%} {r.centralized:>7.1%} "
                f"{r.alone_own:>10.1%}  "
                f"{err} | {err_avg}",
                flush=True,
            )
    print("\nbytes one node ships (per sequence of context)")
    print(
        f"{'layers':>6} {'nodes':>5} {'state payload':>13} {'msgpack msg':>11} "
        f"{'raw tokens':>10} {'weight delta':>12} {'break-even tokens':>17}"
    )
    for layers, model in models.items():
        for nodes in NODE_COUNTS:
            t = bytes_table(model, nodes)
            even = t["state_payload"] // t["token_bytes_each"]
            print(
                f"{layers:>6} {nodes:>5} {t['state_payload']:>13} {t['state_message']:>11} "
                f"{t['tokens']:>10} {t['weight_delta']:>12} {even:>17}"
            )


if __name__ == "__main__":
    main()
