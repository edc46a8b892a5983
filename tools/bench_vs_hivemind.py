#!/usr/bin/env python3
"""fflnode's final merge against hivemind's butterfly all-reduce, in the same run.

    .venv/bin/python tools/bench_vs_hivemind.py --sizes 16,64,256 --repeats 5 \\
        --hivemind-python /work/venv-hm/bin/python

For each size (MiB of float32) and repeat, in an interleaved order (the system that goes
first alternates), one trial of each:

  fflnode   4 processes, one node each, on 127.0.0.1: libp2p host, GossipSub membership,
            the start barrier, then fflnode.merge.MergeSession over FastPath channels
            (fflnode.p2p.fastpath), composed as a node composes them (see `fflnode_peer`)
            and with merge settings at their config defaults. --fflnode testnet runs
            `fflnode testnet --task synthetic` instead: the node as node.py wires it.
  hivemind  4 processes, one peer each (with its DHT process, averager process and Go
            p2pd): hivemind 1.1.12's DecentralizedAverager, NoCompression,
            target_group_size = min_group_size = 4, step(require_trigger=True): the group
            forms (matchmaking, not timed), then every peer is triggered and the
            all-reduce is timed.

What is timed. hivemind: from the first peer's trigger to the last peer's result (wall
clock across processes). fflnode: from the first node's start of transfers (members
agreed, plan made) to the last node's verified hash: reduce-scatter + all-gather +
verify (MergeOutcome.phase_seconds). fflnode's agreement phase (fingerprints, then a
view that must hold still AGREE_SETTLE_S = 2 s, then propose/lock/commit) is shown
apart, as hivemind's matchmaking is not timed at all.

Memory per peer: the peak, sampled every SAMPLE_S (PSS: every PSS_EVERY samples), of
the summed RSS of all the peer's processes (fflnode: one; hivemind: main, DHT, averager,
p2pd), and the same for PSS
(shared pages split between the processes sharing them: hivemind's averaged tensor is
shared memory, which RSS counts in every process mapping it). "added" is the peak minus
the sum just before the timed part.

Exactness, as the fraction of elements bit-equal to float32(exact mean), where the mean
is sum(float64) in ascending peer-ID order / N, computed here with plain torch from the
inputs (fflnode: the premerge files the nodes wrote; hivemind: the seeded inputs). For
fflnode the hashes the nodes agreed on are checked too.

The hivemind side runs this file with --hivemind-python, importing only the standard
library, numpy, torch and hivemind there. This script installs nothing. Make that venv:

    python3 -m venv /tmp/hm-venv
    /tmp/hm-venv/bin/pip install torch==2.13.0   # first: other torch specs pull CUDA wheels
    /tmp/hm-venv/bin/pip install hivemind==1.1.12

Every trial leaves its files in a temporary directory removed at the end (--keep to
keep them); 256 MiB x 4 peers needs ~3 GiB of disk and ~6 GiB of RAM at the check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

NODES = 4
RUN_SEED = (
    1  # data: fflnode's SyntheticTask.write_premerge(seed, node) / hivemind's default_rng(seed, i)
)
LAG_PERIOD_S = 0.05  # fflnode peers: how often the event loop's lateness is sampled
SAMPLE_S = 0.05  # RSS sampling period: 20 Hz catches a peak lasting a few transfers
# PSS is sampled every PSS_EVERY RSS samples: the kernel walks every mapping to sum it,
# and at 20 Hz py-spy put the sampler at 28 % of a merging node's samples (4 nodes, 64 MiB).
PSS_EVERY = 10
TRIAL_TIMEOUT_S = 900  # one trial; 256 MiB through the slowest path took ~60 s
READY_TIMEOUT_S = 120  # a peer process importing torch on a loaded machine: ~5-20 s
START_TIMEOUT_S = 120.0  # fflnode's start barrier
HIVEMIND_GROUP_TIMEOUT_S = 120.0  # matchmaking of the 4 peers
HIVEMIND_MATCHMAKING_S = 5.0  # hivemind's default min_matchmaking_time


# -- memory sampling (both venvs: standard library only) -------------------------------


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu_s(pid: int) -> float:
    return sum(_cpu_s(p) for p in _tree(pid))


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeSampler:
    """Samples the summed RSS and PSS of a process and all its descendants."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, pss: bool = True) -> tuple[int, int]:
        pids = _tree(self.pid)
        return (
            sum(_status_kb(p, "VmRSS:") for p in pids) << 10,
            sum(_pss_kb(p) for p in pids) << 10 if pss else 0,
        )

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(SAMPLE_S):
            n += 1
            rss, pss = self.sample(pss=n % PSS_EVERY == 0)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def start(self) -> tuple[int, int]:
        """Start sampling; returns the sums now (the baseline)."""
        rss, pss = self.sample()
        self.peak_rss, self.peak_pss = rss, pss
        self._thread.start()
        return rss, pss

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        rss, pss = self.sample()
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)


def _emit(doc: dict) -> None:
    print(json.dumps(doc), flush=True)


# -- one fflnode node (fflnode's venv) ---------------------------------------------------


def fflnode_peer(a: argparse.Namespace) -> int:
    import trio

    trio.run(_fflnode_peer, a)
    return 0


async def _fflnode_peer(a: argparse.Namespace) -> None:
    import logging
    import tracemalloc

    import multiaddr
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.tools.anyio_service import background_trio_service

    from fflnode.config import MergeSection
    from fflnode.errors import leaf_error
    from fflnode.merge.protocol import MERGE_PROTOCOL, MergeSession
    from fflnode.node import Node
    from fflnode.p2p.barrier import start_barrier
    from fflnode.p2p.bulk import Traffic
    from fflnode.p2p.fastpath import FastPath
    from fflnode.p2p.host import build_host, build_pubsub, close_host, running_host
    from fflnode.p2p.membership import HEARTBEAT_S, Membership
    from fflnode.tensors import FlatLayout
    from fflnode.train.tasks.synthetic import SyntheticTask

    out = Path(a.out)
    logging.basicConfig(
        filename=out / "node.log", level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    task = SyntheticTask(mb=a.mib * (1 << 20) / 1e6)  # exactly a.mib MiB
    layout = FlatLayout.from_shapes(task.layout(RUN_SEED))
    premerge, merged = out / "premerge.safetensors", out / "merged.safetensors"
    await trio.to_thread.run_sync(task.write_premerge, premerge, RUN_SEED, a.index)
    key_pair = create_new_key_pair()
    host = build_host(key_pair)
    # every node on 127.0.0.1, as the testnet: no IP diversity to ask for
    pubsub, router = build_pubsub(host, a.nodes, mesh_diversity_ips=1, ip_colocation_threshold=1024)
    cfg = MergeSection()
    traffic = Traffic()
    merge: MergeSession | None = None

    async def on_channel(peer, channel) -> None:  # type: ignore[no-untyped-def]
        if merge is not None:
            await merge.handle_channel(peer, channel)

    cpu_at_agreement = 0.0
    max_lag = 0.0  # the event loop's longest late wake-up (a blocked loop misses pings)

    async def watch_lag() -> None:
        nonlocal max_lag
        while True:
            t = trio.current_time()
            await trio.sleep(LAG_PERIOD_S)
            max_lag = max(max_lag, trio.current_time() - t - LAG_PERIOD_S)

    def on_phase(text: str) -> None:  # "merge agreed: ..." comes as the transfers begin
        nonlocal cpu_at_agreement
        if text.startswith("merge agreed"):
            cpu_at_agreement = tree_cpu_s(os.getpid())

    async def keep_connected(boot) -> None:  # type: ignore[no-untyped-def]
        """Redial peer 0 when the connection drops (py-libp2p cuts connections whose
        pings go unanswered, as on a machine loaded far past its cores): membership
        redials the others from heartbeats, but hears none with no connection at all."""
        while True:
            await trio.sleep(HEARTBEAT_S)  # a period, not synchronisation
            if not host.get_network().connections.get(boot.peer_id):
                with trio.move_on_after(HEARTBEAT_S):
                    try:
                        host.get_network().unblock_peer(boot.peer_id)
                        await host.connect(boot)
                    except Exception as e:  # libp2p raises assorted types; try again
                        logging.getLogger("bench").info("redial peer 0: %r", e)

    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with running_host(host, listen), background_trio_service(pubsub):
        async with background_trio_service(router):
            await pubsub.wait_until_ready()
            membership = Membership(host, pubsub, "bench-vs-hivemind", traffic)
            async with trio.open_nursery() as nursery:
                await nursery.start(membership.run)
                nursery.start_soon(watch_lag)
                fast = None
                if a.transport == "fast":
                    fast = FastPath(host, key_pair, on_channel, listen_host="127.0.0.1")
                    await nursery.start(fast.serve)
                _emit({"addr": f"{host.get_addrs()[0]}"})
                if a.bootstrap:
                    boot = info_from_p2p_addr(multiaddr.Multiaddr(a.bootstrap))
                    await host.connect(boot)
                    nursery.start_soon(keep_connected, boot)
                members = await start_barrier(membership, a.nodes, START_TIMEOUT_S, nursery)

                def session(attempt: int) -> MergeSession:
                    return MergeSession(
                        host,
                        membership,
                        "bench-vs-hivemind",
                        members,
                        layout,
                        shards=a.shards,
                        quorum=cfg.quorum,
                        window=cfg.window,
                        piece_elems=cfg.piece_elems,
                        timeout_s=cfg.timeout_s,
                        traffic=traffic,
                        seed=RUN_SEED,
                        exclude_outliers=cfg.exclude_outliers,
                        fastpath=fast,
                        preopen=True,
                        on_phase=on_phase,
                        attempt=attempt,
                    )

                merge = session(0)
                host.set_stream_handler(MERGE_PROTOCOL, merge.handle)
                membership.phase = "merge"
                sampler = TreeSampler(os.getpid())
                rss0, pss0 = sampler.start()
                if a.trace:
                    tracemalloc.start()
                traced0 = tracemalloc.get_traced_memory()[0] if a.trace else 0
                while True:  # as node.py: a member lost mid-merge costs an attempt
                    try:
                        outcome = await merge.run(premerge, merged)
                        break
                    except BaseException as e:
                        attempt = Node._next_merge_attempt(merge, leaf_error(e))
                        if attempt is None:
                            raise
                    merge.close()
                    merge = session(attempt)
                    host.set_stream_handler(MERGE_PROTOCOL, merge.handle)
                t_end = time.time()
                cpu_s = tree_cpu_s(os.getpid()) - cpu_at_agreement
                traced_peak = tracemalloc.get_traced_memory()[1] if a.trace else 0
                sampler.stop()
                membership.phase = "done"
                await membership.beat_now()
                await merge.wait_all_done(outcome.members)
                merge.close()
                nursery.cancel_scope.cancel()
        await close_host(host)
    transfer = sum(outcome.phase_seconds[k] for k in ("reduce_scatter", "all_gather", "verify"))
    _emit(
        {
            "peer_id": str(host.get_id()),
            "hash": outcome.hash,
            "members": outcome.members,
            "owned": outcome.owned,
            "phases": outcome.phase_seconds,
            "transfer_start": t_end - transfer,
            "end": t_end,
            "rss0": rss0,
            "pss0": pss0,
            "peak_rss": sampler.peak_rss,
            "peak_pss": sampler.peak_pss,
            "hwm": _status_kb(os.getpid(), "VmHWM:") << 10,
            "traced_added": traced_peak - traced0,
            "attempt": outcome.attempt,
            "agg_peak": outcome.aggregation_peak_bytes,
            "agg_bound": 4 * layout.numel / len(outcome.members) + 2 * outcome.window_bytes,
            "max_lag_s": max_lag,
            "cpu_s": cpu_s,
            "fast": {
                "opened": fast.stats.opened if fast else 0,
                "accepted": fast.stats.accepted if fast else 0,
                "fallbacks": fast.stats.fallbacks if fast else {},
            },
        }
    )


# -- one hivemind peer (the hivemind venv) -----------------------------------------------


def hivemind_input(i: int, numel: int):  # type: ignore[no-untyped-def]
    import numpy as np

    return np.random.default_rng([RUN_SEED, i]).standard_normal(numel, dtype=np.float32)


def hivemind_peer(a: argparse.Namespace) -> int:
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage
    from hivemind.compression import NoCompression

    out = Path(a.out)
    numel = (a.mib << 20) // 4
    tensor = torch.from_numpy(hivemind_input(a.index, numel))
    initial = [a.bootstrap] if a.bootstrap else []
    dht = hivemind.DHT(start=True, initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    _emit({"addr": str(dht.get_visible_maddrs()[0])})
    averager = hivemind.averaging.DecentralizedAverager(
        [tensor],
        dht,
        start=True,
        prefix="bench",
        target_group_size=a.nodes,
        min_group_size=a.nodes,
        min_matchmaking_time=HIVEMIND_MATCHMAKING_S,
        compression=NoCompression(),
    )
    # Every peer steps at once: a file barrier in the trial directory.
    (out / f"ready{a.index}").touch()
    deadline = time.time() + READY_TIMEOUT_S
    while len(list(out.parent.glob("hivemind*/ready*"))) < a.nodes and time.time() < deadline:
        time.sleep(0.05)
    t_match = time.time()
    control = averager.step(require_trigger=True, wait=False, timeout=HIVEMIND_GROUP_TIMEOUT_S)
    while control.stage != AveragingStage.AWAITING_TRIGGER:
        if control.done():  # failed to find a group: result() raises
            control.result()
        if time.time() - t_match > HIVEMIND_GROUP_TIMEOUT_S:
            raise SystemExit(f"hivemind peer {a.index}: no group in {HIVEMIND_GROUP_TIMEOUT_S} s")
        time.sleep(0.01)
    sampler = TreeSampler(os.getpid())
    rss0, pss0 = sampler.start()
    cpu0 = tree_cpu_s(os.getpid())
    t_trigger = time.time()
    control.allow_allreduce()
    control.result(timeout=TRIAL_TIMEOUT_S)
    t_done = time.time()
    cpu_s = tree_cpu_s(os.getpid()) - cpu0
    sampler.stop()
    with averager.get_tensors() as tensors:
        import numpy as np

        np.save(out / "result.npy", tensors[0].numpy())
    averager.shutdown()
    dht.shutdown()
    _emit(
        {
            "matchmaking_s": t_trigger - t_match,
            "cpu_s": cpu_s,
            "trigger": t_trigger,
            "end": t_done,
            "rss0": rss0,
            "pss0": pss0,
            "peak_rss": sampler.peak_rss,
            "peak_pss": sampler.peak_pss,
        }
    )
    return 0


# -- orchestration (fflnode's venv) ------------------------------------------------------


def _readline(proc: subprocess.Popen, timeout_s: float, what: str) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while True:  # the first JSON line (py-spy, when profiling, prints its own first)
        if not sel.select(max(0.0, deadline - time.monotonic())):
            raise RuntimeError(f"{what}: not ready within {timeout_s} s")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{what}: exited before it was ready (exit {proc.wait()})")
        if line.startswith("{"):
            return line


def _last_json(text: str) -> dict:
    lines = [x for x in text.strip().splitlines() if x.startswith("{")]
    return json.loads(lines[-1])


def _spawn_peers(python: str, role: str, a: argparse.Namespace, trial: Path, mib: int) -> list:
    """Start peer 0, then the others bootstrapped from it; returns their results."""
    here = os.path.abspath(__file__)
    procs: list[subprocess.Popen] = []
    boot = ""
    try:
        for i in range(NODES):
            d = trial / f"{role.split('-')[0]}{i}"
            d.mkdir(parents=True)
            cmd = [python, here, "--role", role, "--index", str(i), "--nodes", str(NODES),
                   "--mib", str(mib), "--out", str(d), "--transport", a.transport,
                   "--shards", str(a.shards)]  # fmt: skip
            if a.trace:
                cmd.append("--trace")
            if a.profile and role == "fflnode-peer":  # py-spy's collapsed stacks, per node
                spy = [a.py_spy, "record", "-r", "250"]
                cmd = [*spy, "-f", "raw", "-o", str(d / "profile.txt"), "--", *cmd]
            if i > 0:
                cmd += ["--bootstrap", boot]
            with open(d / "stderr.log", "w") as err:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True))
            ready = json.loads(_readline(procs[-1], READY_TIMEOUT_S, f"{role} {i}"))
            if i == 0:
                boot = ready["addr"]
        results = []
        for i, p in enumerate(procs):
            stdout, _ = p.communicate(timeout=TRIAL_TIMEOUT_S)
            if p.returncode != 0:
                err = (trial / f"{role.split('-')[0]}{i}" / "stderr.log").read_text()[-3000:]
                raise RuntimeError(f"{role} {i} failed (exit {p.returncode}):\n{err}")
            results.append(_last_json(stdout))
            (trial / f"{role.split('-')[0]}{i}" / "result.json").write_text(stdout)
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _exact_mean(inputs: list[tuple[bytes, object]]):  # type: ignore[no-untyped-def]
    """float32(sum of float64 in ascending peer-ID-byte order / N), plain torch."""
    import torch

    acc = None
    for _, x in sorted(inputs, key=lambda t: t[0]):
        x64 = x.to(torch.float64)  # type: ignore[attr-defined]
        acc = x64 if acc is None else acc.add_(x64)
        if acc is x64:
            acc = torch.zeros_like(x64).add_(x64)  # from +0.0, as the definition
    assert acc is not None
    return (acc / len(inputs)).to(torch.float32)


def _bit_equal_fraction(got, want) -> float:  # type: ignore[no-untyped-def]
    import torch

    same = got.contiguous().view(torch.int32) == want.contiguous().view(torch.int32)
    return float(same.sum()) / want.numel()


def _flat(path: Path):  # type: ignore[no-untyped-def]
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    names = sorted(tensors, key=lambda n: n.encode("utf-8"))
    return torch.cat([tensors[n].reshape(-1) for n in names])


def fflnode_trial(a: argparse.Namespace, trial: Path, mib: int) -> dict:
    from libp2p.peer.id import ID

    if a.fflnode == "testnet":
        return _testnet_trial(a, trial, mib)
    res = _spawn_peers(sys.executable, "fflnode-peer", a, trial, mib)
    if len({r["hash"] for r in res}) != 1:
        raise RuntimeError(f"fflnode: hashes differ: {[r['hash'][:12] for r in res]}")
    dirs = [trial / f"fflnode{i}" for i in range(NODES)]
    inputs = [(ID.from_base58(r["peer_id"]).to_bytes(), _flat(d / "premerge.safetensors"))
              for r, d in zip(res, dirs, strict=True)]  # fmt: skip
    want = _exact_mean(inputs)
    del inputs
    exact = min(_bit_equal_fraction(_flat(d / "merged.safetensors"), want) for d in dirs)
    return {
        "seconds": max(r["end"] for r in res) - min(r["transfer_start"] for r in res),
        "agree_s": max(r["phases"]["agree"] for r in res),
        "phases": {
            k: max(r["phases"][k] for r in res) for k in ("reduce_scatter", "all_gather", "verify")
        },  # fmt: skip
        "peak_rss": max(r["peak_rss"] for r in res),
        "added_rss": max(r["peak_rss"] - r["rss0"] for r in res),
        "peak_pss": max(r["peak_pss"] for r in res),
        "added_pss": max(r["peak_pss"] - r["pss0"] for r in res),
        "traced_added": max(r["traced_added"] for r in res),
        "cpu_s": max(r["cpu_s"] for r in res),
        "exact": exact,
        "hash_agreed": True,
        "fast": [r["fast"] for r in res],
        "owned": [len(r["owned"]) for r in res],
        "attempts": max(r["attempt"] for r in res) + 1,
        "agg_peak": max(r["agg_peak"] for r in res),
        "agg_bound": min(r["agg_bound"] for r in res),
        "max_lag_s": max(r["max_lag_s"] for r in res),
    }


def _testnet_trial(a: argparse.Namespace, trial: Path, mib: int) -> dict:
    out = trial / "testnet"
    cmd = [sys.executable, "-m", "fflnode", "testnet", "--task", "synthetic", "--nodes",
           str(NODES), "--synthetic-mb", str(mib * (1 << 20) / 1e6), "--shards", str(a.shards),
           "--out", str(out), "--quiet", "--no-plot"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TRIAL_TIMEOUT_S)
    report = json.loads((out / "report.json").read_text())
    if proc.returncode != 0 or not report["merge"]["hashes_agree"]:
        raise RuntimeError(f"testnet failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    from libp2p.peer.id import ID

    nodes = report["nodes"]
    inputs = [(ID.from_base58(n["peer_id"]).to_bytes(), _flat(out / k / "premerge.safetensors"))
              for k, n in nodes.items()]  # fmt: skip
    want = _exact_mean(inputs)
    del inputs
    exact = min(_bit_equal_fraction(_flat(out / k / "merged.safetensors"), want) for k in nodes)
    transfer = [sum(n["merge"]["phases"][k] for k in ("reduce_scatter", "all_gather", "verify"))
                for n in nodes.values()]  # fmt: skip
    return {
        "seconds": max(transfer),  # no wall-clock stamps in the report: the slowest node
        "agree_s": max(n["merge"]["phases"]["agree"] for n in nodes.values()),
        "phases": {
            k: max(n["merge"]["phases"][k] for n in nodes.values())
            for k in ("reduce_scatter", "all_gather", "verify")
        },  # fmt: skip
        "peak_rss": max(n["peak_rss_mb"] for n in nodes.values()) * 2**20,
        "added_rss": float("nan"),
        "peak_pss": float("nan"),
        "added_pss": float("nan"),
        "traced_added": 0,
        "cpu_s": float("nan"),
        "exact": exact,
        "hash_agreed": True,
        "fast": [],
        "owned": [len(n["merge"]["owned"]) for n in nodes.values()],
    }


def hivemind_trial(a: argparse.Namespace, trial: Path, mib: int) -> dict:
    import numpy as np
    import torch

    res = _spawn_peers(a.hivemind_python, "hivemind-peer", a, trial, mib)
    numel = (mib << 20) // 4
    inputs = [(bytes([i]), torch.from_numpy(hivemind_input(i, numel))) for i in range(NODES)]
    want = _exact_mean(inputs)  # the order does not change an exact mean of 4 normals
    del inputs
    fractions = [
        _bit_equal_fraction(torch.from_numpy(np.load(trial / f"hivemind{i}" / "result.npy")), want)
        for i in range(NODES)
    ]
    return {
        "seconds": max(r["end"] for r in res) - min(r["trigger"] for r in res),
        "matchmaking_s": max(r["matchmaking_s"] for r in res),
        "peak_rss": max(r["peak_rss"] for r in res),
        "added_rss": max(r["peak_rss"] - r["rss0"] for r in res),
        "peak_pss": max(r["peak_pss"] for r in res),
        "added_pss": max(r["peak_pss"] - r["pss0"] for r in res),
        "cpu_s": max(r["cpu_s"] for r in res),
        "exact": min(fractions),
    }


def _mib(x: float) -> str:
    return "n/a" if x != x else f"{x / 2**20:.0f}"


def _spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def report(sizes: list[int], runs: dict, a: argparse.Namespace) -> None:
    med = statistics.median
    print(
        f"\n{NODES} peers on 127.0.0.1, float32, medians of {a.repeats} interleaved repeats "
        f"(min-max); memory in MiB per peer\n"
    )
    print("| size | system | time s | agree / matchmaking s | peak RSS | added RSS | peak PSS "
          "| added PSS | exact |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for mib in sizes:
        for system in a.systems:
            rs = runs[(system, mib)]
            if not rs:
                continue
            extra = "agree_s" if system == "fflnode" else "matchmaking_s"
            exact = min(r["exact"] for r in rs)
            agreed = " hash-agreed" if all(r.get("hash_agreed") for r in rs) else ""
            mem = [_mib(med(r[k] for r in rs)) for k in ("peak_rss", "added_rss", "peak_pss")]
            mem.append(_mib(med(r["added_pss"] for r in rs)))
            print(
                f"| {mib} MiB | {system} | {_spread([r['seconds'] for r in rs])} "
                f"| {med(r[extra] for r in rs):.2f} | {' | '.join(mem)} | {exact:.4f}{agreed} |"
            )
    if "fflnode" in a.systems:
        print("\nfflnode phases (max over nodes, medians): ", end="")
        for mib in sizes:
            rs = runs[("fflnode", mib)]
            if rs:
                ph = {k: med(r["phases"][k] for r in rs) for k in rs[0]["phases"]}
                print(f"{mib} MiB " + " ".join(f"{k} {v:.2f}" for k, v in ph.items()), end="; ")
        print()
    if "fflnode" in a.systems:
        print()
        for mib in sizes:
            rs = [r for r in runs[("fflnode", mib)] if "agg_peak" in r]
            if rs:
                peak, bound = max(r["agg_peak"] for r in rs), min(r["agg_bound"] for r in rs)
                print(
                    f"{mib} MiB: fflnode aggregation memory, tracked peak over nodes and repeats "
                    f"{_mib(peak)} MiB <= |theta|/N + 2 windows = {_mib(bound)} MiB: "
                    f"{'yes' if peak <= bound else 'NO'}"
                )
    if a.systems == ["fflnode", "hivemind"]:
        print()
        for mib in sizes:
            f, h = runs[("fflnode", mib)], runs[("hivemind", mib)]
            if f and h:
                ratio = med(r["seconds"] for r in f) / med(r["seconds"] for r in h)
                print(f"{mib} MiB: fflnode / hivemind time = {ratio:.2f} (medians)")
    if a.trace:
        for mib in sizes:
            rs = runs[("fflnode", mib)]
            if rs:
                t = med(r["traced_added"] for r in rs)
                print(f"{mib} MiB: fflnode tracemalloc peak added during the merge {_mib(t)} MiB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=("fflnode-peer", "hivemind-peer"), help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--nodes", type=int, default=NODES, help=argparse.SUPPRESS)
    p.add_argument("--mib", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="16,64,256", help="MiB of float32, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hivemind-python", help="a python with hivemind 1.1.12 (see above)")
    p.add_argument("--systems", default="fflnode,hivemind", help="which to run")
    p.add_argument(
        "--fflnode", choices=("peer", "testnet"), default="peer",
        help="peer: merge-only node processes with FastPath; testnet: as node.py wires it",
    )  # fmt: skip
    p.add_argument(
        "--transport", choices=("fast", "libp2p"), default="fast",
        help="fflnode peers: FastPath channels, or libp2p streams only",
    )  # fmt: skip
    p.add_argument("--shards", type=int, default=0, help="fflnode merge.shards (0: one per node)")
    p.add_argument(
        "--trace", action="store_true",
        help="fflnode: tracemalloc during the merge (slower: not for timing)",
    )  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the trial directories")
    p.add_argument(
        "--profile", action="store_true",
        help="fflnode: run each node under py-spy (pip install py-spy); implies --keep",
    )  # fmt: skip
    p.add_argument(
        "--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
        help="the py-spy executable for --profile (default: on PATH, else beside python)",
    )  # fmt: skip
    a = p.parse_args(argv)
    a.keep = a.keep or a.profile
    if a.role == "fflnode-peer":
        return fflnode_peer(a)
    if a.role == "hivemind-peer":
        return hivemind_peer(a)
    sizes = [int(x) for x in a.sizes.split(",")]
    a.systems = [s for s in ("fflnode", "hivemind") if s in a.systems.split(",")]
    if "hivemind" in a.systems and not a.hivemind_python:
        print("no --hivemind-python: running fflnode only", file=sys.stderr)
        a.systems.remove("hivemind")
    runs: dict = {(s, m): [] for s in a.systems for m in sizes}
    failed = {(s, m): 0 for s in a.systems for m in sizes}  # trials that did not complete
    base = Path(tempfile.mkdtemp(prefix="bench-vs-hivemind-", dir="."))
    try:
        for r in range(a.repeats):
            for mib in sizes:
                order = a.systems if r % 2 == 0 else a.systems[::-1]
                for system in order:
                    trial = base / f"r{r}-{mib}-{system}"
                    run = fflnode_trial if system == "fflnode" else hivemind_trial
                    try:
                        res = run(a, trial, mib)
                    except Exception as e:  # counted and shown, not dropped silently
                        a.keep = True  # the failed trial's logs stay for a look
                        failed[(system, mib)] += 1
                        print(
                            f"repeat {r + 1}/{a.repeats} {mib} MiB {system}: FAILED "
                            f"({str(e).strip().splitlines()[-1][:200]}); files in {trial}",
                            file=sys.stderr,
                            flush=True,
                        )
                        continue
                    runs[(system, mib)].append(res)
                    print(
                        f"repeat {r + 1}/{a.repeats} {mib} MiB {system}: {res['seconds']:.2f} s, "
                        f"CPU {res['cpu_s']:.2f} s/peer, peak RSS {_mib(res['peak_rss'])} MiB, "
                        f"exact {res['exact']:.4f}"
                        + (f", {res['attempts']} attempts" if res.get("attempts", 1) > 1 else "")
                        + (f", loop lag {res['max_lag_s']:.2f} s" if "max_lag_s" in res else "")
                        + (
                            f", aggregation peak {_mib(res['agg_peak'])} MiB"
                            if "agg_peak" in res
                            else ""
                        ),
                        file=sys.stderr,
                        flush=True,
                    )
                    if not a.keep:
                        subprocess.run(["rm", "-rf", str(trial)], check=True)
        report(sizes, runs, a)
        for (system, mib), n in failed.items():
            if n:
                print(f"{mib} MiB {system}: {n} of {a.repeats} trials FAILED (not in the table)")
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        if not a.keep:
            subprocess.run(["rm", "-rf", str(base)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
