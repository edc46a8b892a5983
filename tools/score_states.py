#!/usr/bin/env python3
"""Score a finished testnet's state files again, with the task's current evaluate_states.

    PYTHONPATH=. .venv/bin/python tools/score_states.py TESTNET_OUT [--epoch E]

For each node directory under TESTNET_OUT (node0, node1, ...): the run's merged weights
and the epoch's merged states, both checked against the hashes the run agreed on
(fflnode.query.load_run / read_states), the node's own states, and the testnet's
centralized reading of every context (fflnode_harness.testnet.centralized_states: the
members' segments concatenated in ascending peer-ID order, folded once, no network).
Prints the task's state metrics on what each node never read, from each of the three.
Used when a task's evaluate_states changes after a run (docs/benchmarks.md, "F-SSD").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from libp2p.peer.id import ID

from fflnode import config
from fflnode.query import load_run, read_states
from fflnode.ssm import epoch as ep
from fflnode_harness.testnet import centralized_states


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="a finished `fflnode testnet` output directory")
    p.add_argument("--epoch", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    nodes = sorted(d for d in args.out.iterdir() if (d / "result.json").exists())
    results = {d: json.loads((d / "result.json").read_text()) for d in nodes}
    partition = {r["peer_id"]: r["partition_index"] for r in results.values()}
    central = None
    for d in nodes:
        cfg = config.load(d / "node.toml")
        run = load_run(cfg)
        task, model = run["loaded"].task, run["model"]
        spec = task.state_spec(model)
        rec = {r["epoch"]: r for r in run["records"]}[args.epoch]
        if central is None:
            order = sorted(rec["members"], key=lambda m: ID.from_base58(m).to_bytes())
            parts = [partition[m] for m in order]
            central = centralized_states(task, model, parts, cfg, args.epoch)
        merged = read_states(ep.merged_path(cfg.data_dir, args.epoch), spec, rec["hash"])
        own = read_states(ep.own_path(cfg.data_dir, args.epoch), spec, None)
        part, n, seed = cfg.train.partition_index, cfg.run.nodes, cfg.run.seed
        row = []
        for name, states in (("alone", own), ("merged", merged), ("centralized", central)):
            m = task.evaluate_states(model, states, part, n, seed, args.epoch)
            row.append(f"{name} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        print(f"{d.name}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
