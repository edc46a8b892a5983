"""`fflnode states` (the testnet on the mqar task): state federation inside real daemons,
checked by the testnet against its own centralized reading; then `fflnode query`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, fflnode_cmd

# 2 nodes x 3 rounds, 16 contexts: ~40 s here, ~90 s with other jobs on the 2 cores.
TESTNET_TIMEOUT_S = 400
QUERY_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("states") / "net"
    proc = subprocess.run(
        fflnode_cmd(
            "states", "--nodes", "2", "--rounds", "3", "--local-steps", "2",
            "--task-option", "contexts=16", "--set", 'states.codec="none"',
            "--no-baseline", "--no-plot", "--out", str(out),
        ),
        cwd=REPO, capture_output=True, text=True, timeout=TESTNET_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "state hashes agree" in proc.stdout and "the nodes' files match them" in proc.stdout
    return out


@pytest.mark.slow
def test_the_daemons_federate_states_and_the_testnet_checks_them_independently(net: Path):
    report = json.loads((net / "report.json").read_text())
    assert report["ok"] and report["config"]["task"] == "mqar"
    st = report["states"]
    assert st["ok"] and st["codec"] == "ssd-states/1;none" and st["metric"] == "recall"
    (epoch,) = st["epochs"]
    assert epoch["hashes_agree"] and epoch["files_match_hashes"] and epoch["contexts"] == 16
    assert epoch["layer_errors"][0] < 1e-6  # one layer: the composition is exact
    for name in ("node0", "node1"):
        row = epoch["nodes"][name]
        assert row["merged"] == pytest.approx(row["centralized"], abs=1e-6)
        assert row["bytes_pulled"] > 16 * 32768  # the other node's 16 states, float32
        assert report["nodes"][name]["states"]["epochs"][0]["hash"] == epoch["hash"]
        assert (net / name / "states" / "merged-0.safetensors").exists()


@pytest.mark.slow
def test_query_answers_from_the_merged_states_and_refuses_a_tampered_file(net, tmp_path):
    cfg = net / "node0" / "node.toml"
    proc = subprocess.run(
        fflnode_cmd("query", "--config", str(cfg), "--context", "2", "--prompt", "", "--json"),
        cwd=REPO, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    report = json.loads((net / "report.json").read_text())
    row = report["states"]["epochs"][0]["nodes"]["node0"]
    assert r["context"] == 2 and r["held_here"] and "values recalled" in r["answer_merged"]
    assert r["metrics_merged"]["recall"] == pytest.approx(row["merged"]["recall"])
    assert r["metrics_own"]["recall"] == pytest.approx(row["alone"]["recall"])
    text = subprocess.run(
        fflnode_cmd("query", "--config", str(cfg), "--prompt", "7"),
        cwd=REPO, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S,
    )  # fmt: skip
    assert text.returncode == 0 and "key 7 -> value" in text.stdout, text.stderr[-2000:]
    # a copy of node1 whose merged states were altered after the run: refused
    copy = tmp_path / "node1"
    shutil.copytree(net / "node1", copy)
    toml = (copy / "node.toml").read_text().replace(str(net / "node1"), str(copy))
    (copy / "node.toml").write_text(toml)
    states = copy / "states" / "merged-0.safetensors"
    data = bytearray(states.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # the last float32 of the file becomes 1.0
    states.write_bytes(bytes(data))
    bad = subprocess.run(
        fflnode_cmd("query", "--config", str(copy / "node.toml")),
        cwd=REPO, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S,
    )  # fmt: skip
    assert bad.returncode == 1 and "does not match" in bad.stderr, bad.stderr[-2000:]
