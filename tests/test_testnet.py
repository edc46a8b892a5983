"""A short multi-process testnet: real processes, real sockets, checked report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from libp2p.peer.id import ID

from tests.conftest import REPO, fflnode_cmd

TESTNET_TIMEOUT_S = 300  # 3 nodes x 3 short rounds take ~30 s here; generous for CI


@pytest.mark.slow
def test_three_node_testnet_trains_merges_and_reports(tmp_path: Path):
    out = tmp_path / "net"
    proc = subprocess.run(
        fflnode_cmd(
            "testnet", "--nodes", "3", "--rounds", "3", "--local-steps", "5", "--out", str(out)
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TESTNET_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hashes agree with the reference" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True
    merge = report["merge"]
    assert merge["hashes_agree"] and merge["files_equal_reference"]
    assert len(merge["reference_hash"]) == 64
    assert merge["shards"] == 3 and len(merge["participants"]) == 3
    assert 0.0 <= merge["merged_metrics"]["accuracy"] <= 1.0
    assert merge["consensus_distance"] == 0.0  # the complete graph keeps nodes identical
    # Data-parallel: the run's 3 x 5 steps, a batch per node in each; sequential: all 45.
    assert report["centralized"]["steps"] == 3 * 5
    assert report["centralized"]["batches_per_step"] == 3
    assert report["centralized_sequential"]["steps"] == 3 * 3 * 5
    assert report["centralized_sequential"]["batches_per_step"] == 1
    for key in ("centralized", "centralized_sequential"):
        assert set(report[key]["metrics"]) == {"accuracy", "loss"}
    peer_ids = set()
    for name in ("node0", "node1", "node2"):
        node = report["nodes"][name]
        peer_ids.add(node["peer_id"])
        ID.from_base58(node["peer_id"])  # a real peer ID
        assert node["exit_code"] == 0
        assert node["merged_hash"] == merge["reference_hash"]
        assert 0.0 <= node["metrics_before_merge"]["accuracy"] <= 1.0
        assert node["consensus_distance"] == 0.0
        assert node["bytes_sent"] > 0 and node["bytes_received"] > 0
        # node.fast_path (on by default): the merge's pieces went over TLS channels
        fast = node["fast_path"]
        assert fast["opened"] > 0 and fast["accepted"] > 0 and not fast["refused"], fast
        assert len(node["rounds"]) == 3
        for f in ("premerge.safetensors", "merged.safetensors", "node.log", "node.toml"):
            assert (out / name / f).exists(), f
    assert sorted(peer_ids) == sorted(merge["participants"])
    assert (out / "metrics.png").stat().st_size > 1000
    assert report["wall_seconds"] > 0


def test_a_lossy_codec_on_the_default_recipe_is_refused_naming_the_one_that_works(tmp_path):
    """`fflnode testnet --codec holo` on the default recipe (outer Adam, one local step)
    ended 37 points under centralized: the run is refused before any node starts."""
    proc = subprocess.run(
        fflnode_cmd("testnet", "--codec", "holo", "--out", str(tmp_path / "net")),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    for words in ("holo", "outer_optimizer 'adam'", "DiLoCo", 'outer_optimizer = "sgd"'):
        assert words in line, line
    assert not (tmp_path / "net" / "node0" / "node.log").exists()  # nothing was started


def test_a_node_not_ready_in_time_is_one_line_and_a_report_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """A node that has not said READY within NOTIFY_TIMEOUT_S (a machine loaded far past
    its cores) is named in one line; without node0's address nothing can start, so the
    testnet stops its nodes, writes its report and exits 1."""
    from fflnode.cli import build_parser
    from fflnode_harness import testnet

    monkeypatch.setattr(testnet, "NOTIFY_TIMEOUT_S", 0.01)  # no daemon is READY that fast
    out = tmp_path / "net"
    args = build_parser().parse_args(
        ["testnet", "--nodes", "2", "--rounds", "1", "--no-baseline", "--no-plot",
         "--out", str(out)]
    )  # fmt: skip
    assert testnet.main(args) == 1
    said = capsys.readouterr().out
    assert "node0: not READY within 0 s" in said and "Traceback" not in said, said
    assert "metrics.png" not in said  # --no-plot: no plot is promised
    assert json.loads((out / "report.json").read_text())["ok"] is False


def test_a_node_whose_config_is_refused_is_named_with_its_reason_not_a_traceback(
    tmp_path: Path,
):
    """A node that exits before READY (here: the daemon refuses an out-of-core budget too
    small for its encoded Deltas, a check only the node can make) is one line carrying
    the node's own last words; the testnet stops and exits 1 with its report."""
    out = tmp_path / "net"
    proc = subprocess.run(
        fflnode_cmd(
            "testnet", "--nodes", "2", "--rounds", "1", "--task", "text",
            "--task-option", "seq_len=32", "--task-option", "batch_size=4",
            "--task-option", "d_model=192", "--task-option", "n_layers=8",
            "--set", 'train.outer_optimizer="sgd"', "--set", 'states.federate="off"',
            "--set", 'train.inner_optimizer="adam"', "--codec", "holo", "--bits", "2",
            "--set", "train.memory_budget_mb=40", "--set", "exchange.chunk_elems=262144",
            "--set", 'exchange.scheme="all-gather"',
            "--no-baseline", "--no-plot", "--out", str(out),
        ),
        capture_output=True, text=True, timeout=TESTNET_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    said = [line for line in proc.stdout.splitlines() if "ended before READY" in line]
    assert len(said) == 1 and "encoded Deltas" in said[0], proc.stdout
    assert json.loads((out / "report.json").read_text())["ok"] is False


def test_the_text_task_testnet_defaults_to_its_recipe_gentler_for_a_lossy_codec():
    """`fflnode testnet --task text` runs the LM's DiLoCo recipe; with a lossy codec the
    outer step that recipe measured for it (lr 0.5, momentum 0.7); flags given win."""
    import argparse

    from fflnode_harness.testnet import add_arguments, apply_task_defaults, parse_overrides

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def resolved(*argv: str) -> tuple[int, int, dict]:
        args = apply_task_defaults(parser.parse_args(list(argv)))
        return args.rounds, args.local_steps, parse_overrides(args.set)

    rounds, steps, exact = resolved("--task", "text")
    assert (rounds, steps) == (30, 20)
    assert exact["train.outer_optimizer"] == "sgd" and exact["train.outer_lr"] == 0.7
    assert exact["train.outer_momentum"] == 0.8 and exact["train.inner_lr"] == 0.01
    _, _, lossy = resolved("--task", "text", "--codec", "holo")
    assert (lossy["train.outer_lr"], lossy["train.outer_momentum"]) == (0.5, 0.7)
    assert lossy["train.inner_lr"] == 0.01
    _, _, given = resolved("--task", "text", "--codec", "holo", "--set", "train.outer_lr=0.3")
    assert given["train.outer_lr"] == 0.3 and given["train.outer_momentum"] == 0.7
    rounds, steps, digits = resolved("--rounds", "7")
    assert (rounds, steps) == (7, 1) and "train.outer_lr" not in digits
