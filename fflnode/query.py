"""`fflnode query`: ask a finished run's model, conditioned on its federated states.

Reads what `fflnode run` left in a node's data_dir: the merged weights (merged.safetensors,
checked against the hash the merge agreed, as recorded in result.json) and one epoch's
merged states (states/merged-<epoch>.safetensors, checked against the states hash the
members agreed) and this node's own states (states/own-<epoch>.safetensors). It prints
the task's answer to a prompt from one context's merged state and from the node's own
state alone (Responder.respond: MQAR, the value recalled for a key; a text model, a
continuation), then the task's state metrics on what this node never read, with its own
states and with the merged ones (StateTask.evaluate_states): what federation brought it.

Local and read-only: no network, nothing written. Exit codes: 0 answered; 2 a bad config
or a task without the state capability; 1 the run's files are missing or do not match
their agreed hashes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fflnode import config
from fflnode.errors import ConfigError, FflError, FormatError

RESULT_FILE = "result.json"
MERGED_FILE = "merged.safetensors"


class QueryError(FflError):
    """The run's files are missing, or do not match the hashes its members agreed on."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the node's TOML config (its data_dir)")
    p.add_argument("--epoch", type=int, default=None, help="state epoch (default: the last)")
    p.add_argument(
        "--context", type=int, default=None, help="context id (default: the first this node "
        "did not hold, else the first)",
    )  # fmt: skip
    p.add_argument(
        "--prompt", default="", help="mqar: a key (empty: every key of the context); text: "
        "the text to continue (empty: the document itself)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def load_run(cfg: config.Config) -> dict[str, Any]:
    """The model with the run's merged weights and one epoch's states, hash-checked."""
    import torch

    from fflnode.prism.reader import SafetensorsFile
    from fflnode.tensors import model_hash
    from fflnode.train.task import build_model, load_task

    loaded = load_task(cfg.train.task, cfg.task, cfg.base_dir)
    if not loaded.federates_states:
        raise ConfigError(f"task {cfg.train.task!r} has no state capability: nothing to query")
    data_dir = cfg.data_dir
    try:
        result = json.loads((data_dir / RESULT_FILE).read_text())
    except (OSError, ValueError) as e:
        raise QueryError(f"{data_dir / RESULT_FILE}: not a finished run's result: {e}") from None
    records = (result.get("states") or {}).get("epochs") or []
    if not records:
        why = result.get("error") or "it federated no states"
        raise QueryError(f"{data_dir}: no merged states to query ({why})")
    model = build_model(loaded, cfg.run.seed)
    with SafetensorsFile(data_dir / MERGED_FILE) as f:
        weights = f.tensors()
    if model_hash(weights) != result.get("merged_hash"):
        raise QueryError(f"{data_dir / MERGED_FILE} does not match the run's agreed hash")
    with torch.no_grad():
        for name, value in weights.items():
            try:
                target = model.get_parameter(name)
            except AttributeError:
                target = model.get_buffer(name)
            target.copy_(value.view_as(target))
    model.eval()
    return {"loaded": loaded, "model": model, "records": records, "result": result}


def read_states(path: Path, spec: Any, agreed: str | None) -> dict[int, Any]:
    from fflnode.prism.reader import SafetensorsFile
    from fflnode.ssm import epoch as ep

    try:
        with SafetensorsFile(path) as f:
            tensors = f.tensors()
    except OSError as e:
        raise QueryError(f"{path}: {e.strerror or e}") from None
    if agreed is not None and ep.states_hash(tensors) != agreed:
        raise QueryError(f"{path} does not match the states hash the members agreed on")
    return ep.read_tensors(tensors, spec, str(path))


def query(cfg: config.Config, args: argparse.Namespace) -> dict[str, Any]:
    from fflnode.ssm import epoch as ep
    from fflnode.train.task import Responder

    run = load_run(cfg)
    task, model, records = run["loaded"].task, run["model"], run["records"]
    by_epoch = {r["epoch"]: r for r in records}
    e = max(by_epoch) if args.epoch is None else args.epoch
    if e not in by_epoch:
        raise QueryError(f"no state epoch {e} in this run (epochs: {sorted(by_epoch)})")
    record = by_epoch[e]
    spec = task.state_spec(model)
    merged = read_states(ep.merged_path(cfg.data_dir, e), spec, record["hash"])
    own_file = ep.own_path(cfg.data_dir, e)
    own = read_states(own_file, spec, None) if own_file.exists() else {}
    context = args.context
    if context is None:
        foreign = [c for c in merged if c not in own]
        context = (foreign or sorted(merged))[0]
    if context not in merged:
        raise QueryError(f"context {context} is not in the merged states of epoch {e}")
    part, nodes, seed = cfg.train.partition_index, cfg.run.nodes, cfg.run.seed
    out: dict[str, Any] = {
        "run": cfg.run.run_id,
        "peer_id": run["result"].get("peer_id"),
        "partition": part,
        "nodes": nodes,
        "epoch": e,
        "states_hash": record["hash"],
        "members": len(record["members"]),
        "context": context,
        "prompt": args.prompt,
        "held_here": context in own,
    }
    if isinstance(task, Responder):
        out["answer_merged"] = task.respond(model, merged[context], args.prompt, context, seed, e)
        out["answer_own"] = task.respond(model, own.get(context), args.prompt, context, seed, e)
    out["metrics_own"] = dict(task.evaluate_states(model, own, part, nodes, seed, e))
    out["metrics_merged"] = dict(task.evaluate_states(model, merged, part, nodes, seed, e))
    return out


def print_result(r: dict[str, Any]) -> None:
    print(
        f"fflnode query: run {r['run']}, partition {r['partition']} of {r['nodes']}, state "
        f"epoch {r['epoch']} (hash {r['states_hash'][:16]}…, agreed by {r['members']} members)"
    )
    held = "this node read a share of it" if r["held_here"] else "this node never read it"
    print(f"context {r['context']} ({held}), prompt {r['prompt']!r}:")
    if "answer_merged" in r:
        own = "own state" if r["held_here"] else "no state "
        print(f"  merged state: {indent(r['answer_merged'])}")
        print(f"  {own}:    {indent(r['answer_own'])}")
    print("on what this node never read (the task's evaluate_states):")
    for k in r["metrics_merged"]:
        print(
            f"  {k:<14} own states {r['metrics_own'].get(k, float('nan')):.4g}   "
            f"merged states {r['metrics_merged'][k]:.4g}"
        )


def indent(text: str) -> str:
    return text.replace("\n", "\n" + " " * 16)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.config)
        r = query(cfg, args)
    except ConfigError as e:
        print(f"fflnode: {e}", file=sys.stderr)
        return 2
    except (QueryError, FormatError) as e:
        print(f"fflnode query: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print_result(r)
    return 0
