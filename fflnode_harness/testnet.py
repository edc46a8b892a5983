"""`fflnode testnet`: N real node processes on 127.0.0.1, trained, merged and checked.

The testnet is a supervisor, not a participant. It writes one config per node, starts
`fflnode run` processes (node 0 first; the others bootstrap from its address), and acts
as their systemd: each node gets its own NOTIFY_SOCKET, so the testnet learns from
READY=1 when a node listens and from STATUS= how far it got (that is the progress it
prints). Meanwhile it trains the centralized baseline. When the nodes exit it checks the
merge independently of the network path: it loads every premerge file with the
`safetensors` package, computes the canonical mean and its hash with plain torch and
hashlib, and compares every node's merged file and hash with it. Exit code 0 only when
every node exited 0 and every merged file equals that reference bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import trio

from fflnode import config as cfgmod
from fflnode.errors import ConfigError

NOTIFY_TIMEOUT_S = 120.0  # a node that has not said READY by then is broken
# Whole-run deadline: the bar is 5 minutes for the default 4-node run; a
# larger or slower run gets proportionally more before the testnet gives up.
RUN_DEADLINE_S = 900.0
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this (the daemon promises 5 s)
SUMMARY_RULE = "-" * 78


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4, help="number of node processes (4)")
    p.add_argument("--rounds", type=int, default=600, help="training rounds (600)")
    p.add_argument("--local-steps", type=int, default=1, help="inner steps per round (1)")
    p.add_argument("--out", default="testnet-out", help="output directory (testnet-out)")
    p.add_argument("--seed", type=int, default=1, help="run seed (1)")
    p.add_argument("--topology", default="complete", choices=["ring", "random-regular", "complete"])
    p.add_argument("--degree", type=int, default=2, help="random-regular degree (2)")
    p.add_argument("--codec", default="none", help="exchange codec (none)")
    p.add_argument("--bits", type=int, default=1, help="holo codec bits per coordinate")
    p.add_argument("--ratio", type=float, default=0.03, help="topk/sketch kept fraction")
    p.add_argument("--gamma", type=float, default=1.0, help="gossip consensus step (1.0)")
    p.add_argument("--eval-every", type=int, default=30, help="rounds between evaluations")
    p.add_argument(
        "--task",
        default="digits",
        help="built-in task (digits, synthetic, text, mqar) or your own, "
        "'path/to/file.py:attr' or 'module:attr' (docs/tasks.md)",
    )
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the task ([task] table), e.g. alpha=5 (TOML value)",
    )
    p.add_argument("--synthetic-mb", type=float, help="synthetic task: model size (task mb)")
    p.add_argument("--shards", type=int, default=0, help="merge shards M (0 = nodes)")
    p.add_argument("--no-baseline", action="store_true", help="skip the centralized run")
    p.add_argument(
        "--kill",
        action="append",
        default=[],
        metavar="NODE@ROUND",
        help="SIGKILL a node at a round, then restart it on its data dir",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="NODE@ROUND",
        help="SIGSTOP a node at a round and leave it frozen",
    )
    p.add_argument(
        "--restart-after", type=float, default=3.0, help="seconds a killed node stays down (3)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any node config key for every node, e.g. train.outer_lr=0.7 (TOML value)",
    )
    p.add_argument(
        "--corrupt",
        type=int,
        default=0,
        metavar="K",
        help="the last K nodes send corrupted updates and premerge weights (see --corrupt-mode)",
    )
    p.add_argument(
        "--corrupt-mode",
        default="signflip",
        choices=["signflip", "nan", "random"],
        help="signflip: -10 x the update; nan: NaNs; random: noise 10 x the update's scale",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=RUN_DEADLINE_S,
        help=f"whole-run deadline in seconds ({RUN_DEADLINE_S:.0f})",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the accuracy plot")
    p.add_argument("--quiet", action="store_true", help="print only the summary")


def node_config(args: argparse.Namespace, i: int, out: Path, bootstrap: list[str]) -> cfgmod.Config:
    doc: dict[str, Any] = {
        "node": {
            "data_dir": str(out / f"node{i}"),
            "listen": ["/ip4/127.0.0.1/tcp/0"],
            "bootstrap": bootstrap,
            "log_level": "info",
        },
        "run": {
            "run_id": f"testnet-{args.seed}",
            "seed": args.seed,
            "nodes": args.nodes,
            "rounds": 0 if args.task == "synthetic" else args.rounds,
            "topology": args.topology,
            "degree": args.degree,
        },
        "train": {
            "task": task_spec(args.task),
            "partition_index": i,
            "local_steps": args.local_steps,
            "eval_every": args.eval_every,
        },
        "task": task_options(args),
        "exchange": {
            "codec": args.codec,
            "bits": args.bits,
            "ratio": args.ratio,
            "gamma": args.gamma,
        },
        "merge": {"shards": args.shards},
        # every node on 127.0.0.1: no IP diversity to ask for, every peer colocated
        "pubsub": {"mesh_diversity_ips": 1, "ip_colocation_threshold": 1024},
    }
    if i >= args.nodes - args.corrupt:
        doc["adversary"] = {"mode": args.corrupt_mode}
    for key, value in parse_overrides(args.set).items():
        section, _, name = key.partition(".")
        doc.setdefault(section, {})[name] = value
    return cfgmod.from_dict(doc, f"testnet node{i}")


def task_spec(spec: str) -> str:
    """A task spec as the nodes must see it: a file path made absolute (the node configs
    live in other directories)."""
    where, colon, attr = spec.rpartition(":")
    if colon and where.endswith(".py"):
        return f"{Path(where).resolve()}:{attr}"
    return spec


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {k: v for k, v in parse_values(args.task_option, "--task-option").items()}
    if args.synthetic_mb is not None:
        options["mb"] = args.synthetic_mb
    return options


def parse_values(items: list[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs; a value is read as TOML, else taken as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set section.key=value` pairs; a value is read as TOML, else taken as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or key.count(".") != 1:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


@dataclasses.dataclass
class NodeProc:
    index: int
    data_dir: Path
    notify_path: str
    ready: trio.Event = dataclasses.field(default_factory=trio.Event)
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    status: str = "starting"
    round: int = 0
    process: trio.Process | None = None
    exit_code: int | None = None
    kill_at: int | None = None  # SIGKILL at this round, then restart on the same data dir
    stop_at: int | None = None  # SIGSTOP at this round, left frozen
    killed: bool = False
    stopped: bool = False
    restarts: int = 0

    @property
    def lost_in_merge(self) -> bool:
        """Killed during the final merge and left down: it cannot finish."""
        return self.killed and self.kill_at in MERGE_FAULTS.values()

    @property
    def name(self) -> str:
        return f"node{self.index}"


# Faults planned for the final merge instead of a round. Each fires at a point whose
# consequence is fixed, whatever the interleaving of the nodes:
# * "I@merge": once every node still running (the victim included) has reported that
#   the members agreed, so the agreement includes the victim: the attempt in progress
#   fails and the others agree again without it (attempt 1).
# * "I@merge-start": as the victim enters the merge, before it has proposed anything:
#   nobody can have agreed with it, so the others agree without it at attempt 0.
# (Killing the victim on its own "merge agreed" was neither: it may commit alone and die
# before its commit reaches anyone.)
AT_MERGE, AT_MERGE_START = -1, -2
MERGE_FAULTS = {"merge": AT_MERGE, "merge-start": AT_MERGE_START}


def parse_faults(specs: list[str], what: str, nodes: int) -> dict[int, int]:
    """--kill / --stop values "I@R", "I@merge" or "I@merge-start" -> {node: round or
    AT_MERGE / AT_MERGE_START}."""
    out = {}
    for spec in specs:
        node, _, rnd = spec.partition("@")
        if not (node.isdigit() and (rnd.isdigit() or rnd in MERGE_FAULTS) and int(node) < nodes):
            raise SystemExit(
                f"fflnode: --{what} {spec!r}: expected NODE@ROUND, NODE@merge or "
                f"NODE@merge-start, NODE < {nodes}"
            )
        out[int(node)] = MERGE_FAULTS[rnd] if rnd in MERGE_FAULTS else int(rnd)
    return out


class Testnet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.sock_dir = Path(tempfile.mkdtemp(prefix="ffl-notify-"))  # short AF_UNIX paths
        self.procs = [
            NodeProc(i, self.out / f"node{i}", str(self.sock_dir / f"n{i}.sock"))
            for i in range(args.nodes)
        ]
        for i, r in parse_faults(args.kill, "kill", args.nodes).items():
            self.procs[i].kill_at = r
        for i, r in parse_faults(args.stop, "stop", args.nodes).items():
            self.procs[i].stop_at = r
        self.baseline: dict[str, Any] | None = None
        self.bootstrap: list[str] = []

    def say(self, text: str) -> None:
        if not self.args.quiet:
            print(text, flush=True)

    async def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True)
        self.timed_out = False
        try:
            with trio.move_on_after(self.args.deadline) as deadline:
                async with trio.open_nursery() as nursery:
                    if not self.args.no_baseline and self.args.task != "synthetic":
                        nursery.start_soon(self._baseline)
                    await self._launch(nursery, self.procs[0], [])
                    self.bootstrap = self._addrs(self.procs[0])[:1]
                    async with trio.open_nursery() as launching:  # the rest start together
                        for proc in self.procs[1:]:
                            launching.start_soon(self._launch, nursery, proc, self.bootstrap)
                    if len(self.procs) > 1:  # a second bootstrap peer, should node 0 die
                        self.bootstrap += self._addrs(self.procs[1])[:1]
                    nursery.start_soon(self._end_frozen)
            if deadline.cancelled_caught:
                self.timed_out = True
                self.say(f"  testnet: not done within {self.args.deadline:.0f} s; nodes stopped")
        finally:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
        wall = time.perf_counter() - t0
        return self._report(wall)

    @staticmethod
    def _addrs(proc: NodeProc) -> list[str]:
        return json.loads((proc.data_dir / "node.json").read_text())["addrs"]

    async def _launch(self, nursery: trio.Nursery, proc: NodeProc, bootstrap: list[str]) -> None:
        cfg = node_config(self.args, proc.index, self.out, bootstrap)
        proc.data_dir.mkdir(parents=True, exist_ok=True)
        conf_path = proc.data_dir / "node.toml"
        conf_path.write_text(cfgmod.to_toml(cfg))
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await sock.bind(proc.notify_path)
        nursery.start_soon(self._listen, proc, sock)
        nursery.start_soon(self._supervise, proc, conf_path)
        with trio.fail_after(NOTIFY_TIMEOUT_S):
            await proc.ready.wait()

    async def _listen(self, proc: NodeProc, sock: trio.socket.SocketType) -> None:
        with sock:
            while not proc.done.is_set():
                data = await sock.recv(4096)
                fields = dict(
                    line.split("=", 1)
                    for line in data.decode("utf-8", "replace").splitlines()
                    if "=" in line
                )
                if "STATUS" in fields and fields["STATUS"] != proc.status:
                    proc.status = fields["STATUS"]
                    # Every round reports; print the evaluated ones and phase changes.
                    if not proc.status.startswith("round ") or " | " in proc.status:
                        self.say(f"  {proc.name:>6}: {proc.status}")
                    if proc.status.startswith("round "):
                        proc.round = int(proc.status.split()[1].split("/")[0])
                    for each in self.procs:  # a merge fault may wait on the others' status
                        self._inject_faults(each)
                if fields.get("READY") == "1":
                    proc.ready.set()

    def _inject_faults(self, proc: NodeProc) -> None:
        """Kill or freeze a node when the point its fault is planned for is reached."""
        if proc.process is None or proc.process.returncode is not None:
            return
        running = [p for p in self.procs if p.process is not None and not p.done.is_set()]
        running = [p for p in running if not (p.killed or p.stopped)]
        agreed = all(p.status.startswith("merge agreed") for p in running)
        merging = proc.status.startswith("merg")

        def due(at: int | None) -> bool:
            if at == AT_MERGE:
                return agreed and proc in running
            if at == AT_MERGE_START:
                return merging
            return at is not None and proc.round >= at

        if due(proc.kill_at) and not proc.killed:
            proc.killed = True
            proc.process.kill()  # SIGKILL: no chance to clean up, as a crash
            when = "in the merge (stays down)" if merging else f"at round {proc.round}"
            after = "" if merging else " (restart follows)"
            self.say(f"  {proc.name:>6}: SIGKILL {when}{after}")
        if due(proc.stop_at) and not proc.stopped:
            proc.stopped = True
            proc.process.send_signal(signal.SIGSTOP)  # frozen: connections stay open
            when = "in the merge" if merging else f"at round {proc.round}"
            self.say(f"  {proc.name:>6}: SIGSTOP {when} (left frozen)")

    async def _supervise(self, proc: NodeProc, conf_path: Path) -> None:
        env = dict(os.environ, NOTIFY_SOCKET=proc.notify_path, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "fflnode", "run", "--config", str(conf_path)]
        while True:
            with open(proc.data_dir / "node.log", "ab") as logf:
                proc.process = await trio.lowlevel.open_process(
                    cmd, env=env, stdout=logf, stderr=logf
                )
                try:
                    await proc.process.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        await terminate_then_kill(proc.process)
            proc.exit_code = proc.process.returncode
            self.say(f"  {proc.name:>6}: exited with code {proc.exit_code}")
            if proc.killed and proc.restarts == 0 and proc.kill_at not in MERGE_FAULTS.values():
                # the planned crash: start it again (a node killed in the merge stays down:
                # the merge completes without it, and there is nothing left to rejoin)
                proc.restarts += 1
                await trio.sleep(self.args.restart_after)  # the outage being simulated
                cfg = node_config(self.args, proc.index, self.out, self.bootstrap)
                conf_path.write_text(cfgmod.to_toml(cfg))
                self.say(f"  {proc.name:>6}: restarting on its data dir")
                continue
            break
        proc.ready.set()  # a node that died before READY must not hang the launcher
        proc.done.set()
        with trio.CancelScope(shield=True):  # wake our notify listener
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                s.sendto(b"EXIT=1", proc.notify_path)
                s.close()
            except OSError:
                pass

    async def _end_frozen(self) -> None:
        """Once every node not frozen has finished, end the frozen ones."""
        for proc in self.procs:
            if proc.stop_at is None:
                await proc.done.wait()
        for proc in self.procs:
            if proc.stopped and proc.process is not None and proc.process.returncode is None:
                proc.process.kill()

    async def _baseline(self) -> None:
        import torch

        from fflnode.train.task import load_task
        from fflnode.train.trainer import settings_from, train_centralized

        a = self.args
        steps = a.nodes * a.rounds * a.local_steps
        # The nodes' own task and training settings: same model, data, schedule.
        cfg = node_config(a, 0, self.out, [])
        loaded = load_task(cfg.train.task, cfg.task, Path.cwd())
        settings = settings_from(cfg.train, a.seed, a.rounds)
        t0 = time.perf_counter()
        torch.set_num_threads(1)  # one core for the baseline, like each node
        metrics, _ = await trio.to_thread.run_sync(train_centralized, loaded, settings, steps)
        self.baseline = {"metrics": metrics, "steps": steps, "seconds": time.perf_counter() - t0}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.say(f"  baseline: centralized {shown} after {steps} steps")

    # ------------------------------------------------------------------ checking
    def _report(self, wall: float) -> dict[str, Any]:
        nodes: dict[str, Any] = {}
        for proc in self.procs:
            path = proc.data_dir / "result.json"
            result = json.loads(path.read_text()) if path.exists() else {}
            nodes[proc.name] = {
                **result,
                "exit_code": proc.exit_code,
                "killed_and_restarted": proc.killed and not proc.lost_in_merge,
                "frozen": proc.stopped,
                "killed_in_merge": proc.lost_in_merge,
            }
        merged = [r["merge"] for r in nodes.values() if r.get("merge")]
        participants = merged[0]["members"] if merged else []
        by_peer = {
            r.get("peer_id"): proc for proc, r in zip(self.procs, nodes.values(), strict=True)
        }
        members = [by_peer[p] for p in participants if p in by_peer]
        ref = reference_merge(
            [p.data_dir / "premerge.safetensors" for p in members],
            [nodes[p.name] for p in members],
            node_config(self.args, 0, self.out, []),
        )
        # Why the merge's members left agreed peers out (fingerprint outliers), by peer.
        outliers: dict[str, str] = {}
        for m in merged:
            outliers.update(m.get("excluded") or {})
        named = {r.get("peer_id"): name for name, r in nodes.items()}
        # Frozen nodes and nodes killed in the merge cannot finish; corrupt nodes (--corrupt)
        # may be banned or excluded as outliers: the checks below hold the honest ones.
        first_corrupt = self.args.nodes - self.args.corrupt
        expected = [
            p
            for p in self.procs
            if not p.stopped
            and not p.lost_in_merge
            and p.index < first_corrupt
            and nodes[p.name].get("peer_id") not in outliers
        ]
        hashes = {p.name: nodes[p.name].get("merged_hash") for p in expected}
        files_equal = {
            p.name: merged_equals(p.data_dir / "merged.safetensors", ref["tensors"])
            for p in expected
        }
        merge = {
            "hashes_agree": bool(ref["hash"]) and all(h == ref["hash"] for h in hashes.values()),
            "files_equal_reference": all(files_equal.values()),
            "reference_hash": ref["hash"],
            "merged_metrics": ref["metrics"],
            # max over the members of ||theta_i - theta_mean|| / ||theta_mean||, before
            # the merge: 0 when the nodes were already identical (the merge changes nothing)
            "consensus_distance": ref["consensus_distance"],
            "shards": merged[0]["shards"] if merged else None,
            "participants": participants,
            "excluded": [p.name for p in self.procs if p not in members],
            "outliers": {named.get(peer, peer): why for peer, why in outliers.items()},
            "seconds": max((m["seconds"] for m in merged), default=None),
            "attempt": max((m.get("attempt", 0) for m in merged), default=None),
        }
        ok = (
            not self.timed_out
            and merge["hashes_agree"]
            and merge["files_equal_reference"]
            and all(p.exit_code == 0 for p in expected)
            and sorted(participants) == sorted(nodes[p.name]["peer_id"] for p in expected)
        )
        return {
            "ok": ok,
            "config": {
                k: getattr(self.args, k)
                for k in (
                    "nodes",
                    "rounds",
                    "local_steps",
                    "seed",
                    "topology",
                    "codec",
                    "bits",
                    "task",
                    "task_option",
                    "shards",
                    "corrupt",
                    "corrupt_mode",
                    "set",
                )
            },
            "nodes": nodes,
            "merge": merge,
            "centralized": self.baseline,
            "wall_seconds": wall,
        }


async def terminate_then_kill(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE_S; returns once the process is reaped."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_GRACE_S):
        await process.wait()
        return
    process.kill()
    await process.wait()


def reference_merge(premerge: list[Path], nodes: list[dict[str, Any]], cfg: Any) -> dict[str, Any]:
    """The canonical mean of the premerge files with plain torch, and its hash.

    Deliberately independent of fflnode's merge code: safetensors' loader, float64 sums
    in ascending peer-ID-byte order, sha256 over (name, 0, little-endian bytes). Also the
    consensus distance before the merge (max over members of ||theta_i - mean|| / ||mean||)
    and the task's metrics on the mean.
    """
    import torch
    from libp2p.peer.id import ID
    from safetensors.torch import load_file

    empty = {"hash": None, "tensors": None, "metrics": None, "consensus_distance": None}
    members = []
    if not premerge:
        return empty
    for path, result in zip(premerge, nodes, strict=True):
        if not path.exists() or not result.get("peer_id"):
            return empty
        members.append((ID.from_base58(result["peer_id"]).to_bytes(), load_file(str(path))))
    members.sort(key=lambda m: m[0])
    names = sorted(members[0][1], key=lambda n: n.encode("utf-8"))
    merged: dict[str, torch.Tensor] = {}
    h = hashlib.sha256()
    for name in names:
        acc = torch.zeros_like(members[0][1][name], dtype=torch.float64)
        for _, tensors in members:
            acc += tensors[name].to(torch.float64)
        merged[name] = (acc / len(members)).to(torch.float32)
        h.update(name.encode("utf-8") + b"\x00")
        h.update(merged[name].contiguous().view(torch.uint8).numpy().tobytes())
    norm = sum(float(merged[n].double().pow(2).sum()) for n in names) ** 0.5
    distance = max(
        sum(float((t[n].double() - merged[n].double()).pow(2).sum()) for n in names) ** 0.5
        / (norm or 1.0)
        for _, t in members
    )
    return {
        "hash": h.hexdigest(),
        "tensors": merged,
        "metrics": _metrics_of(merged, nodes, cfg),
        "consensus_distance": distance,
    }


def _metrics_of(tensors: dict[str, Any], nodes: list[dict[str, Any]], cfg: Any) -> dict | None:
    """The task's metrics on the reference merged weights (training tasks only)."""
    if not any(r.get("metrics_before_merge") for r in nodes):
        return None
    import torch

    from fflnode.train.task import build_model, load_task

    loaded = load_task(cfg.train.task, cfg.task, Path.cwd())
    model = build_model(loaded, cfg.run.seed)
    with torch.no_grad():
        for name, value in tensors.items():  # each federated tensor once (ties included)
            try:
                target = model.get_parameter(name)
            except AttributeError:
                target = model.get_buffer(name)
            target.copy_(value.view_as(target))
        return {k: float(v) for k, v in loaded.task.evaluate(model).items()}


def merged_equals(path: Path, reference: dict[str, Any] | None) -> bool:
    import torch
    from safetensors.torch import load_file

    if reference is None or not path.exists():
        return False
    got = load_file(str(path))
    return set(got) == set(reference) and all(torch.equal(got[k], reference[k]) for k in got)


def primary_of(report: dict[str, Any]) -> str | None:
    """The headline metric, as the nodes report it (the task's choice or its first)."""
    for r in report["nodes"].values():
        if r.get("primary_metric"):
            return r["primary_metric"]
    return None


def ordered(metrics: dict[str, float], primary: str | None) -> list[tuple[str, float]]:
    """The headline metric first, then the rest by name."""
    return sorted(metrics.items(), key=lambda kv: (kv[0] != primary, kv[0]))


def fmt_metric(name: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if "accuracy" in name else f"{v:.4g}"


def compare(name: str, merged: float, central: float) -> str:
    from fflnode.train.task import higher_is_better

    if "accuracy" in name:
        return f"merged - centralized = {100 * (merged - central):+.1f} pts"
    rel = (merged - central) / abs(central) if central else float("inf")
    better = "better" if (merged > central) == higher_is_better(name) else "worse"
    return f"merged {abs(100 * rel):.1f} % {better} than centralized"


def print_summary(report: dict[str, Any]) -> None:
    c = report["config"]
    primary = primary_of(report)
    print(SUMMARY_RULE)
    print(
        f"fflnode testnet: {c['nodes']} nodes, {c['rounds']} rounds x {c['local_steps']} "
        f"steps, {c['topology']} topology, codec {c['codec']}, task {c['task']}"
    )
    extras = [f"--set {kv}" for kv in c.get("set") or []]
    extras += [f"--task-option {kv}" for kv in c.get("task_option") or []]
    if c.get("corrupt"):
        extras.insert(0, f"{c['corrupt']} corrupt node(s) ({c['corrupt_mode']})")
    if extras:
        print("  " + ", ".join(extras))
    print(SUMMARY_RULE)
    print(f"{primary or 'metric'} before and after the merge, per node:")
    print(
        f"{'node':<7}{'peer':<14}{'pre-merge':>12}{'merged':>12}{'distance':>10}"
        f"{'sent MB':>9}{'recv MB':>9}{'rss MB':>7}{'exit':>5}"
    )
    for name, r in report["nodes"].items():
        peer = (r.get("peer_id") or "?")[-12:]
        before = (r.get("metrics_before_merge") or {}).get(primary or "")
        after = (r.get("merged_metrics") or {}).get(primary or "")
        dist = r.get("consensus_distance")
        print(
            f"{name:<7}{peer:<14}{fmt_metric(primary or '', before):>12}"
            f"{fmt_metric(primary or '', after):>12}"
            f"{'-' if dist is None else f'{dist:.4f}':>10}"
            f"{r.get('bytes_sent', 0) / 1e6:>9.2f}{r.get('bytes_received', 0) / 1e6:>9.2f}"
            f"{r.get('peak_rss_mb', 0):>7.0f}{str(r.get('exit_code')):>5}"
        )
        if r.get("killed_in_merge"):
            print("       SIGKILLed during the final merge and left down")
        elif r.get("killed_and_restarted"):
            jumps = r.get("catch_up_jumps") or []
            print(
                f"       SIGKILLed, restarted: resumed from its checkpoint after round "
                f"{r.get('resumed_from_round')}, caught up {jumps}"
            )
        if r.get("frozen"):
            print("       SIGSTOPped and left frozen: excluded from the merge, killed at the end")
        if r.get("error"):
            print(f"       error: {r['error']}")
    m = report["merge"]
    print(SUMMARY_RULE)
    if m.get("excluded"):
        print(f"excluded from merge  {', '.join(m['excluded'])}")
    for name, why in (m.get("outliers") or {}).items():
        print(f"  {name}: {why}")
    merge_line = (
        f"({len(m['participants'])} participants, {m['shards']} shards, "
        f"merge {m['seconds'] or 0:.1f} s"
        + (f", attempt {m['attempt'] + 1}" if m.get("attempt") else "")
        + ")"
    )
    merged_metrics = m.get("merged_metrics") or {}
    shown = ", ".join(f"{k} {fmt_metric(k, v)}" for k, v in ordered(merged_metrics, primary)) or "-"
    print(f"merged               {shown}  {merge_line}")
    if m.get("consensus_distance") is not None:
        d = m["consensus_distance"]
        note = "nodes were identical: the merge changed nothing" if d == 0 else "before the merge"
        print(f"consensus distance   {d:.4g}  (max ||theta_i - mean|| / ||mean||; {note})")
    cen = report.get("centralized")
    if cen:
        shown = ", ".join(f"{k} {fmt_metric(k, v)}" for k, v in ordered(cen["metrics"], primary))
        gap = ""
        if primary and primary in merged_metrics and primary in cen["metrics"]:
            gap = f"  ({compare(primary, merged_metrics[primary], cen['metrics'][primary])})"
        print(f"centralized          {shown}  ({cen['steps']} steps){gap}")
    total = sum(r.get("bytes_sent", 0) for r in report["nodes"].values())
    print(f"bytes moved          {total / 1e6:.2f} MB sent in total")
    verdict = "hashes agree" if m["hashes_agree"] else "HASHES DISAGREE"
    print(f"{verdict} with the reference {m['reference_hash']}")
    print(f"merged files equal the reference: {m['files_equal_reference']}")
    print(
        f"wall time {report['wall_seconds']:.1f} s; report.json and metrics.png in the output dir"
    )
    print(SUMMARY_RULE)


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per metric: each node's evaluations by round, the merged and
    centralized levels as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    for r in report["nodes"].values():
        for x in r.get("rounds") or []:
            names += [k for k in x.get("metrics") or {} if k not in names]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), dpi=110)
    axes = [axes] if len(names) == 1 else list(axes)
    merged = report["merge"].get("merged_metrics") or {}
    central = (report.get("centralized") or {}).get("metrics") or {}
    for ax, metric in zip(axes, names, strict=True):
        for node, r in report["nodes"].items():
            pts = [(x["round"] + 1, x["metrics"][metric]) for x in r.get("rounds") or []
                   if (x.get("metrics") or {}).get(metric) is not None]  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", linewidth=1, label=node)
        if metric in merged:
            ax.axhline(merged[metric], color="black", linestyle="--", label="merged (exact mean)")
        if metric in central:
            ax.axhline(central[metric], color="gray", linestyle=":", label="centralized")
        ax.set_xlabel("round")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"fflnode testnet: task {report['config']['task']}, per-node metrics")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        print("fflnode: --nodes must be at least 1", file=sys.stderr)
        return 2
    try:
        node_config(args, 0, Path(args.out), [])  # reject a bad --set before starting
    except ConfigError as e:
        print(f"fflnode: {e}", file=sys.stderr)
        return 2
    net = Testnet(args)
    if not args.quiet:
        print(f"fflnode testnet: starting {args.nodes} nodes in {net.out}", flush=True)
    report = trio.run(net.run)
    out = net.out
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if not args.no_plot:
        plot(report, out / "metrics.png")
    print_summary(report)
    return 0 if report["ok"] else 1
