#!/usr/bin/env python3
"""Holo on SSM states: bytes per state against MQAR recall of foreign pairs, in one run.

    PYTHONPATH=. .venv/bin/python tools/bench_state_codec.py [--layers 1 2]

For each model depth the MQAR model is trained with the quick one-node recipe of
fflnode/ssm/mqar.py (seed 0); 4 nodes each read their 8 of the 32 pairs of 256 test
sequences (peer IDs drawn at random), and every node's states go through the state codec
the way the state phase ships them (fflnode.ssm.state_codec: encode once, everyone
decodes the same bytes, the sender included), then are composed in ascending peer-ID
order (states.merge_model). Reported per codec: body bytes of one context's states, the
mean over nodes of the recall of pairs each node never read from the merged states, that
recall relative to the uncompressed merge, and the merged state's relative error per
layer against the centralized reading (one sequence with every share, no codec).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fflnode.ssm import mqar
from fflnode.ssm.state_codec import HoloStateCodec, RawCodec, StateCodec
from fflnode.ssm.states import merge_model, relative_error, stack_layers, unstack_layers

NODES, SEQUENCES = 4, 256
CODECS: list[tuple[str, StateCodec]] = [("none (float32)", RawCodec())] + [
    (f"holo {b} bits", HoloStateCodec(b, seed=1)) for b in (8, 6, 4, 3, 2, 1)
]


def through(codec: StateCodec, batched, spec) -> list:
    """Each context's states as every member composes them: decode(encode(states))."""
    out = []
    for c, states in enumerate(unstack_layers(batched)):
        out.append(codec.roundtrip(states, c, 0, spec)[1])
    return stack_layers(out)


def run(layers: int) -> None:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, _ = mqar.train(layers, mqar.QUICK_STEPS, 0, mqar.QUICK_BATCH, mqar.QUICK_LR)
    trained = time.perf_counter() - t0
    rng = np.random.Generator(np.random.PCG64(1234))
    b = mqar.sample(rng, SEQUENCES)
    ids = [bytes(rng.integers(0, 256, 38, dtype=np.uint8)) for _ in range(NODES)]
    order = sorted(range(NODES), key=lambda j: ids[j])
    owner = mqar.query_owner(b, NODES)
    spec = model.state_spec()
    with torch.no_grad():
        own = [model.forward_with_states(mqar.segment(b.pairs, NODES, j))[1] for j in range(NODES)]
        joined = torch.cat([mqar.segment(b.pairs, NODES, j) for j in order], dim=1)
        central = model.forward_with_states(joined)[1]

    def recall(states, nodes=range(NODES)) -> float:
        """Mean over `nodes` of the recall of the pairs each never read, from `states`."""
        with torch.no_grad():
            hits = mqar.hits(model.forward_with_states(b.queries, states)[0], b.answers)
        return float(np.mean([hits[owner != j].float().mean() for j in nodes]))

    alone = np.mean([recall(s, [j]) for j, s in enumerate(own)])
    print(f"\n{layers}-layer MQAR model, {sum(p.numel() for p in model.parameters()):,} params, "
          f"trained in {trained:.1f} s; centralized recall {recall(central):.1%}, "
          f"alone {alone:.1%} (foreign pairs)")  # fmt: skip
    print(f"{'codec':<16}{'bytes/state':>12}{'vs float32':>11}{'merged recall':>15}"
          f"{'vs none':>9}  error vs centralized per layer")  # fmt: skip
    raw_bytes = RawCodec().body_nbytes(spec, 1)
    base = None
    for name, codec in CODECS:
        shipped = {ids[j]: through(codec, own[j], spec) for j in range(NODES)}
        merged = merge_model(shipped)
        r = recall(merged)
        base = r if base is None else base
        pairs = zip(merged, central, strict=True)
        errors = ", ".join(f"{relative_error(m, c):.2g}" for m, c in pairs)
        nbytes = codec.body_nbytes(spec, 1)
        print(f"{name:<16}{nbytes:>12,}{raw_bytes / nbytes:>10.1f}x{r:>15.1%}"
              f"{r / base:>9.3f}  {errors}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    torch.set_num_threads(1)
    for layers in args.layers:
        run(layers)


if __name__ == "__main__":
    main()
