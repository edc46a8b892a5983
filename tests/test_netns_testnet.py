"""Across real hosts: `fflnode testnet --netns`, each node in its own network namespace.

Four nodes on one bridge at 198.51.100.10-13, each listening on 0.0.0.0:4001 with the
production [pubsub] settings, only node 0's address given as bootstrap. Needs root (or
CAP_SYS_ADMIN) and iproute2: skipped with the reason elsewhere, unless
FFLNODE_REQUIRE_NETNS=1 (CI runs as root), where being unable to create namespaces fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from fflnode import config as cfgmod
from fflnode.cli import build_parser
from fflnode.errors import short_peer
from fflnode.p2p import addrs
from fflnode_harness import netns, testnet
from fflnode_harness.netns import Bridge, NetnsError
from fflnode_harness.testnet import EXIT_SKIPPED
from tests.conftest import REPO, fflnode_cmd

# One bridge subnet (198.51.100.0/24) and one stale-namespace sweep for all of these:
# under pytest-xdist they run on one worker, one after another.
pytestmark = pytest.mark.xdist_group("netns")

AVAILABLE, WHY_NOT = netns.netns_available()
if not AVAILABLE and os.environ.get("FFLNODE_REQUIRE_NETNS") == "1":
    raise RuntimeError(f"FFLNODE_REQUIRE_NETNS=1 but {WHY_NOT}")
needs_netns = pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces: {WHY_NOT}")

CALL_TIMEOUT_S = 10.0  # each call below does a few syscalls; this bounds a stuck one


def own_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@needs_netns
def test_call_in_runs_in_the_nodes_network_and_leaves_the_caller_where_it_was() -> None:
    before = own_netns()
    with Bridge(2) as br:
        found = br.call_in(0, addrs.interface_addresses, timeout_s=CALL_TIMEOUT_S)
        assert ("eth0", ipaddress.ip_address("198.51.100.10")) in found
        assert own_netns() == before  # only the call's own thread entered node 0

        def listen() -> socket.socket:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            return s

        # a socket opened there stays there: node 0's loopback, not ours, not node 1's
        server = br.call_in(0, listen, timeout_s=CALL_TIMEOUT_S)
        with server:
            port = server.getsockname()[1]
            br.call_in(
                0, lambda: socket.create_connection(("127.0.0.1", port), 1).close(),
                timeout_s=CALL_TIMEOUT_S,
            )  # fmt: skip
            for refused in (
                lambda: socket.create_connection(("127.0.0.1", port), 1),
                lambda: br.call_in(
                    1, lambda: socket.create_connection(("127.0.0.1", port), 1),
                    timeout_s=CALL_TIMEOUT_S,
                ),
            ):  # fmt: skip
                with pytest.raises(ConnectionRefusedError):
                    refused()
        with pytest.raises(ZeroDivisionError):  # what the call raises, the caller gets
            br.call_in(1, lambda: 1 / 0, timeout_s=CALL_TIMEOUT_S)
        with pytest.raises(NetnsError, match="node 2 does not exist"):
            br.call_in(2, own_netns, timeout_s=CALL_TIMEOUT_S)
    assert own_netns() == before


# ------------------------------------------------------------------- the testnet
NODES = 4
BRIDGE_NET = "198.51.100."  # node i at BRIDGE_NET + str(10 + i), port 4001
# Each run starts 4 Python processes (torch, libp2p) and trains a few rounds: about a
# minute on the shared 2-core machine under load; the limit only stops a hung run.
TESTNET_TIMEOUT_S = 600
ROUNDS = 4
# The flap: node 1 unplugged at round 2 for 8 s (peers declare it gone after 4.5-5.5 s).
# The others, stalled ~5 s and then on their own, must have rounds left once it is back
# (~2 s after the link): a quiet machine runs ~4 rounds a second, a loaded one under one.
FLAPPED, FLAP_AT, FLAP_S, FLAP_ROUNDS = 1, 2, 8, 30


def run_testnet(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path / "net"
    proc = subprocess.run(
        fflnode_cmd("testnet", "--netns", "--nodes", str(NODES), "--local-steps", "1",
                    "--no-baseline", "--no-plot", "--out", str(out), *extra),
        cwd=REPO, capture_output=True, text=True, timeout=TESTNET_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    return proc, report, out


def address(i: int, peer: str) -> str:
    return f"/ip4/{BRIDGE_NET}{10 + i}/tcp/4001/p2p/{peer}"


def check_merge(report: dict) -> None:
    """Every node merged, bit-identical to the testnet's independent reference."""
    merge = report["merge"]
    assert report["ok"] is True
    assert merge["hashes_agree"] and merge["files_equal_reference"]
    assert len(merge["reference_hash"]) == 64 and len(merge["participants"]) == NODES
    for node in report["nodes"].values():
        assert node["exit_code"] == 0, node.get("error")
        assert node["merged_hash"] == merge["reference_hash"]


def check_network(report: dict, out: Path) -> None:
    """Each node on its own address, configured as a deployment is, with only node 0
    as bootstrap, and each learnt every other's address from heartbeats."""
    nodes = report["nodes"]
    peers = [nodes[f"node{i}"]["peer_id"] for i in range(NODES)]
    assert report["netns"]["addresses"] == [f"{BRIDGE_NET}{10 + i}" for i in range(NODES)]
    assert report["netns"]["bootstrap"] == [address(0, peers[0])]
    for i in range(NODES):
        cfg = cfgmod.load(out / f"node{i}" / "node.toml")
        assert cfg.node.listen == ["/ip4/0.0.0.0/tcp/4001"]
        assert cfg.node.bootstrap == ([] if i == 0 else [address(0, peers[0])])
        assert cfg.pubsub == cfgmod.PubsubSection()  # production defaults, not relaxed
        node_file = json.loads((out / f"node{i}" / "node.json").read_text())
        assert node_file["addrs"] == [address(i, peers[i])]  # never 0.0.0.0
        scrape = nodes[f"node{i}"]["metrics_scrape"]  # its own 127.0.0.1, from inside
        assert "error" not in scrape and scrape["fflnode_round"] >= 1, scrape

    logs = [(out / f"node{i}" / "node.log").read_text() for i in range(NODES)]
    for i, log in enumerate(logs):
        advertised = [line for line in log.splitlines() if " advertis" in line]
        assert advertised and not any("0.0.0.0" in line for line in advertised)
        assert all(f"/ip4/{BRIDGE_NET}" in line for line in advertised), advertised
        for j in range(NODES):  # from its heartbeat: bootstrap names node 0 only
            if j != i:
                assert f"joined (round 0, join), advertising {address(j, peers[j])}" in log
    # Nodes 1..3 knew only node 0: between any two of them, one dialled the other at the
    # address its heartbeat named.
    for i in range(1, NODES):
        for j in range(i + 1, NODES):
            dialled = (
                f"at /ip4/{BRIDGE_NET}{10 + j}/tcp/4001 (from its heartbeat)" in logs[i]
                or f"at /ip4/{BRIDGE_NET}{10 + i}/tcp/4001 (from its heartbeat)" in logs[j]
            )
            assert dialled, (i, j)


def check_bridge_removed(proc: subprocess.CompletedProcess) -> None:
    bridge = re.search(r"on bridge (\S+):", proc.stdout)
    assert bridge, proc.stdout[:2000]
    assert not [ns for ns in netns.list_netns() if ns.startswith(bridge.group(1) + "-")]


@needs_netns
@pytest.mark.slow
def test_four_hosts_find_each_other_from_one_bootstrap_address_and_merge_exactly(
    tmp_path: Path,
) -> None:
    proc, report, out = run_testnet(tmp_path, "--rounds", str(ROUNDS))
    check_merge(report)
    assert report["merge"]["consensus_distance"] == 0.0  # the complete graph: identical
    check_network(report, out)
    check_bridge_removed(proc)


@needs_netns
@pytest.mark.slow
def test_a_node_whose_link_flaps_waits_catches_up_resyncs_and_merges(tmp_path: Path) -> None:
    """Node 1's cable is pulled for FLAP_S seconds: long enough that each side declares
    the other gone and drops the connection. Cut off from the quorum, node 1 finishes
    the round in flight alone and starts no other; the three others train on. Once the
    link is back the two sides redial each other, node 1 jumps to the others' round
    (catch-up, when they got BEHIND_BY rounds ahead, as they do in 8 s) and, its state
    being in the minority, adopts a majority peer's, digest-verified (resync). All four
    merge bit-identically, and the others never waited for it nor skipped a round."""
    flap = f"{FLAPPED}@{FLAP_AT}:{FLAP_S}"
    proc, report, out = run_testnet(tmp_path, "--rounds", str(FLAP_ROUNDS), "--flap", flap)
    check_merge(report)  # all four, the flapped node included
    check_network(report, out)
    check_bridge_removed(proc)
    nodes = report["nodes"]
    node = nodes[f"node{FLAPPED}"]
    assert node["flap"]["round_down"] >= FLAP_AT and "round_up" in node["flap"]
    round_up = node["flap"]["round_up"]  # node 1's round when its link came back
    alone = [r["round"] for r in node["rounds"] if r["received"] == 0]
    cut_off = [r for r in alone if r < round_up]
    adopted = [r["round"] for r in node["rounds"] if r["resynced_from"]]
    # While cut off: the round in flight, and no other started.
    assert len(cut_off) <= 1 and adopted and min(adopted) > max(cut_off, default=-1), node
    # Back: it jumps forward to the majority's round. The others' rounds take ~0.3 s and
    # heartbeats come each second, so it may land behind a fast majority and jump again.
    # A round that got nothing after the link was back is one it ran behind them: the
    # next one either jumps to theirs (BEHIND_BY or more ahead) or, one behind, is in
    # step with them (peers wait up to one round for a member; under load, the usual).
    jumps = node["catch_up_jumps"]
    assert all(to > frm for frm, to in jumps), jumps
    assert jumps or min(adopted) <= round_up + 2, node
    ran = {x["round"]: x for x in node["rounds"]}
    for r in alone:
        if r >= round_up:
            jumped = any(frm == r + 1 for frm, _ in jumps)
            assert jumped or ran[r + 1]["received"] > 0, (r, jumps, node["rounds"])
    assert node["rounds"][-1]["received"] == NODES - 1  # in step to the end
    for i in range(NODES):
        if i != FLAPPED:  # the majority trained every round, none skipped
            assert nodes[f"node{i}"]["catch_up_jumps"] == []
            assert len(nodes[f"node{i}"]["rounds"]) == FLAP_ROUNDS
    # Both sides gave up on each other, and heartbeats came back over new connections.
    flapped = short_peer(node["peer_id"])
    log = (out / f"node{FLAPPED}" / "node.log").read_text()
    assert "below the quorum 3: waiting" in log
    for i in range(NODES):
        if i != FLAPPED:
            other = short_peer(nodes[f"node{i}"]["peer_id"])
            assert f"peer {other} suspected frozen or gone" in log
            assert f"peer {other} is back" in log
            other_log = (out / f"node{i}" / "node.log").read_text()
            assert f"peer {flapped} suspected frozen or gone" in other_log
            assert f"peer {flapped} is back" in other_log
    assert "link down at round" in proc.stdout and "link up at round" in proc.stdout


def others_can_enter(path: Path) -> bool:
    """Whether a user who is not the owner can reach files under `path` (every directory
    on the way searchable by others: a checkout under `mktemp -d` is not)."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_without_namespaces_the_netns_testnet_skips_and_says_why(tmp_path: Path) -> None:
    """As an unprivileged user no namespace can be created: nothing starts, one line
    says why, and the exit code says "skipped"."""
    if not others_can_enter(REPO):
        pytest.skip(f"user nobody cannot read the checkout at {REPO} (a directory is not o+x)")
    tmp_path.chmod(0o777)
    proc = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         *fflnode_cmd("testnet", "--netns", "--nodes", "2", "--out", str(tmp_path / "o"))],
        cwd=tmp_path, capture_output=True, text=True, timeout=TESTNET_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == EXIT_SKIPPED, proc.stdout + proc.stderr
    assert proc.stdout.startswith("fflnode testnet --netns: skipped: cannot create"), proc.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--flap", "1@3"], "--flap needs --netns"),
        (["--netns", "--flap", "4@3"], "expected NODE@ROUND"),
        (["--netns", "--flap", "1@3:0"], "0 < SECONDS <= 600"),
        (["--netns", "--flap", "1@3:x"], "0 < SECONDS <= 600"),
        (["--netns", "--flap", "1@merge"], "expected NODE@ROUND"),
    ],
)
def test_bad_flap_specs_are_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    args = build_parser().parse_args(
        ["testnet", "--nodes", "4", "--out", str(tmp_path / "o"), *argv]
    )
    assert testnet.main(args) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# A run that cannot finish: its deadline passes while the nodes still start. Stopping
# them, the report and the bridge's removal take seconds; the limit catches a hang.
SHORT_DEADLINE_S = 1
ABORT_TIMEOUT_S = 120


def bridge_of(line: str) -> str:
    found = re.search(r"in network namespaces (\S+)-n0\.\.", line)
    assert found, line
    return found.group(1)


@needs_netns
def test_a_failed_run_still_removes_its_bridge(tmp_path: Path) -> None:
    out = tmp_path / "net"
    proc = subprocess.run(
        fflnode_cmd("testnet", "--netns", "--nodes", "2", "--rounds", "2", "--no-baseline",
                    "--no-plot", "--deadline", str(SHORT_DEADLINE_S), "--out", str(out)),
        cwd=REPO, capture_output=True, text=True, timeout=ABORT_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"not done within {SHORT_DEADLINE_S} s" in proc.stdout
    assert json.loads((out / "report.json").read_text())["ok"] is False
    name = bridge_of(proc.stdout)
    assert not [ns for ns in netns.list_netns() if ns.startswith(name + "-")]


@needs_netns
def test_a_sigterm_mid_run_stops_the_nodes_and_removes_the_bridge(tmp_path: Path) -> None:
    """SIGTERM as soon as the bridge exists: whichever handler gets it (the Bridge's
    before trio runs, the testnet's after), nothing is left behind."""
    out = tmp_path / "net"
    proc = subprocess.Popen(
        fflnode_cmd("testnet", "--netns", "--nodes", "2", "--rounds", "2", "--no-baseline",
                    "--no-plot", "--out", str(out)),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "starting 2 nodes in network namespaces ..."
        name = bridge_of(first)
        assert [ns for ns in netns.list_netns() if ns.startswith(name + "-")]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=ABORT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # died of it (the Bridge's handler re-raises it) or said so (the testnet's: 128 + 15)
    assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), first + rest
    assert not [ns for ns in netns.list_netns() if ns.startswith(name + "-")]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in ps  # no node outlived the run
