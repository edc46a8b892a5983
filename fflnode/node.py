"""One node: one process, one trio event loop, one nursery owning everything.

Lifecycle only: what the node is made of comes ready-built and checked from the
composition root (fflnode.compose). `Node.run`:
  identity -> libp2p host listening -> pubsub + membership -> READY=1 -> bootstrap dials
  -> start barrier (the run's members agree, fflnode.p2p.barrier) -> R rounds of
  [inner steps -> encode Delta -> peers pull it / we pull theirs -> mix -> outer step]
  -> premerge.safetensors -> final merge -> merged.safetensors, hash agreed
  -> [state phase: SSM states folded with the merged weights, federated, hash agreed]
  -> result.json.

Rules: CPU-heavy work (training steps, encoding, evaluation, hashing) runs in worker
threads so the loop keeps answering peers and heartbeating; every wait has a deadline;
leaving `run` by error or cancellation tears the whole nursery down, host included.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from fflnode import checkpoint, metrics
from fflnode.admission import Admission
from fflnode.compose import Composition, reduce_scatters
from fflnode.config import split_host_port
from fflnode.errors import ConfigError, MergeError, leaf_error, short_peer
from fflnode.exchange import SHARD_PROTOCOL, Averaging, Gossip, RoundExchange
from fflnode.exchange_sharded import ShardedAveraging
from fflnode.merge.distance import consensus_distance
from fflnode.merge.protocol import (
    MERGE_ATTEMPTS,
    MERGE_HASH_PROTOCOL,
    MERGE_PROTOCOL,
    MergeExcluded,
    MergeMismatch,
    MergeOutcome,
    MergeRetry,
    MergeSession,
    MergeTimeout,
)
from fflnode.p2p import identity, streams
from fflnode.p2p.barrier import start_barrier
from fflnode.p2p.bulk import Traffic
from fflnode.p2p.fastpath import Channel, FastPath
from fflnode.p2p.gate import Gate, refusal
from fflnode.p2p.host import build_host, build_pubsub, close_host, running_host
from fflnode.p2p.limits import Limits
from fflnode.p2p.membership import Membership
from fflnode.p2p.reach import AddressGuard, Advertiser
from fflnode.prism.writer import save_tensors
from fflnode.rounds import RoundRecord, RoundRunner
from fflnode.sdnotify import Notifier, watchdog_interval_s
from fflnode.states_phase import run_states
from fflnode.tensors import FlatLayout
from fflnode.train import topology

log = logging.getLogger(__name__)

NODE_FILE = "node.json"
RESULT_FILE = "result.json"
PREMERGE_FILE = "premerge.safetensors"
MERGED_FILE = "merged.safetensors"
# Bootstrap peers may start after us (a testnet starts nodes one by one): redial with
# back-off, starting at 0.5 s and capped at 5 s, until the start barrier's deadline.
DIAL_BACKOFF_S = (0.5, 5.0)
SYNTHETIC_ROWS = 1024  # synthetic model tensors are [1024, cols] float32
SYNTHETIC_TENSOR_ELEMS = 1 << 20  # 4 MiB tensors: like a transformer's weight matrices


@dataclass
class NodeReport:
    peer_id: str
    partition_index: int
    task: str = ""
    primary_metric: str | None = None  # the task's headline metric (its first, or its choice)
    rounds: list[RoundRecord] = field(default_factory=list)
    metrics_before_merge: dict[str, float] | None = None  # the task's evaluate(), premerge
    merged_metrics: dict[str, float] | None = None  # the same, on the merged weights
    # ||theta_i - theta_merged|| / ||theta_merged||: how far this node was from the mean
    consensus_distance: float | None = None
    merged_hash: str | None = None
    merge: dict[str, Any] | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    traffic: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    error: str | None = None
    resumed_from_round: int | None = None  # the checkpoint this run resumed from
    catch_up_jumps: list[tuple[int, int]] = field(default_factory=list)
    mixing_with: list[str] = field(default_factory=list)  # the peers whose updates we mix
    states: dict[str, Any] | None = None  # the state phase (fflnode.states_phase)
    # node.fast_path: channels opened and accepted over TLS, and why libp2p was used
    fast_path: dict[str, Any] | None = None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _stream_counts(host: Any) -> dict[str, int]:
    """Open libp2p streams: in all, and the most held by one peer (over its connections),
    and that peer's by direction and protocol ("top:inbound:/meshsub/1.1.0")."""
    if host is None:
        return {"all": 0, "peer_max": 0}
    per_peer: dict[Any, list[Any]] = {
        peer: [s for c in conns for s in c.get_streams()]
        for peer, conns in list(host.get_network().connections.items())
    }
    counts = {"all": sum(len(v) for v in per_peer.values()), "peer_max": 0}
    if per_peer:
        top = max(per_peer.values(), key=len)
        counts["peer_max"] = len(top)
        for s in top:
            key = f"top:{getattr(s, '_direction', '?')}:{s.get_protocol()}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def fast_path_host(listen: list[multiaddr.Multiaddr]) -> str:
    """The IP node.fast_path's listener binds: the first listen address's (peers reach
    us there; a wildcard listen binds every interface)."""
    for addr in listen:
        for proto in ("ip4", "ip6"):
            try:
                return str(addr.value_for_protocol(proto))
            except Exception:  # multiaddr raises assorted types for an absent protocol
                continue
    raise ConfigError("node.fast_path needs an /ip4/ or /ip6/ address in node.listen")


def bootstrap_addresses(cfg: Any) -> list[str]:
    """The transport part of every node.bootstrap address (the operator's, trusted)."""
    return [a.split("/p2p/")[0] for a in cfg.node.bootstrap]


class Node:
    def __init__(self, comp: Composition, notifier: Notifier | None = None) -> None:
        self.comp = comp
        self.cfg = cfg = comp.cfg
        self.notifier = notifier or Notifier()
        self.data_dir = cfg.data_dir
        self.gate = Gate.from_config(cfg.access.allow, cfg.access.blacklist_after)
        self.traffic = Traffic(on_reject=self.gate.offence)
        self.trainer = comp.trainer
        self.report: NodeReport | None = None
        self.listening = trio.Event()
        self.addrs: list[str] = []
        self.peer_id: ID | None = None
        self.membership: Membership | None = None
        self.merge_state = "pending"  # pending | running | done | failed
        self.fast: FastPath | None = None  # node.fast_path's channel service, once serving
        self._merge: MergeSession | None = None  # the attempt inbound channels go to
        self.metrics_port: int | None = None
        self.loop_lag = metrics.LoopLag()
        self.limits = Limits()
        self.host: Any = None
        self.adversary = comp.adversary  # resilience tests only: corrupted updates
        if self.adversary is not None:
            log.warning("adversary mode %r: this node sends corrupted updates", cfg.adversary.mode)

    # ----------------------------------------------------------------------- run
    async def run(self) -> NodeReport:
        try:
            return await self._run()
        finally:
            if self.trainer is not None:
                self.trainer.close()  # an out-of-core trainer's block files and I/O thread

    async def _run(self) -> NodeReport:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key_pair = identity.load_or_create(self.data_dir)
        advertiser = Advertiser(cfg.node.announce)
        host = build_host(
            key_pair,
            psk=self.comp.psk,
            gate=self.gate,
            advertiser=advertiser,
            limits=self.limits,
            on_hostile=lambda peer, reason, detail: self.traffic.reject(reason, peer, detail),
        )
        self.host = host
        # Addresses peers tell us pass the dial policy; the config's bootstrap is trusted.
        guard = AddressGuard(host, scopes=cfg.node.dial_scopes, trusted=bootstrap_addresses(cfg))
        self.peer_id = host.get_id()
        me = self.peer_id
        layout = self.comp.layout
        admission = Admission(self.comp.run_descriptor(), self.comp.run_secret)
        report = self.report = NodeReport(str(me), cfg.train.partition_index, cfg.train.task)
        try:
            listen = [multiaddr.Multiaddr(a) for a in cfg.node.listen]
        except Exception as e:  # multiaddr raises assorted types
            raise ConfigError(f"{cfg.source}: node.listen has an invalid address: {e}") from None
        pubsub, router = build_pubsub(
            host,
            cfg.run.nodes,
            lambda peer, reason, detail: self.traffic.reject(reason, peer, detail),
            mesh_diversity_ips=cfg.pubsub.mesh_diversity_ips,
            ip_colocation_threshold=cfg.pubsub.ip_colocation_threshold,
        )
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(running_host(host, listen))
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(router))
            # Unwinding runs last-in first: close the host (no more inbound streams or
            # messages) before pubsub's service stops, or a late announcement reaches a
            # closed nursery and takes the swarm down with it.
            stack.push_async_callback(close_host, host)
            await pubsub.wait_until_ready()
            async with trio.open_nursery() as nursery:
                membership = Membership(
                    host,
                    pubsub,
                    cfg.run.run_id,
                    self.traffic,
                    admission,
                    self.gate.validate_announcement,
                    guard,
                )
                self.membership = membership
                # decoded and admitted before GossipSub forwards it (issue 10)
                pubsub.set_topic_validator(membership.topic, membership.validate, False)
                await nursery.start(self.gate.run)
                await nursery.start(self.loop_lag.run)
                await nursery.start(membership.run)
                if cfg.node.fast_path:
                    self.fast = FastPath(
                        host,
                        key_pair,
                        self._on_channel,
                        listen_host=fast_path_host(listen),
                        port=cfg.node.fast_path_port,
                        on_reject=lambda peer, reason: self.traffic.reject(reason, peer),
                        peer_log=self.traffic.peer_log,
                    )
                    await nursery.start(self.fast.serve)
                if cfg.node.metrics:
                    mhost, mport = split_host_port(cfg.node.metrics)
                    self.metrics_port = await nursery.start(
                        metrics.serve, mhost, mport, self.metric_samples
                    )
                self.addrs = [str(a) for a in host.get_addrs()]
                write_json_atomic(
                    self.data_dir / NODE_FILE,
                    {
                        "peer_id": str(me),
                        "addrs": self.addrs,
                        "pid": os.getpid(),
                        "metrics": f"{mhost}:{self.metrics_port}" if cfg.node.metrics else "",
                        "fast_path": (
                            f"{self.fast.listen_host}:{self.fast.port}" if self.fast else ""
                        ),
                    },
                )
                self.notifier.ready(f"listening on {', '.join(self.addrs)}")
                self.listening.set()
                log.info("node %s listening on %s", me, ", ".join(self.addrs))
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._bootstrap, host)
                ckpt = None
                if self.trainer is not None:
                    ckpt = await trio.to_thread.run_sync(
                        # lazy: an out-of-core node resumes chunk by chunk (RoundRunner)
                        checkpoint.load,
                        self.data_dir,
                        cfg.run.run_id,
                        self.trainer.numel,
                        True,
                    )
                if ckpt is None:
                    members = await start_barrier(
                        membership,
                        cfg.run.nodes,
                        cfg.run.start_timeout_s,
                        nursery,
                        self.notifier.status,
                    )
                else:  # a restart: the run's members are on record, rejoin them
                    members = await self._rejoin(membership, ckpt)
                merge = self._merge_session(host, membership, members, layout, 0)
                host.set_stream_handler(MERGE_PROTOCOL, merge.handle)
                host.set_stream_handler(MERGE_HASH_PROTOCOL, merge.handle_hash)
                membership.phase = "train"
                if self.trainer is not None:
                    exchange = await self._exchange(host, members, membership)
                    host.set_stream_handler(SHARD_PROTOCOL, exchange.handle)
                    runner = RoundRunner(
                        trainer=self.trainer,
                        exchange=exchange,
                        membership=membership,
                        notifier=self.notifier,
                        data_dir=self.data_dir,
                        run_id=cfg.run.run_id,
                        members=members,
                        rounds=cfg.run.rounds,
                        eval_every=cfg.train.eval_every,
                        checkpoint_every=cfg.train.checkpoint_every,
                        records=report.rounds,
                        # the merge's quorum (0: a majority of the run), waited for as
                        # long as the start barrier waits for the run's nodes
                        quorum=cfg.merge.quorum or len(members) // 2 + 1,
                        quorum_wait_s=cfg.run.start_timeout_s,
                        adversary=self.adversary,
                    )
                    if ckpt is not None:
                        # off the loop: out of core, it streams the state to disk
                        await trio.to_thread.run_sync(runner.resume, ckpt)
                        report.resumed_from_round = ckpt.round
                    await runner.run()
                    report.catch_up_jumps = runner.jumps
                premerge = self.data_dir / PREMERGE_FILE
                await trio.to_thread.run_sync(self._write_premerge, premerge, layout)
                if self.trainer is not None:
                    report.metrics_before_merge = await trio.to_thread.run_sync(
                        self.trainer.evaluate
                    )
                    report.primary_metric = self.comp.task.primary_metric or next(
                        iter(report.metrics_before_merge), None
                    )
                membership.phase = "merge"
                self.notifier.status("merging")
                self.merge_state = "running"
                while True:
                    try:
                        outcome = await merge.run(premerge, self.data_dir / MERGED_FILE)
                        break
                    except BaseException as e:
                        attempt = self._next_merge_attempt(merge, leaf_error(e))
                        if attempt is None:
                            self.merge_state = "failed"
                            raise
                    merge.close()
                    merge = self._merge_session(host, membership, members, layout, attempt)
                    host.set_stream_handler(MERGE_PROTOCOL, merge.handle)
                    host.set_stream_handler(MERGE_HASH_PROTOCOL, merge.handle_hash)
                self.merge_state = "done"
                self._record_merge(report, outcome)
                if self.fast is not None:
                    report.fast_path = asdict(self.fast.stats)
                membership.phase = "done"
                await membership.beat_now()
                self.notifier.status(f"merged {outcome.hash[:16]} with {len(outcome.members)}")
                if not await merge.wait_all_done(outcome.members):
                    log.warning("not every member reported done within the grace period")
                merge.close()
                report.consensus_distance = await trio.to_thread.run_sync(
                    consensus_distance, premerge, self.data_dir / MERGED_FILE, layout
                )
                if self.trainer is not None:
                    report.merged_metrics = await trio.to_thread.run_sync(
                        self._merged_metrics, self.data_dir / MERGED_FILE
                    )
                # ---- the state phase: the merged model's SSM states, federated ----
                if self.comp.states is not None and self.trainer is not None:
                    report.states = await run_states(
                        self.comp.states,
                        self.comp.task.task,  # type: ignore[arg-type]
                        self.trainer.model,
                        membership=membership,
                        traffic=self.traffic,
                        members=outcome.members,
                        screen=self.gate.validate_announcement,
                        data_dir=self.data_dir,
                        status=self.notifier.status,
                    )
                nursery.cancel_scope.cancel()
        report.wall_seconds = time.perf_counter() - t0
        self._finish(report)
        return report

    def metric_samples(self) -> list[metrics.Sample]:
        """The node's state as Prometheus samples, built at scrape time."""
        S = metrics.Sample
        m, rep = self.membership, self.report
        last = rep.rounds[-1] if rep and rep.rounds else None
        phases = ("join", "train", "merge", "done")
        out = [
            S(
                "fflnode_round",
                "gauge",
                "rounds completed",
                [({}, float(len(rep.rounds) if rep else 0))],
            ),
            S(
                "fflnode_rounds_planned",
                "gauge",
                "rounds the run has",
                [({}, float(self.cfg.run.rounds))],
            ),
            S(
                "fflnode_phase",
                "gauge",
                "1 for the node's current phase",
                [({"phase": ph}, float(m is not None and m.phase == ph)) for ph in phases],
            ),
            S(
                "fflnode_peers_alive",
                "gauge",
                "run peers heard from recently",
                [({}, float(len(m.alive()) if m else 0))],
            ),
            S(
                "fflnode_bytes_sent_total",
                "counter",
                "bulk bytes sent, by protocol",
                [({"protocol": k}, float(v)) for k, v in self.traffic.sent.items()],
            ),
            S(
                "fflnode_bytes_received_total",
                "counter",
                "bulk bytes received, by protocol",
                [({"protocol": k}, float(v)) for k, v in self.traffic.received.items()],
            ),
            S(
                "fflnode_rejected_messages_total",
                "counter",
                "messages rejected, by reason",
                [({"reason": k}, float(v)) for k, v in self.traffic.rejected.items()],
            ),
            S(
                "fflnode_peers_banned",
                "gauge",
                "peers disconnected and refused for sending invalid messages",
                [({}, float(len(self.gate.banned)))],
            ),
            S(
                "fflnode_connections_refused_total",
                "counter",
                "connections the access gate refused, by cause (psk, allowlist, banned)",
                [({"cause": k}, float(v)) for k, v in self.gate.refused.items()],
            ),
            S(
                "fflnode_merge_state",
                "gauge",
                "1 for the merge's current state",
                [
                    ({"state": st}, float(self.merge_state == st))
                    for st in ("pending", "running", "done", "failed")
                ],
            ),
            S(
                "fflnode_loop_lag_seconds",
                "gauge",
                "how late the event loop woke a sleeping task: worst since start, and over "
                "the last 10 s",
                [
                    ({"window": "max"}, self.loop_lag.max_s),
                    ({"window": "recent"}, self.loop_lag.recent_s()),
                ],
            ),
            S(
                "fflnode_inbound_refused_total",
                "counter",
                "inbound streams reset and connections closed at a limit, by kind "
                "(streams-peer, streams-protocol, handshakes, handshakes-ip)",
                [({"kind": k}, float(v)) for k, v in self.limits.refused.items()],
            ),
            S(
                "fflnode_inbound_peak",
                "gauge",
                "the most inbound streams one peer held (in all; on one protocol), and "
                "handshakes in progress, at any moment",
                [({"of": k}, float(v)) for k, v in self.limits.peak.items()],
            ),
            S(
                "fflnode_streams_open",
                "gauge",
                "libp2p streams open: in all, and the most any one peer holds",
                [({"scope": k}, float(v)) for k, v in _stream_counts(self.host).items()],
            ),
            S(
                "fflnode_peak_rss_bytes",
                "gauge",
                "peak resident set size",
                [({}, peak_rss_mb() * 1024 * 1024)],
            ),
        ]
        if last is not None:
            evaluated = [x.metrics for x in rep.rounds if x.metrics is not None]
            out += [
                S(
                    "fflnode_train_loss",
                    "gauge",
                    "mean inner loss of the last round",
                    [({}, last.loss)],
                ),
                S(
                    "fflnode_task_metric",
                    "gauge",
                    "the task's metrics at the last evaluation, by name",
                    [({"name": k}, v) for scores in evaluated[-1:] for k, v in scores.items()],
                ),
                S(
                    "fflnode_consensus_gap",
                    "gauge",
                    "mean relative distance to neighbours",
                    [({}, last.consensus_gap)],
                ),
                S(
                    "fflnode_peers_missing",
                    "gauge",
                    "peers absent from the last round's exchange",
                    [({}, float(last.peers - last.received))],
                ),
            ]
        return out

    def _finish(self, report: NodeReport) -> None:
        report.bytes_sent = self.traffic.total_sent
        report.bytes_received = self.traffic.total_received
        report.traffic = {
            "sent": dict(self.traffic.sent),
            "received": dict(self.traffic.received),
            "rejected": dict(self.traffic.rejected),
        }
        report.peak_rss_mb = peak_rss_mb()
        write_json_atomic(self.data_dir / RESULT_FILE, asdict(report))

    def record_failure(self, error: BaseException) -> None:
        """Write result.json for a run that failed, so the failure is on record."""
        if self.report is None:
            self.report = NodeReport(
                str(self.peer_id or ""), self.cfg.train.partition_index, self.cfg.train.task
            )
        self.report.error = f"{type(error).__name__}: {error}"
        self._finish(self.report)

    # ----------------------------------------------------------------------- parts
    async def _rejoin(self, membership: Membership, ckpt: checkpoint.Checkpoint) -> list[ID]:
        """After a restart: the members from the checkpoint; wait (bounded) to hear one."""
        members = [ID.from_base58(m) for m in ckpt.members]
        self.notifier.status(f"rejoining after round {ckpt.round}")
        others = [m for m in members if m != membership.me]
        await membership.wait_until(
            lambda: any(membership.is_alive(m) for m in others), self.cfg.run.start_timeout_s
        )
        return members

    async def _exchange(
        self, host: Any, members: list[ID], membership: Membership
    ) -> RoundExchange:
        """The round exchange over this run's topology (fixed, drawn from the run seed):
        exact averaging on the complete graph, consensus gossip on sparse ones."""
        assert self.trainer is not None
        e, run = self.cfg.exchange, self.cfg.run
        by_bytes = {p.to_bytes(): p for p in members}
        me = host.get_id()
        peers = [
            by_bytes[b]
            for b in topology.neighbours(
                run.topology, list(by_bytes), me.to_bytes(), 0, run.seed, run.degree
            )
        ]
        log.info("mixing with: %s", ", ".join(short_peer(str(p)) for p in peers))
        if self.report is not None:
            self.report.mixing_with = [str(p) for p in peers]
        common = dict(
            peers=peers,
            chunk_elems=e.chunk_elems,
            round_timeout_s=e.round_timeout_s,
            traffic=self.traffic,
            liveness=membership,
        )
        sharded = reduce_scatters(self.cfg)
        complete = len(peers) == len(members) - 1
        if complete and sharded:  # everyone, plain mean: reduce-scatter then all-gather
            return ShardedAveraging(
                host,
                run.run_id,
                run.seed,
                self.comp.codec,
                error_feedback=e.codec != "none",  # lossy codecs always feed back
                me=me,
                **common,
            )
        if complete:  # everyone: the exact mean needs no copies
            return Averaging(
                host,
                run.run_id,
                run.seed,
                self.comp.codec,
                error_feedback=e.codec != "none",  # lossy codecs always feed back
                me=me,
                robust=e.robust,
                trim=e.trim,
                **common,
            )
        return Gossip(
            host,
            run.run_id,
            run.seed,
            self.comp.codec,
            # off the loop: an out-of-core trainer reads it from its block file
            initial=await trio.to_thread.run_sync(self.trainer.flat),
            gamma=e.gamma,
            **common,
        )

    def _merge_session(
        self, host: Any, membership: Membership, members: list[ID], layout: FlatLayout, attempt: int
    ) -> MergeSession:
        cfg = self.cfg
        self._merge = MergeSession(
            host,
            membership,
            cfg.run.run_id,
            members,
            layout,
            shards=cfg.merge.shards,
            quorum=cfg.merge.quorum,
            window=cfg.merge.window,
            piece_elems=cfg.merge.piece_elems,
            timeout_s=cfg.merge.timeout_s,
            traffic=self.traffic,
            seed=cfg.run.seed,
            exclude_outliers=cfg.merge.exclude_outliers,
            store_options=self.comp.store_options,
            attempt=attempt,
            on_phase=self.notifier.status,
            fastpath=self.fast,
        )
        return self._merge

    async def _on_channel(self, peer: ID, channel: Channel) -> None:
        """node.fast_path's handler: a channel a peer opened is the current merge's."""
        if self._merge is not None:
            await self._merge.handle_channel(peer, channel)

    @staticmethod
    def _next_merge_attempt(merge: MergeSession, error: BaseException) -> int | None:
        """The merge attempt to make after `error`, or None when it must not be retried:
        not a merge failure, this node excluded, the hashes disagreeing, the deadline
        passed, or no attempts left. A member lost mid-merge, or peers that moved on, get
        another attempt."""
        final = MergeExcluded | MergeMismatch | MergeTimeout
        if not isinstance(error, MergeError) or isinstance(error, final):
            return None
        attempt = error.attempt if isinstance(error, MergeRetry) else merge.attempt + 1
        if attempt >= MERGE_ATTEMPTS:
            return None
        log.warning("merge attempt %d failed: %s; trying again (%d)", merge.attempt, error, attempt)
        return attempt

    async def _watchdog(self) -> None:
        """WATCHDOG=1 from the event loop itself: a stalled loop stops the pings."""
        interval = watchdog_interval_s()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)  # a period, not synchronisation

    async def _bootstrap(self, host: Any) -> None:
        pending = list(self.cfg.node.bootstrap)
        delay = DIAL_BACKOFF_S[0]
        while pending:
            for addr in list(pending):
                try:
                    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
                except Exception as e:  # multiaddr raises assorted types
                    raise ConfigError(
                        f"{self.cfg.source}: node.bootstrap {addr!r} is not a /p2p/ multiaddr: {e}"
                    ) from None
                try:
                    with trio.fail_after(streams.RPC_SLACK_S):
                        await host.connect(info)
                    pending.remove(addr)
                    log.info("connected to bootstrap peer %s", short_peer(str(info.peer_id)))
                except (trio.TooSlowError, *streams.STREAM_ERRORS) as e:
                    if (refused := refusal(e)) is not None:
                        log.warning("bootstrap %s refused: %s", addr, refused)
                    else:
                        log.debug("bootstrap %s not reachable yet: %s", addr, e)
                    # A restarted peer is held in the dial negative cache for 60 s.
                    host.get_network().unblock_peer(info.peer_id)
            if pending:
                await trio.sleep(delay)  # back-off between redials
                delay = min(delay * 2, DIAL_BACKOFF_S[1])

    def _write_premerge(self, path: Path, layout: FlatLayout) -> None:
        if self.trainer is None:  # a merge-only task writes its own, piece by piece
            self.comp.task.task.write_premerge(  # type: ignore[union-attr]
                path, self.cfg.run.seed, self.cfg.train.partition_index
            )
            return
        metadata = {"fflnode.run": self.cfg.run.run_id}
        if self.adversary is not None and self.adversary.active:
            tensors = self.trainer.state_tensors()
            tensors = {k: self.adversary.corrupt(v) for k, v in tensors.items()}
            save_tensors(path, tensors, metadata)
            return
        # an out-of-core trainer writes it stage by stage from its block file
        self.trainer.write_state_file(path, metadata)

    def _merged_metrics(self, path: Path) -> dict[str, float]:
        """The task's metrics on the merged weights (loaded into the trainer's model)."""
        assert self.trainer is not None
        self.trainer.load_state_file(path)  # out of core: stage by stage
        return self.trainer.evaluate()

    @staticmethod
    def _record_merge(report: NodeReport, outcome: MergeOutcome) -> None:
        report.merged_hash = outcome.hash
        report.merge = {
            "members": outcome.members,
            "shards": outcome.shards,
            "owned": outcome.owned,
            "seconds": outcome.seconds,
            "phases": outcome.phase_seconds,
            "excluded": outcome.excluded,
            "attempt": outcome.attempt,
        }


__all__ = ["MergeError", "Node", "NodeReport"]
