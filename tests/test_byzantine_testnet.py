"""A corrupt node on a real testnet: robust mixing holds training, fingerprints the merge."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, fflnode_cmd

RUN_TIMEOUT_S = 600  # ~60 s here on a quiet machine
NODES = 5


@pytest.mark.slow
def test_a_signflip_node_is_trimmed_in_rounds_and_excluded_from_the_merge(tmp_path: Path):
    out = tmp_path / "byz"
    proc = subprocess.run(
        fflnode_cmd(
            "testnet", "--nodes", str(NODES), "--rounds", "8", "--local-steps", "4",
            "--corrupt", "1", "--set", 'exchange.robust="trimmed-mean"',
            "--no-baseline", "--no-plot", "--out", str(out),
        ),
        cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    merge, nodes = report["merge"], report["nodes"]
    corrupt = f"node{NODES - 1}"
    # Every honest member applied the same rule to the same fingerprints.
    assert merge["excluded"] == [corrupt]
    assert list(merge["outliers"]) == [corrupt]
    assert "weights are an outlier" in merge["outliers"][corrupt]
    assert merge["hashes_agree"] and merge["files_equal_reference"] and report["ok"]
    assert len(merge["participants"]) == NODES - 1
    bad = nodes[corrupt]
    assert bad["exit_code"] == 3 and "MergeExcluded" in bad["error"]
    for name, node in nodes.items():
        if name != corrupt:
            assert node["exit_code"] == 0
            assert node["merge"]["excluded"] == {bad["peer_id"]: merge["outliers"][corrupt]}
    assert "adversary mode 'signflip'" in (out / corrupt / "node.log").read_text()
