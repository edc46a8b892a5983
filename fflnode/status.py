"""`fflnode status`: ask a running node how it is doing and print a human summary.

The node is found through its metrics endpoint: given directly (--metrics HOST:PORT) or
read from the node.json its data_dir holds (--config node.toml). Exit 0 when the node
answered, 1 when it did not (not running, metrics off, wrong address).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from fflnode import config, metrics
from fflnode.errors import ConfigError
from fflnode.node import NODE_FILE


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help="the node's TOML config (its data_dir has node.json)")
    g.add_argument("--metrics", help="the node's metrics endpoint, HOST:PORT")


def summary(text: str, node: dict | None = None) -> list[str]:
    m = metrics.parse(text)

    def one(name: str, default: float = 0.0) -> float:
        return m[name][0][1] if m.get(name) else default

    def active(name: str) -> str:
        return next(
            (lab.get("phase") or lab.get("state", "?") for lab, v in m.get(name, []) if v == 1.0),
            "?",
        )

    def by_label(name: str, label: str) -> str:
        items = [f"{lab[label]} {v / 1e6:.2f} MB" for lab, v in m.get(name, [])]
        return ", ".join(items) or "none"

    lines = []
    if node:
        lines.append(f"node {node.get('peer_id', '?')} (pid {node.get('pid', '?')})")
    lines.append(
        f"phase {active('fflnode_phase')}, round {one('fflnode_round'):.0f}"
        f"/{one('fflnode_rounds_planned'):.0f}, peers alive {one('fflnode_peers_alive'):.0f}"
    )
    if "fflnode_train_loss" in m:
        scores = ", ".join(f"{lab['name']} {v:.4g}" for lab, v in m.get("fflnode_task_metric", []))
        lines.append(
            f"last round: loss {one('fflnode_train_loss'):.4f}, consensus gap "
            f"{one('fflnode_consensus_gap'):.2e}, peers missing "
            f"{one('fflnode_peers_missing'):.0f}"
        )
        lines.append(f"last evaluation: {scores or 'none yet'}")
    lines.append(f"sent: {by_label('fflnode_bytes_sent_total', 'protocol')}")
    lines.append(f"received: {by_label('fflnode_bytes_received_total', 'protocol')}")
    rejected = [
        f"{lab['reason']} {v:.0f}" for lab, v in m.get("fflnode_rejected_messages_total", [])
    ]
    lines.append(f"rejected messages: {', '.join(rejected) or 'none'}")
    lines.append(f"merge: {active('fflnode_merge_state')}")
    lines.append(f"peak RSS {one('fflnode_peak_rss_bytes') / 2**20:.0f} MiB")
    return lines


def main(args: argparse.Namespace) -> int:
    node = None
    try:
        if args.config:
            cfg = config.load(args.config)
            path = Path(cfg.node.data_dir) / NODE_FILE
            try:
                node = json.loads(path.read_text())
            except (OSError, ValueError):
                print(f"fflnode: {path}: no node.json: is the node running?", file=sys.stderr)
                return 1
            if not node.get("metrics"):
                print(
                    f"fflnode: {args.config}: node.metrics is off; status needs it", file=sys.stderr
                )
                return 1
            address = node["metrics"]
        else:
            address = args.metrics
        host, port = config.split_host_port(address)
    except ConfigError as e:
        print(f"fflnode: {e}", file=sys.stderr)
        return 2
    except ValueError:
        print(f"fflnode: {address!r} is not HOST:PORT", file=sys.stderr)
        return 2
    try:
        text = trio.run(metrics.fetch, host, port)
    except (OSError, trio.TooSlowError) as e:
        print(f"fflnode: no answer from {host}:{port}: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary(text, node)))
    return 0
