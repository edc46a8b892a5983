"""`fflnode testnet`: N real node processes, trained, merged and checked.

The testnet is a supervisor, not a participant. It writes one config per node, starts
`fflnode run` processes (node 0 first; the others bootstrap from its address), and acts
as their systemd: each node gets its own NOTIFY_SOCKET, so the testnet learns from
READY=1 when a node listens and from STATUS= how far it got (that is the progress it
prints). Meanwhile it trains the centralized baseline. When the nodes exit it checks the
merge independently of the network path: it loads every premerge file with the
`safetensors` package, computes the canonical mean and its hash with plain torch and
hashlib, and compares every node's merged file and hash with it. Exit code 0 only when
every node exited 0 and every merged file equals that reference bit for bit.

Two networks. By default every node listens on 127.0.0.1 (port 0), all share one IP, so
the configs relax GossipSub's IP defences. With `--netns` every node runs in its own
Linux network namespace on one bridge (fflnode_harness.netns), as on separate hosts:
each listens on /ip4/0.0.0.0/tcp/4001 at its own 198.51.100.x address, only node 0's
address is given as bootstrap (the rest is learnt from heartbeats), and [pubsub] keeps
its production defaults. The bridge exists only while the run does: it is removed
however the run ends (done, failed, Ctrl-C, SIGTERM). Notify sockets and data dirs are
paths in the shared filesystem, which namespaces do not isolate; each node's metrics
endpoint listens on its own 127.0.0.1, which the testnet reaches from inside the
namespace (`Bridge.call_in`). `--flap I@R[:S]` unplugs node I's link at round R for S
seconds (netns only).

For a task with the state capability the nodes also federate their SSM states after the
merge (fflnode.states_phase); the testnet then checks those too, again without the
network path or the composition algebra: it loads the reference weights into the
task's model, reads every state context CENTRALLY (the members' segments of it
concatenated in ascending peer-ID order, folded in one pass), and reports per node the
task's state metrics alone, merged (from the node's report) and centralized (its own),
the per-layer error of each node's merged states against the centralized ones, the
bytes each node moved, and whether every node's states file hashes to the hash they
agreed on. Exit code 0 then also needs agreeing, matching state hashes.
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
from fflnode import metrics as metricsmod
from fflnode.errors import ConfigError
from fflnode.p2p import identity
from fflnode_harness import netns
from fflnode_harness.netns import Bridge, NetnsError

NOTIFY_TIMEOUT_S = 120.0  # a node that has not said READY by then is broken
# Per-task defaults of --rounds, --local-steps and --set, and "lossy_set" on top for a
# lossy --codec (given flags win). mqar: 4 nodes reached 97.9 % recall in 40 rounds of 5
# inner Adam steps averaged exactly each round (outer SGD at lr 1, constant: plain
# averaging); with the WSD schedule (the outer step decaying to 0 over the last quarter)
# only 92.7 %, and with 150 rounds of 1 step and outer Adam 95.5 % in more time
# (docs/benchmarks.md, "F-SSD"). text: the DiLoCo recipe tuned on the LM, 4.557
# perplexity with codec none (+4.8 % from the data-parallel baseline); a lossy codec
# wants a gentler outer step, holo 1 bit 4.678 at 0.5 / 0.7 against 5.2 at none's
# 0.7 / 0.8 (docs/benchmarks.md, "Language model").
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "text": {
        "rounds": 30,
        "local_steps": 20,
        "set": [
            "train.inner_optimizer=adam",
            "train.inner_lr=0.01",
            "train.outer_optimizer=sgd",
            "train.outer_lr=0.7",
            "train.outer_momentum=0.8",
            "train.lr_schedule=constant",
        ],
        "lossy_set": ["train.outer_lr=0.5", "train.outer_momentum=0.7"],
    },
    "mqar": {
        "rounds": 40,
        "local_steps": 5,
        "set": [
            "train.inner_optimizer=adam",
            "train.inner_lr=0.01",
            "train.outer_optimizer=sgd",
            "train.outer_lr=1.0",
            "train.lr_schedule=constant",
            "train.eval_every=20",
        ],
    },
}
DEFAULT_ROUNDS, DEFAULT_LOCAL_STEPS = 600, 1
# One layer composes exactly: a merged state within this of the centralized one (relative
# Frobenius) is exact up to float32 rounding (measured 1.0-1.2e-7, docs/benchmarks.md).
EXACT_STATE_ERROR = 1e-6
# Whole-run deadline: the bar is 5 minutes for the default 4-node run; a
# larger or slower run gets proportionally more before the testnet gives up.
RUN_DEADLINE_S = 900.0
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this (the daemon promises 5 s)
# --netns: every namespace has its own port space, so every node takes the port a
# deployment would (configs/node.toml), and its metrics on its own loopback.
NETNS_PORT = 4001
NETNS_METRICS = "127.0.0.1:9100"
# A link flap long enough that peers declare the node gone (membership: 2.5 s overdue +
# a 2 s ping) and its connections are dropped, short enough for a short run.
FLAP_DEFAULT_S = 8.0
# One scrape of a node's metrics from inside its namespace: a local HTTP GET answers in
# milliseconds; the fetch's own deadline (fflnode.metrics) bounds it, this is slack.
SCRAPE_TIMEOUT_S = 15.0
EXIT_SKIPPED = 77  # --netns where namespaces cannot be created (the automake convention)
SUMMARY_RULE = "-" * 78


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4, help="number of node processes (4)")
    p.add_argument(
        "--rounds", type=int, default=None, help="training rounds (600; mqar: 40; text: 30)"
    )
    p.add_argument(
        "--local-steps", type=int, default=None, help="inner steps per round (1; mqar: 5; text: 20)"
    )
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
        "--netns",
        action="store_true",
        help="each node in its own network namespace on one bridge (Linux, root): "
        "0.0.0.0:4001, one bootstrap address, production [pubsub] settings",
    )
    p.add_argument(
        "--flap",
        action="append",
        default=[],
        metavar="NODE@ROUND[:SECONDS]",
        help=f"--netns: unplug a node's link at a round for SECONDS ({FLAP_DEFAULT_S:g}), "
        "then plug it back",
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


def apply_task_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill --rounds, --local-steps and --set from TASK_DEFAULTS for the chosen task, its
    "lossy_set" after "set" for a lossy --codec (given values win: a --set of the same
    key comes later, so it overrides)."""
    d = TASK_DEFAULTS.get(args.task, {})
    if args.rounds is None:
        args.rounds = d.get("rounds", DEFAULT_ROUNDS)
    if args.local_steps is None:
        args.local_steps = d.get("local_steps", DEFAULT_LOCAL_STEPS)
    given = {item.partition("=")[0].strip() for item in args.set}
    defaults = [*d.get("set", []), *(d.get("lossy_set", []) if args.codec != "none" else [])]
    args.set = [kv for kv in defaults if kv.partition("=")[0] not in given] + args.set
    return args


# All the testnet's daemons start at once on this machine's cores, and each spends
# ~4 CPU seconds importing torch and libp2p before it listens: 16 on 2 cores took 90 s
# to all listen while 4 took 15. The daemon's default of 120 s is for hosts of their own.
START_TIMEOUT_PER_NODE_S = 20.0


def start_timeout_s(nodes: int) -> float:
    """[run] start_timeout_s for a testnet of `nodes` daemons on one machine."""
    return max(cfgmod.RunSection.start_timeout_s, START_TIMEOUT_PER_NODE_S * nodes)


def node_config(args: argparse.Namespace, i: int, out: Path, bootstrap: list[str]) -> cfgmod.Config:
    netns = getattr(args, "netns", False)
    doc: dict[str, Any] = {
        "node": {
            "data_dir": str(out / f"node{i}"),
            "listen": [f"/ip4/0.0.0.0/tcp/{NETNS_PORT}" if netns else "/ip4/127.0.0.1/tcp/0"],
            "bootstrap": bootstrap,
            "log_level": "info",
            "metrics": NETNS_METRICS if netns else "",
        },
        "run": {
            "run_id": f"testnet-{args.seed}",
            "seed": args.seed,
            "nodes": args.nodes,
            "rounds": 0 if args.task == "synthetic" else args.rounds,
            "topology": args.topology,
            "degree": args.degree,
            "start_timeout_s": start_timeout_s(args.nodes),
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
    }
    if not netns:  # every node on 127.0.0.1: no IP diversity to ask for, all colocated
        doc["pubsub"] = {"mesh_diversity_ips": 1, "ip_colocation_threshold": 1024}
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
    flap_at: int | None = None  # --netns: unplug its link at this round ...
    flap_s: float = 0.0  # ... for this long
    flap: dict[str, Any] | None = None  # what happened: rounds and times of down and up
    metrics_scrape: dict[str, Any] | None = None  # --netns: one scrape, from its namespace
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
# * "I@states": once every node still running has agreed on the members of the first
#   state epoch (after the weight merge): the victim is a member of it, so the others'
#   attempt fails and they agree again without it (fflnode.states_phase, "Churn").
AT_MERGE, AT_MERGE_START, AT_STATES = -1, -2, -3
MERGE_FAULTS = {"merge": AT_MERGE, "merge-start": AT_MERGE_START, "states": AT_STATES}


def parse_faults(specs: list[str], what: str, nodes: int) -> dict[int, int]:
    """--kill / --stop values "I@R", "I@merge" or "I@merge-start" -> {node: round or
    AT_MERGE / AT_MERGE_START}."""
    out = {}
    for spec in specs:
        node, _, rnd = spec.partition("@")
        if not (node.isdigit() and (rnd.isdigit() or rnd in MERGE_FAULTS) and int(node) < nodes):
            raise ConfigError(
                f"--{what} {spec!r}: expected NODE@ROUND, NODE@merge, "
                f"NODE@merge-start or NODE@states, NODE < {nodes}"
            )
        out[int(node)] = MERGE_FAULTS[rnd] if rnd in MERGE_FAULTS else int(rnd)
    return out


def parse_flaps(specs: list[str], nodes: int) -> dict[int, tuple[int, float]]:
    """--flap values "I@R" or "I@R:SECONDS" -> {node: (round, seconds)}."""
    out = {}
    for spec in specs:
        node, _, rest = spec.partition("@")
        rnd, colon, secs = rest.partition(":")
        try:
            seconds = float(secs) if colon else FLAP_DEFAULT_S
        except ValueError:
            seconds = -1.0
        if not (node.isdigit() and rnd.isdigit() and int(node) < nodes and 0 < seconds <= 600):
            raise ConfigError(
                f"--flap {spec!r}: expected NODE@ROUND or NODE@ROUND:SECONDS, "
                f"NODE < {nodes}, 0 < SECONDS <= 600"
            )
        out[int(node)] = (int(rnd), seconds)
    return out


class Testnet:
    def __init__(self, args: argparse.Namespace, bridge: Bridge | None = None) -> None:
        """`bridge`: with --netns, the open Bridge whose node i runs node i."""
        self.args = args
        self.bridge = bridge
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
        for i, (r, seconds) in parse_flaps(args.flap, args.nodes).items():
            self.procs[i].flap_at, self.procs[i].flap_s = r, seconds
        self.baselines: dict[str, dict[str, Any]] = {}
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
        self.stopped_by: int | None = None  # the signal that ended the run early
        try:
            # Ctrl-C and SIGTERM stop the nodes and still write the report (with --netns,
            # the bridge goes once trio.run returns).
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as top:
                    top.start_soon(self._on_signal, signals, top.cancel_scope)
                    with trio.move_on_after(self.args.deadline) as deadline:
                        await self._run_nodes()
                    top.cancel_scope.cancel()
            if deadline.cancelled_caught:
                self.timed_out = True
                self.say(f"  testnet: not done within {self.args.deadline:.0f} s; nodes stopped")
        finally:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
        wall = time.perf_counter() - t0
        return self._report(wall)

    async def _on_signal(self, signals: Any, scope: trio.CancelScope) -> None:
        async for signum in signals:
            self.stopped_by = signum
            self.say(f"  testnet: {signal.Signals(signum).name}: stopping the nodes")
            scope.cancel()
            return

    async def _run_nodes(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            if not self.args.no_baseline and self.args.task != "synthetic":
                nursery.start_soon(self._baseline)
            # Only node 0's address: the others find each other through heartbeats.
            if self.bridge is None:  # its port is known once it listens: start it first
                if not await self._launch(nursery, self.procs[0], []):
                    self.say("  testnet: no node can start without node0's address; stopping")
                    nursery.cancel_scope.cancel()
                    return
                self.bootstrap = self._addrs(self.procs[0])[:1]
                later = self.procs[1:]
            else:  # known in advance, as in a deployment: all start together
                self.bootstrap = [self._netns_bootstrap()]
                later = self.procs
            async with trio.open_nursery() as launching:
                for proc in later:
                    boot = self.bootstrap if proc.index else []
                    launching.start_soon(self._launch, nursery, proc, boot)
            nursery.start_soon(self._end_frozen)

    def _netns_bootstrap(self) -> str:
        """Node 0's address under --netns: its bridge address, the port every node
        listens on, and the peer ID of an identity made for it now (the node loads it)."""
        assert self.bridge is not None
        key_pair = identity.load_or_create(self.procs[0].data_dir)
        peer = identity.peer_id_of(key_pair)
        return f"/ip4/{self.bridge.addresses[0]}/tcp/{NETNS_PORT}/p2p/{peer}"

    def _rejoin_bootstrap(self, proc: NodeProc) -> list[str]:
        """What a restarted node bootstraps from: node 0 and node 1, itself excepted, so
        a restarted node 0 (whose first config had none) finds the run again."""
        return [self._addrs(p)[0] for p in self.procs[:2] if p is not proc]

    @staticmethod
    def _node_file(proc: NodeProc) -> dict[str, Any]:
        return json.loads((proc.data_dir / "node.json").read_text())

    def _addrs(self, proc: NodeProc) -> list[str]:
        return self._node_file(proc)["addrs"]

    async def _launch(self, nursery: trio.Nursery, proc: NodeProc, bootstrap: list[str]) -> bool:
        """Start `proc`; True once it says READY, False (said in one line) if it has not
        within NOTIFY_TIMEOUT_S. It keeps running either way: its report tells the rest."""
        cfg = node_config(self.args, proc.index, self.out, bootstrap)
        proc.data_dir.mkdir(parents=True, exist_ok=True)
        conf_path = proc.data_dir / "node.toml"
        conf_path.write_text(cfgmod.to_toml(cfg))
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await sock.bind(proc.notify_path)
        nursery.start_soon(self._listen, proc, sock)
        nursery.start_soon(self._supervise, proc, conf_path)
        with trio.move_on_after(NOTIFY_TIMEOUT_S):
            await proc.ready.wait()
            if proc.done.is_set():  # it died before READY (a refused config): say why
                self.say(f"  {proc.name:>6}: ended before READY: {last_line(proc.data_dir)}")
                return False
            return True
        self.say(
            f"  {proc.name:>6}: not READY within {NOTIFY_TIMEOUT_S:.0f} s (a loaded machine, "
            f"or a broken node: see {proc.data_dir / 'node.log'})"
        )
        return False

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
                        if self.bridge is not None and proc.metrics_scrape is None:
                            proc.metrics_scrape = {}
                            self.nursery.start_soon(self._scrape, proc)
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
        states_agreed = all(p.status.startswith("states epoch 0 agreed") for p in running)

        def due(at: int | None) -> bool:
            if at == AT_MERGE:
                return agreed and proc in running
            if at == AT_MERGE_START:
                return merging
            if at == AT_STATES:
                return states_agreed and proc in running
            return at is not None and proc.round >= at

        if due(proc.kill_at) and not proc.killed:
            proc.killed = True
            proc.process.kill()  # SIGKILL: no chance to clean up, as a crash
            late = merging or proc.kill_at == AT_STATES
            when = "in the state phase" if proc.kill_at == AT_STATES else "in the merge"
            when = f"{when} (stays down)" if late else f"at round {proc.round}"
            after = "" if late else " (restart follows)"
            self.say(f"  {proc.name:>6}: SIGKILL {when}{after}")
        flap_due = proc.flap_at is not None and proc.round >= proc.flap_at and not merging
        if flap_due and proc.flap is None and self.bridge is not None:
            proc.flap = {"seconds": proc.flap_s, "round_down": proc.round}
            self.nursery.start_soon(self._flap, proc)
        if due(proc.stop_at) and not proc.stopped:
            proc.stopped = True
            proc.process.send_signal(signal.SIGSTOP)  # frozen: connections stay open
            when = "in the merge" if merging else f"at round {proc.round}"
            self.say(f"  {proc.name:>6}: SIGSTOP {when} (left frozen)")

    async def _flap(self, proc: NodeProc) -> None:
        """Unplug the node's link for proc.flap_s seconds, then plug it back."""
        assert self.bridge is not None and proc.flap is not None
        others = [p for p in self.procs if p is not proc]
        await trio.to_thread.run_sync(self.bridge.link_down, proc.index)
        self.say(f"  {proc.name:>6}: link down at round {proc.round} for {proc.flap_s:g} s")
        try:
            await trio.sleep(proc.flap_s)  # the outage being simulated
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.bridge.link_up, proc.index)
        proc.flap["round_up"] = proc.round
        proc.flap["peers_round_up"] = max((p.round for p in others), default=0)
        self.say(
            f"  {proc.name:>6}: link up at round {proc.round} "
            f"(the others at round {proc.flap['peers_round_up']})"
        )

    async def _scrape(self, proc: NodeProc) -> None:
        """GET the node's metrics from inside its namespace (its 127.0.0.1 is its own)."""
        assert self.bridge is not None
        endpoint = self._node_file(proc).get("metrics", "")
        proc.metrics_scrape = {"endpoint": endpoint}
        try:
            host, port = cfgmod.split_host_port(endpoint)
            text = await trio.to_thread.run_sync(
                lambda: self.bridge.call_in(  # type: ignore[union-attr]
                    proc.index,
                    lambda: trio.run(metricsmod.fetch, host, port),
                    timeout_s=SCRAPE_TIMEOUT_S,
                )
            )
        except (OSError, ValueError, trio.TooSlowError, NetnsError) as e:
            proc.metrics_scrape["error"] = f"{type(e).__name__}: {e}"
            self.say(f"  {proc.name:>6}: metrics at {endpoint} did not answer: {e}")
            return
        found = metricsmod.parse(text)
        for name in ("fflnode_round", "fflnode_peers_alive"):
            if found.get(name):
                proc.metrics_scrape[name] = found[name][0][1]

    async def _supervise(self, proc: NodeProc, conf_path: Path) -> None:
        env = dict(os.environ, NOTIFY_SOCKET=proc.notify_path, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "fflnode", "run", "--config", str(conf_path)]
        if self.bridge is not None:  # inside its namespace: `ip netns exec` execs it
            cmd = self.bridge.node_cmd(proc.index, cmd)
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
                cfg = node_config(self.args, proc.index, self.out, self._rejoin_bootstrap(proc))
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
        """Two centralized baselines on the union of the data, trained beside the nodes:
        "centralized", synchronous data-parallel training with the run's steps (rounds x
        local steps), each on the mean gradient of one batch per node, so the samples and
        the step count of the run; and "centralized_sequential", one worker taking all
        nodes x rounds x local steps steps one batch at a time: the same samples in N times
        the sequential steps, a bar no N-node run of the same steps is meant to reach.
        Both are built here, one after the other (building draws from torch's global
        generator), and trained in threads."""
        import torch

        from fflnode.train.task import load_task
        from fflnode.train.trainer import centralized_trainer, settings_from

        a = self.args
        # The nodes' own task and training settings: same model, data, schedule.
        cfg = node_config(a, 0, self.out, [])
        loaded = load_task(cfg.train.task, cfg.task, Path.cwd())
        settings = settings_from(cfg.train, a.seed, a.rounds)
        torch.set_num_threads(1)  # one core for each baseline, like each node
        steps = a.rounds * a.local_steps
        plans = (("centralized", steps, a.nodes), ("centralized_sequential", a.nodes * steps, 1))
        async with trio.open_nursery() as nursery:
            for key, n, per_step in plans:
                trainer = centralized_trainer(loaded, settings)
                nursery.start_soon(self._train_baseline, key, trainer, n, per_step)

    async def _train_baseline(
        self, key: str, trainer: Any, steps: int, batches_per_step: int
    ) -> None:
        from fflnode.train.trainer import run_centralized

        t0 = time.perf_counter()
        metrics, _ = await trio.to_thread.run_sync(
            run_centralized, trainer, steps, batches_per_step
        )
        self.baselines[key] = {
            "metrics": metrics,
            "steps": steps,
            "batches_per_step": batches_per_step,
            "seconds": time.perf_counter() - t0,
        }
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.say(f"  baseline: {key} {shown} after {steps} steps x {batches_per_step} batches")

    # ------------------------------------------------------------------ checking
    def _report(self, wall: float) -> dict[str, Any]:
        nodes: dict[str, Any] = {}
        for proc in self.procs:
            path = proc.data_dir / "result.json"
            result = json.loads(path.read_text()) if path.exists() else {}
            if not result.get("peer_id") and (proc.data_dir / "node.json").exists():
                # killed before writing its result (e.g. in the state phase): who it was
                node_doc = json.loads((proc.data_dir / "node.json").read_text())
                result = {**result, "peer_id": node_doc.get("peer_id")}
                result.setdefault("partition_index", proc.index)
            nodes[proc.name] = {
                **result,
                "exit_code": proc.exit_code,
                "killed_and_restarted": proc.killed and not proc.lost_in_merge,
                "frozen": proc.stopped,
                "killed_in_merge": proc.lost_in_merge,
                "flap": proc.flap,
                "metrics_scrape": proc.metrics_scrape,
                "address": self.bridge.addresses[proc.index] if self.bridge else None,
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
        honest = [
            p
            for p in self.procs
            if not p.stopped
            and p.index < first_corrupt
            and nodes[p.name].get("peer_id") not in outliers
        ]
        # killed in the state phase: a member of the merge that cannot finish the run
        in_states = [p for p in honest if p.lost_in_merge and p.kill_at == AT_STATES]
        expected = [p for p in honest if not p.lost_in_merge]
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
        states = states_report(
            self.args, nodes, [p.name for p in expected], ref["tensors"], self.out
        )
        ok = (
            not self.timed_out
            and self.stopped_by is None
            and merge["hashes_agree"]
            and merge["files_equal_reference"]
            and all(p.exit_code == 0 for p in expected)
            and sorted(participants)
            == sorted(nodes[p.name]["peer_id"] for p in [*expected, *in_states])
            and (states is None or states["ok"])
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
                    "netns",
                    "flap",
                )
            },
            "netns": {
                "bridge": self.bridge.name,
                "addresses": self.bridge.addresses,
                "bootstrap": self.bootstrap,
            }
            if self.bridge
            else None,
            "stopped_by": signal.Signals(self.stopped_by).name if self.stopped_by else None,
            "nodes": nodes,
            "merge": merge,
            "states": states,
            "centralized": self.baselines.get("centralized"),
            "centralized_sequential": self.baselines.get("centralized_sequential"),
            "wall_seconds": wall,
        }


LOG_TAIL_BYTES = 4096  # enough for a node's last line (a ConfigError is one line)


def last_line(data_dir: Path) -> str:
    """The last non-empty line of a node's log: why a node that ended early ended."""
    try:
        with open(data_dir / "node.log", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError as e:
        return f"(no log: {e.strerror})"
    return next((line.strip() for line in reversed(lines) if line.strip()), "(empty log)")


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


def states_report(
    args: argparse.Namespace,
    nodes: dict[str, Any],
    expected: list[str],
    weights: dict[str, Any] | None,
    out: Path,
) -> dict[str, Any] | None:
    """The state federation of the run, checked against a centralized reading of our own
    (None when the run federates no states)."""
    import torch
    from libp2p.peer.id import ID

    from fflnode.train.task import build_model, load_task

    cfg = node_config(args, 0, out, [])
    if cfg.states.federate == "off":
        return None
    loaded = load_task(cfg.train.task, cfg.task, Path.cwd())
    if not loaded.federates_states:
        return None
    records = {name: (nodes[name].get("states") or {}).get("epochs") or [] for name in expected}
    if weights is None or not expected or not all(records.values()):
        missing = [name for name, r in records.items() if not r]
        return {"ok": False, "epochs": [], "error": f"no states from {missing or 'the merge'}"}
    task = loaded.task
    model = build_model(loaded, cfg.run.seed)
    with torch.no_grad():
        for name, value in weights.items():
            try:
                target = model.get_parameter(name)
            except AttributeError:
                target = model.get_buffer(name)
            target.copy_(value.view_as(target))
    partition_of = {r.get("peer_id"): r.get("partition_index") for r in nodes.values()}
    primary = loaded.primary_metric
    epochs, ok = [], True
    for e in range(cfg.states.epochs):
        recs = {name: r[e] for name, r in records.items() if len(r) > e}
        if len(recs) != len(expected):
            ok = False
            break
        members = next(iter(recs.values()))["members"]
        order = sorted(members, key=lambda m: ID.from_base58(m).to_bytes())
        central = centralized_states(task, model, [partition_of[m] for m in order], cfg, e)
        rows = {}
        for name, rec in recs.items():
            got = load_states_file(Path(rec["file"]))
            errors = layer_errors(got["layers"], central, got["contexts"])
            central_metrics = task.evaluate_states(
                model, central, partition_of[nodes[name]["peer_id"]], cfg.run.nodes,
                cfg.run.seed, e,
            )  # fmt: skip
            rows[name] = {
                "alone": rec["alone"],
                "merged": rec["merged"],
                "centralized": {k: float(v) for k, v in central_metrics.items()},
                "hash": rec["hash"],
                "file_matches_hash": got["hash"] == rec["hash"],
                "layer_errors": errors,
                "bytes_pulled": rec["bytes_pulled"],
                "bytes_served": rec["bytes_served"],
                "attempt": rec["attempt"],
                "seconds": rec["seconds"],
            }
        hashes = {r["hash"] for r in rows.values()}
        same_members = all(rec["members"] == members for rec in recs.values())
        depth = len(next(iter(rows.values()))["layer_errors"])
        epoch = {
            "epoch": e,
            "members": members,
            "left_out": next(iter(recs.values()))["left_out"],
            "attempt": max(r["attempt"] for r in rows.values()),
            "hash": next(iter(hashes)),
            "hashes_agree": len(hashes) == 1 and same_members,
            "files_match_hashes": all(r["file_matches_hash"] for r in rows.values()),
            "layer_errors": [
                max(r["layer_errors"][i] for r in rows.values()) for i in range(depth)
            ],
            "contexts": len(central),
            "nodes": rows,
        }
        ok = ok and epoch["hashes_agree"] and epoch["files_match_hashes"]
        epochs.append(epoch)
    metric = primary if primary in next(iter(records.values()))[0]["alone"] else None
    return {
        "ok": ok,
        "codec": (nodes[expected[0]].get("states") or {}).get("codec"),
        "metric": metric or next(iter(next(iter(records.values()))[0]["alone"]), None),
        "epochs": epochs,
    }


def centralized_states(
    task: Any, model: Any, partitions: list[int], cfg: Any, epoch: int
) -> dict[int, tuple[Any, ...]]:
    """Context -> the model's states of ONE reading of every member's segment of it, in
    the given (ascending peer-ID) order: no network, no composition."""
    import torch

    from fflnode.ssm.states import unstack_layers

    segments: dict[int, list[Any]] = {}
    for part in partitions:
        for c, seg in task.local_contexts(part, cfg.run.nodes, cfg.run.seed, epoch).items():
            segments.setdefault(c, []).append(seg)
    ids = sorted(segments)
    out: dict[int, tuple[Any, ...]] = {}
    for lo in range(0, len(ids), 64):
        chunk = ids[lo : lo + 64]
        states = task.fold(model, [torch.cat(segments[c], dim=0) for c in chunk])
        out.update(zip(chunk, unstack_layers(states), strict=True))
    return out


def load_states_file(path: Path) -> dict[str, Any]:
    """A node's states file read with `safetensors` and hashed with hashlib: contexts,
    per-layer h, and sha256 over (name, 0, little-endian bytes) in name order."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    h = hashlib.sha256()
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        h.update(name.encode("utf-8") + b"\x00")
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    depth = sum(1 for n in tensors if n.endswith(".h"))
    return {
        "contexts": tensors["contexts"].tolist(),
        "layers": [tensors[f"layers.{i}.h"] for i in range(depth)],
        "hash": h.hexdigest(),
    }


def layer_errors(
    layers: list[Any], central: dict[int, tuple[Any, ...]], ids: list[int]
) -> list[float]:
    """Per layer, ||h_merged - h_central|| / ||h_central|| over every context (float64)."""
    import torch

    if sorted(central) != ids:
        return [float("inf")] * len(layers)
    out = []
    for i, got in enumerate(layers):
        want = torch.stack([central[c][i].h for c in ids]).double()
        diff = torch.linalg.vector_norm((got.double() - want).reshape(-1))
        ref = torch.linalg.vector_norm(want.reshape(-1))
        out.append(float(diff / ref) if float(ref) > 0 else float(diff))
    return out


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


def compare(name: str, merged: float, central: float, against: str = "centralized") -> str:
    from fflnode.train.task import higher_is_better

    if "accuracy" in name:
        return f"merged - {against} = {100 * (merged - central):+.1f} pts"
    rel = (merged - central) / abs(central) if central else float("inf")
    better = "better" if (merged > central) == higher_is_better(name) else "worse"
    return f"merged {abs(100 * rel):.1f} % {better} than {against}"


def rejoin_summary(node: dict[str, Any]) -> str:
    """How a node got back in step after an outage: catch-up jumps, state adopted."""
    jumps = node.get("catch_up_jumps") or []
    adopted = [r["round"] for r in node.get("rounds") or [] if r.get("resynced_from")]
    done = []
    if jumps:
        done.append(f"caught up {jumps}")
    if adopted:
        done.append(f"adopted a peer's state after rounds {adopted}")
    return ", ".join(done) or "stayed in step (no catch-up, no state adopted)"


def print_summary(report: dict[str, Any], plotted: bool = True) -> None:
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
    if report.get("netns"):
        n = report["netns"]
        print(
            f"  network namespaces on bridge {n['bridge']}: {', '.join(n['addresses'])}, "
            f"port {NETNS_PORT}; bootstrap {', '.join(n['bootstrap']) or '-'}"
        )
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
        if r.get("flap"):
            f = r["flap"]
            print(
                f"       link down {f['seconds']:g} s at round {f['round_down']}, back at round "
                f"{f.get('round_up', '?')} (the others at {f.get('peers_round_up', '?')}); "
                f"{rejoin_summary(r)}"
            )
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
    for key, label in (("centralized", "centralized"), ("centralized_sequential", "  sequential")):
        cen = report.get(key)
        if not cen:
            continue
        shown = ", ".join(f"{k} {fmt_metric(k, v)}" for k, v in ordered(cen["metrics"], primary))
        gap = ""
        if primary and primary in merged_metrics and primary in cen["metrics"]:
            value, base = merged_metrics[primary], cen["metrics"][primary]
            gap = f"; {compare(primary, value, base, label.strip())}"
        per_step = cen.get("batches_per_step", 1)
        steps = f"{cen['steps']} steps x {per_step} batch{'es' if per_step > 1 else ''}"
        print(f"{label:<21}{shown}  ({steps}{gap})")
    total = sum(r.get("bytes_sent", 0) for r in report["nodes"].values())
    print(f"bytes moved          {total / 1e6:.2f} MB sent in total")
    if report.get("states") is not None:
        print_states(report["states"])
    verdict = "hashes agree" if m["hashes_agree"] else "HASHES DISAGREE"
    print(f"{verdict} with the reference {m['reference_hash']}")
    print(f"merged files equal the reference: {m['files_equal_reference']}")
    files = "report.json and metrics.png" if plotted else "report.json"
    print(f"wall time {report['wall_seconds']:.1f} s; {files} in the output dir")
    print(SUMMARY_RULE)


def print_states(st: dict[str, Any]) -> None:
    """The state federation block of the summary."""
    print(SUMMARY_RULE)
    if not st.get("epochs"):
        print(f"state federation     FAILED: {st.get('error', 'no epoch completed')}")
        return
    metric = st["metric"]
    for ep in st["epochs"]:
        print(
            f"state federation, epoch {ep['epoch']}: {ep['contexts']} contexts, "
            f"{len(ep['members'])} members, codec {st['codec']}"
            + (f", attempt {ep['attempt'] + 1}" if ep["attempt"] else "")
        )
        if ep["left_out"]:
            print(
                f"  left out (lost during the phase): {', '.join(p[-12:] for p in ep['left_out'])}"
            )
        print(
            f"{'node':<7}{metric + ' alone':>16}{'merged':>10}{'central':>10}"
            f"{'pulled MB':>11}{'served MB':>11}  hash"
        )
        for name, r in ep["nodes"].items():
            alone, merged, central = (r[k].get(metric) for k in ("alone", "merged", "centralized"))
            print(
                f"{name:<7}{fmt_state(metric, alone):>16}{fmt_state(metric, merged):>10}"
                f"{fmt_state(metric, central):>10}{r['bytes_pulled'] / 1e6:>11.2f}"
                f"{r['bytes_served'] / 1e6:>11.2f}  {r['hash'][:16]}"
                + ("" if r["file_matches_hash"] else "  FILE DIFFERS FROM ITS HASH")
            )
        errors = ", ".join(f"layer {i + 1} {err:.2g}" for i, err in enumerate(ep["layer_errors"]))
        print(f"merged vs centralized state (relative, per layer): {errors}")
        verdict = "agree" if ep["hashes_agree"] else "DISAGREE"
        files = "match them" if ep["files_match_hashes"] else "DO NOT match them"
        print(f"state hashes {verdict} ({ep['hash'][:16]}…); the nodes' files {files}")


def fmt_state(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if metric in ("recall", "accuracy") else f"{v:.4g}"


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
    apply_task_defaults(args)
    if args.nodes < 1:
        print("fflnode: --nodes must be at least 1", file=sys.stderr)
        return 2
    if args.flap and not args.netns:
        print("fflnode: --flap needs --netns (a link to unplug)", file=sys.stderr)
        return 2
    try:  # reject a bad --set or fault before starting anything
        node_config(args, 0, Path(args.out), [])
        parse_faults(args.kill, "kill", args.nodes)
        parse_faults(args.stop, "stop", args.nodes)
        parse_flaps(args.flap, args.nodes)
    except ConfigError as e:
        print(f"fflnode: {e}", file=sys.stderr)
        return 2
    if not args.netns:
        net = Testnet(args)
        if not args.quiet:
            print(f"fflnode testnet: starting {args.nodes} nodes in {net.out}", flush=True)
        report = trio.run(net.run)
    else:
        available, why = netns.netns_available()
        if not available:
            print(f"fflnode testnet --netns: skipped: {why}", flush=True)
            return EXIT_SKIPPED
        netns.cleanup_stale()  # what runs killed outright (SIGKILL) left behind
        # Entered outside trio.run: the Bridge's own SIGTERM handler covers its setup and
        # teardown, the testnet's covers the run; the bridge is removed however it ends.
        with Bridge(args.nodes) as bridge:
            net = Testnet(args, bridge)
            if not args.quiet:
                print(
                    f"fflnode testnet: starting {args.nodes} nodes in network namespaces "
                    f"{bridge.name}-n0..n{args.nodes - 1} ({bridge.addresses[0]}..), "
                    f"output in {net.out}",
                    flush=True,
                )
            report = trio.run(net.run)
    out = net.out
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if net.stopped_by is not None:
        print(f"fflnode testnet: stopped by {report['stopped_by']}; partial report in "
              f"{out / 'report.json'}", flush=True)  # fmt: skip
        return 128 + net.stopped_by
    if not args.no_plot:
        plot(report, out / "metrics.png")
    print_summary(report, plotted=not args.no_plot)
    return 0 if report["ok"] else 1
