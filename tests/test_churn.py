"""Churn on a real testnet: kill -9 one node mid-run, SIGSTOP another; the rest finish."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, fflnode_cmd

CHURN_TIMEOUT_S = 600  # ~60 s here when the machine is quiet; CI shares its 2 cores
NODES, ROUNDS, KILLED, KILL_AT, FROZEN, FREEZE_AT = 6, 24, 2, 6, 4, 12


@pytest.mark.slow
def test_six_nodes_survive_a_kill_and_a_freeze_and_merge_among_survivors(tmp_path: Path):
    out = tmp_path / "churn"
    proc = subprocess.run(
        fflnode_cmd(
            "testnet", "--nodes", str(NODES), "--rounds", str(ROUNDS), "--local-steps", "2",
            "--kill", f"{KILLED}@{KILL_AT}", "--stop", f"{FROZEN}@{FREEZE_AT}",
            "--no-baseline", "--no-plot", "--out", str(out),
        ),
        cwd=REPO, capture_output=True, text=True, timeout=CHURN_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    merge, nodes = report["merge"], report["nodes"]
    assert report["ok"] is True

    # The frozen node is out of the merge; the other five merged bit-identically.
    assert merge["excluded"] == [f"node{FROZEN}"]
    assert len(merge["participants"]) == NODES - 1
    assert merge["hashes_agree"] and merge["files_equal_reference"]
    frozen = nodes[f"node{FROZEN}"]
    assert frozen["frozen"] is True and frozen["exit_code"] == -9  # killed by the testnet
    for name, node in nodes.items():
        if name == f"node{FROZEN}":
            continue
        assert node["exit_code"] == 0, (name, node.get("error"))
        assert node["merged_hash"] == merge["reference_hash"]
        assert node["peer_id"] in merge["participants"]
        assert node["merge"]["members"] == merge["participants"]  # everyone agreed on it

    # The killed node came back with the same identity, resumed from its own checkpoint
    # (a round it completed before the kill), caught up with the run and finished it.
    killed = nodes[f"node{KILLED}"]
    assert killed["killed_and_restarted"] is True
    assert killed["resumed_from_round"] is not None
    assert 0 <= killed["resumed_from_round"] < KILL_AT
    assert killed["rounds"][-1]["round"] == ROUNDS - 1
    jumps = killed["catch_up_jumps"]
    assert all(to > frm for frm, to in jumps)
    log = (out / f"node{KILLED}" / "node.log").read_text()
    assert f"resumed from the checkpoint after round {killed['resumed_from_round']}" in log

    # Survivors noticed the frozen peer through the application-level ping.
    survivor_log = (out / "node0" / "node.log").read_text()
    assert "suspected frozen or gone" in survivor_log
    assert "restarted: resumed from its checkpoint after round" in proc.stdout


MERGE_NODES, MERGE_MB, LOST = 4, 32, 3  # 32 MB: the transfers outlast the kill


def merge_churn(tmp_path: Path, fault: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "merge-churn"
    proc = subprocess.run(
        fflnode_cmd(
            "testnet", "--nodes", str(MERGE_NODES), "--task", "synthetic",
            "--synthetic-mb", str(MERGE_MB), "--kill", f"{LOST}@{fault}", "--no-plot",
            "--out", str(out),
        ),
        cwd=REPO, capture_output=True, text=True, timeout=CHURN_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    merge, nodes = report["merge"], report["nodes"]
    assert report["ok"] is True and merge["hashes_agree"] and merge["files_equal_reference"]
    assert merge["excluded"] == [f"node{LOST}"] and len(merge["participants"]) == MERGE_NODES - 1
    assert nodes[f"node{LOST}"]["killed_in_merge"] is True
    survivors = [n for name, n in nodes.items() if name != f"node{LOST}"]
    owners = sorted(i for n in survivors for i in n["merge"]["owned"])
    assert owners == list(range(MERGE_NODES - 1))  # every shard of the final plan owned
    assert "SIGKILL in the merge" in proc.stdout
    return proc, {name: n["merge"]["attempt"] for name, n in nodes.items() if n in survivors}


@pytest.mark.slow
def test_a_member_killed_after_the_agreement_costs_exactly_one_attempt(tmp_path: Path):
    """SIGKILL a node once every node has agreed on a merge that includes it (its
    shards are being reduced and served): the others fail that attempt, agree again
    without it, and merge exactly at the second attempt."""
    _, attempts = merge_churn(tmp_path, "merge")
    assert set(attempts.values()) == {1}, attempts


@pytest.mark.slow
def test_a_member_killed_entering_the_merge_is_left_out_of_the_first_attempt(tmp_path: Path):
    """SIGKILL a node as it enters the merge, before it proposed anything: no member can
    have agreed with it, so the others agree without it at the first attempt."""
    _, attempts = merge_churn(tmp_path, "merge-start")
    assert set(attempts.values()) == {0}, attempts


RING_NODES, RING_ROUNDS, RING_KILLED, RING_KILL_AT = 4, 150, 2, 20


@pytest.mark.slow
def test_a_ring_member_killed_and_restarted_resyncs_its_gossip_copies(tmp_path: Path):
    """Gossip keeps public copies x̂ of itself and its neighbours. A node restarted from
    its checkpoint must not mix against copies that restarted from the initial weights:
    it pulls its neighbours' whole copies, they pull its, and consensus holds."""
    out = tmp_path / "ring-churn"
    proc = subprocess.run(
        fflnode_cmd(
            "testnet", "--nodes", str(RING_NODES), "--topology", "ring",
            "--rounds", str(RING_ROUNDS), "--local-steps", "2",
            "--kill", f"{RING_KILLED}@{RING_KILL_AT}", "--no-baseline", "--no-plot",
            "--out", str(out),
        ),
        cwd=REPO, capture_output=True, text=True, timeout=CHURN_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["merge"]["hashes_agree"]
    nodes = report["nodes"]
    killed = nodes[f"node{RING_KILLED}"]
    assert killed["killed_and_restarted"] and killed["resumed_from_round"] is not None
    neighbours = set(killed["mixing_with"])
    assert len(neighbours) == 2
    for n in neighbours:  # the first copy it got of each neighbour after the restart was
        # pulled whole, not a Delta applied to a stale copy
        first = next(r for r in killed["rounds"] if n not in r["missing"])
        assert n in first["resynced"], first
    for node in nodes.values():  # and each neighbour pulled its public copy whole
        if node["peer_id"] in neighbours:
            assert any(killed["peer_id"] in r["resynced"] for r in node["rounds"])
    tail = [r["consensus_gap"] for r in killed["rounds"][-10:]]
    assert max(tail) < 0.2, tail  # copies from the initial weights gave gaps near 1
