"""The training rounds of one node: resume, step, exchange, resync, checkpoint.

Owns the loop between the start barrier and the final merge. Each round: local steps,
encode and publish Delta, gather the peers' (fflnode.exchange), outer step, record the
state peers may resync from, checkpoint. Under churn (fflnode.exchange, "Staying in
consensus under churn"):
* a node whose peers' heartbeats report rounds ahead of it by more than one jumps to
  their round (it restarted, or was left out while frozen): it cannot be waited for;
* a node that sees fewer than a quorum of the run's members (itself included) starts no
  round until it sees them again: cut off from the majority (a pulled cable, a
  partition) it would only train alone, and the rounds it ran ahead, announced once it
  is back, would make the majority jump forward and skip them. Back, it is behind: it
  jumps and resyncs as above. Cut off for longer than `quorum_wait_s`, it gives up
  (QuorumLost: the run fails, a restart resumes from the checkpoint). A round in which
  no peer's contribution arrived is evidence of a cut before liveness says so (its
  deadlines adapt to load, so a pulled cable can take up to ~17 s to declare): the next
  round waits for a quorum of members heard from since that round ended;
* a node that started a round from a state other than the majority's does not apply
  its own mean but adopts a majority peer's state after the round, digest-verified;
* after every `checkpoint_every` rounds the whole state goes to disk atomically, and a
  restarted node resumes from it (then jumps and resyncs as above). Writing (three
  fsyncs) takes longer than a testnet round, so a writer task takes the newest state
  while the next round runs; a state superseded before it was written is skipped, the
  last round's is always flushed before the merge.
Everything heavy runs in worker threads; the loop only moves tensors and waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio
from libp2p.peer.id import ID

from fflnode import checkpoint
from fflnode.errors import FflError
from fflnode.exchange import (
    Averaging,
    DiskState,
    Gossip,
    RoundExchange,
    RoundReport,
    StateSnapshot,
    state_digest,
)
from fflnode.p2p.membership import Membership
from fflnode.sdnotify import Notifier
from fflnode.train.trainer import LocalTrainer

log = logging.getLogger(__name__)

# A node whose peers are this many rounds ahead was left behind (restarted, frozen, cut
# off): peers never wait more than one round for a node they still count on.
BEHIND_BY = 2


def _reader(v: checkpoint.Vector) -> Callable[[int, int], torch.Tensor]:
    """(lo, hi) -> elements of a checkpoint's vector, read from its file if lazy."""
    if isinstance(v, checkpoint.FileVector):
        return v.read
    t = checkpoint.whole(v)
    return lambda lo, hi: t[lo:hi]


class QuorumLost(FflError):
    """This node saw fewer than a quorum of the run's members for too long."""


@dataclass
class RoundRecord:
    round: int
    loss: float
    metrics: dict[str, float] | None  # the task's evaluate(), every train.eval_every rounds
    peers: int
    received: int
    missing: list[str]
    bytes_out: int
    consensus_gap: float
    seconds: float
    excluded: list[str] = field(default_factory=list)
    resynced_from: str | None = None  # averaging: the peer whose whole state we adopted
    resynced: list[str] = field(default_factory=list)  # gossip: neighbours pulled whole


class RoundRunner:
    def __init__(
        self,
        *,
        trainer: LocalTrainer,
        exchange: RoundExchange,
        membership: Membership,
        notifier: Notifier,
        data_dir: Path,
        run_id: str,
        members: list[ID],
        rounds: int,
        eval_every: int,
        checkpoint_every: int,
        records: list[RoundRecord],
        quorum: int,
        quorum_wait_s: float,
        adversary: Any | None = None,
    ) -> None:
        """`quorum`: the fewest members, this node included, it must see alive to start a
        round (the merge's quorum: a group that could not merge has nothing to train
        for); `quorum_wait_s`: how long it waits for them before QuorumLost."""
        self.trainer = trainer
        self.exchange = exchange
        self.membership = membership
        self.notifier = notifier
        self.data_dir = data_dir
        self.run_id = run_id
        self.members = members
        self.rounds = rounds
        self.eval_every = eval_every
        self.checkpoint_every = checkpoint_every
        self.records = records
        self.quorum = quorum
        self.quorum_wait_s = quorum_wait_s
        self.adversary = adversary  # fflnode_harness.adversary, resilience tests only
        self.next_round = 0
        # set when a round received no peer's contribution: count only members heard
        # from since then (trio time) towards the quorum of the next round
        self._silent_since: float | None = None
        self.resumed_from: int | None = None
        self.jumps: list[tuple[int, int]] = []
        self._pending: checkpoint.Checkpoint | None = None
        self._pending_event = trio.Event()
        self._written = trio.Event()
        self._written_round = -1
        self.checkpoints_written = 0
        # An out-of-core trainer keeps its outer moments on disk only when its rounds
        # stream; in a run that cannot stream them they stay in memory (and resume there).
        self.streamed = trainer is not None and self._streams()
        if trainer is not None:
            trainer.streams_rounds = self.streamed

    # ------------------------------------------------------------------ resume
    def resume(self, ckpt: checkpoint.Checkpoint) -> None:
        """Continue after the checkpoint's round, from its state (loaded lazily or not:
        a streamed run reads it chunk by chunk into the trainer's block file)."""
        vectors = [ckpt.weights, *(ckpt.outer[k] for k in ("m", "v") if k in ckpt.outer)]
        residual = ckpt.exchange.get("ef.residual")
        if self.streamed:
            self.trainer.load_state_ranges([_reader(v) for v in vectors], ckpt.outer_step)
            if residual is not None and residual.shape == (self.trainer.numel,):
                self.trainer.load_residual(_reader(residual))  # the trainer keeps it on disk
        else:
            whole = [checkpoint.whole(v) for v in vectors]
            self.trainer.load_state_vectors(whole, ckpt.outer_step)
            if (load := getattr(self.exchange, "load_state_dict", None)) is not None:
                load({k: checkpoint.whole(v) for k, v in ckpt.exchange.items()})
        if ckpt.sampler is not None:
            self.trainer.load_sampler_state(checkpoint.whole(ckpt.sampler))
        self.next_round = ckpt.round + 1
        self.exchange.first_round = self.next_round
        self.resumed_from = ckpt.round
        log.info("resumed from the checkpoint after round %d", ckpt.round)

    def _snapshot(self, r: int) -> checkpoint.Checkpoint:
        """A copy of the state after round r (the writer runs while training goes on)."""
        t = self.trainer
        weights, *moments = t.state_vectors()
        outer = {k: v.clone() for k, v in zip(("m", "v"), moments, strict=False)}
        state = {k: v.clone() for k, v in getattr(self.exchange, "state_dict", dict)().items()}
        return checkpoint.Checkpoint(
            self.run_id,
            r,
            [str(p) for p in self.members],
            t.outer.t,
            weights,
            outer,
            state,
            t.sampler_state(),
        )

    def _save_streamed(self, r: int) -> None:
        """Write the checkpoint after round r from the out-of-core trainer's block file,
        chunk by chunk, now: the regions it reads are rewritten by the next outer step,
        so it cannot wait for a writer task as _snapshot's copy does."""
        t = self.trainer
        (weights, *moments), residual = t.chunked_state()
        checkpoint.save(
            self.data_dir,
            checkpoint.Checkpoint(
                self.run_id,
                r,
                [str(p) for p in self.members],
                t.outer.t,
                weights,
                dict(zip(("m", "v"), moments, strict=False)),
                {} if residual is None else {"ef.residual": residual},
                t.sampler_state(),
            ),
        )
        self.checkpoints_written += 1
        self._written_round = r

    async def _write_checkpoints(self) -> None:
        """Write the newest pending checkpoint, again and again, until cancelled."""
        while True:
            await self._pending_event.wait()
            self._pending_event = trio.Event()
            ckpt, self._pending = self._pending, None
            if ckpt is not None:
                await trio.to_thread.run_sync(checkpoint.save, self.data_dir, ckpt)
                self.checkpoints_written += 1
                self._written_round = ckpt.round
                self._written.set()
                self._written = trio.Event()

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_checkpoints)
            r, last = self.next_round, None
            while r < self.rounds:
                await self._await_quorum(r)
                r = self._caught_up(r)
                if r >= self.rounds:
                    break
                record = await self._round(r)
                self.records.append(record)
                if record.peers and not record.received:
                    self._silent_since = trio.current_time()
                due = (r + 1) % self.checkpoint_every == 0 or r + 1 == self.rounds
                if due and self.streamed:
                    await trio.to_thread.run_sync(self._save_streamed, r)
                elif due:
                    self._pending = await trio.to_thread.run_sync(self._snapshot, r)
                    self._pending_event.set()
                    last = r
                r += 1
            while last is not None and self._written_round < last:  # flush the final one
                await self._written.wait()
            nursery.cancel_scope.cancel()

    def reachable(self) -> int:
        """The run's members this node sees alive, itself included (after a round that
        received nothing, only those heard from since it ended)."""
        m, since = self.membership, self._silent_since
        return 1 + sum(
            1
            for p in self.members
            if p != m.me and m.is_alive(p) and (since is None or m.heard_since(p, since))
        )

    async def _await_quorum(self, r: int) -> None:
        """Return once a quorum of members is reachable; QuorumLost after quorum_wait_s."""
        seen = self.reachable()
        if seen >= self.quorum:
            self._silent_since = None
            return
        log.warning(
            "round %d: %d of the run's %d members reachable, below the quorum %d: "
            "waiting up to %g s for them before training on",
            r,
            seen,
            len(self.members),
            self.quorum,
            self.quorum_wait_s,
        )
        self.notifier.status(f"waiting for a quorum: {seen}/{self.quorum} members reachable")
        if not await self.membership.wait_until(
            lambda: self.reachable() >= self.quorum, self.quorum_wait_s
        ):
            raise QuorumLost(
                f"round {r}: only {self.reachable()} of the run's {len(self.members)} members "
                f"reachable for {self.quorum_wait_s:g} s (quorum {self.quorum}): this node is "
                "cut off from the run (check its network), or too many members are gone"
            )
        log.info("round %d: %d members reachable again", r, self.reachable())
        self._silent_since = None

    def _caught_up(self, r: int) -> int:
        """The round to run now: r, or the round a majority of the run's other live
        members reached when we were left behind.

        A majority, never the maximum: one member (or an admitted outsider) claiming
        round 2**31 - 1 in a heartbeat must not make honest nodes skip the run.
        """
        member = set(self.members)
        rounds = sorted(
            (
                v.round
                for p, v in self.membership.peers.items()
                if p in member and self.membership.is_alive(p)
            ),
            reverse=True,
        )
        ahead = rounds[len(rounds) // 2] if rounds else r
        if ahead >= r + BEHIND_BY:
            log.warning("peers are at round %d, we are at %d: catching up", ahead, r)
            self.jumps.append((r, ahead))
            self.exchange.first_round = ahead
            return ahead
        return r

    def _streams(self) -> bool:
        """Whether this round goes chunk by chunk from the trainer's disk (out of core,
        the plain mean over the complete graph, all-gathered; no adversary)."""
        return (
            self.trainer.streams_rounds
            and type(self.exchange) is Averaging
            and self.exchange.robust == "none"
            and self.adversary is None
        )

    async def _round_streamed(self, r: int) -> tuple[float, RoundReport, str | None]:
        """An averaging round that holds no |θ|-sized vector: the start state, Delta, its
        encoding's residual, the mean and the outer step go chunk by chunk through the
        out-of-core trainer's block file (fflnode.train.outofcore), every pass in a
        worker thread; the peers' encodings (b/32 of |θ| each) are what stays in RAM.
        The state after the round is served to resyncing peers from that file."""
        trainer, exchange = self.trainer, self.exchange
        assert isinstance(exchange, Averaging)
        await trio.to_thread.run_sync(trainer.begin_round)
        loss = await trio.to_thread.run_sync(trainer.inner_steps, abandon_on_cancel=True)
        start = await trio.to_thread.run_sync(trainer.start_digest)
        residual = trainer.residual_store() if exchange.residual is not None else None
        pub = await trio.to_thread.run_sync(
            exchange.encode_chunks, r, trainer.delta_chunks(), start, residual
        )
        exchange.publish(r, pub)
        mean_of, rep = await exchange.gather_streamed(r, trainer.numel)
        resynced = None
        if not rep.in_sync:
            resynced = await self._resync(r, rep.kept_peers)
        if resynced is None:  # in sync, or no majority state: apply our own mean
            await trio.to_thread.run_sync(trainer.outer_step_chunks, mean_of)
        generation = trainer.generation  # served from disk until the next outer step
        exchange.record_state(
            r,
            DiskState(
                trainer.numel,
                trainer.outer.t,
                trainer.read_state,
                trainer.start_digest,  # digested once, when first asked (or next round)
                lambda: trainer.generation == generation,
            ),
        )
        return loss, rep, resynced

    async def _round(self, r: int) -> RoundRecord:
        trainer = self.trainer
        t0 = time.perf_counter()
        self.membership.round = r
        if self.streamed:
            loss, rep, resynced = await self._round_streamed(r)
            return await self._finish_round(r, t0, loss, rep, resynced)
        start_vectors = await trio.to_thread.run_sync(trainer.state_vectors)
        theta_start = start_vectors[0]
        loss = await trio.to_thread.run_sync(trainer.inner_steps, abandon_on_cancel=True)
        theta_local = await trio.to_thread.run_sync(trainer.flat)
        resynced = None
        if isinstance(self.exchange, Averaging):
            start = await trio.to_thread.run_sync(state_digest, start_vectors, trainer.outer.t)
            delta = theta_start - theta_local
            if self.adversary is not None:
                delta = self.adversary.corrupt(delta)
            pub = await trio.to_thread.run_sync(self.exchange.encode, r, delta, start)
            self.exchange.publish(r, pub)
            g, rep = await self.exchange.gather(r)
            if rep.in_sync:
                await trio.to_thread.run_sync(trainer.outer_step, theta_start, g)
            else:
                resynced = await self._resync(r, rep.kept_peers)
                if resynced is None:  # keep our own mean: the nearest state we have
                    await trio.to_thread.run_sync(trainer.outer_step, theta_start, g)
        else:
            # Sparse graphs: the outer optimizer steps on this node's own progress, then
            # gossip averages the results. An adaptive outer step on theta_start - theta_mix
            # would normalise the consensus term (neighbours' disagreement) along with the
            # progress, and drown it: 4 non-IID digits nodes on a ring learnt nothing that
            # way (docs/architecture.md, "Sparse graphs").
            assert isinstance(self.exchange, Gossip)
            await trio.to_thread.run_sync(
                trainer.outer_step, theta_start, theta_start - theta_local
            )
            theta_half = await trio.to_thread.run_sync(trainer.flat)
            public = theta_half
            if self.adversary is not None:
                public = theta_start - self.adversary.corrupt(theta_start - theta_half)
            pub = await trio.to_thread.run_sync(self.exchange.encode, r, public)
            self.exchange.publish(r, pub)
            theta_mix, rep = await self.exchange.gather(r, theta_half)
            await trio.to_thread.run_sync(trainer.load_flat, theta_mix)
        vectors = await trio.to_thread.run_sync(trainer.state_vectors)
        self.exchange.record_state(r, StateSnapshot.of(vectors, trainer.outer.t))
        return await self._finish_round(r, t0, loss, rep, resynced)

    async def _finish_round(
        self, r: int, t0: float, loss: float, rep: RoundReport, resynced: str | None
    ) -> RoundRecord:
        trainer = self.trainer
        scores = None
        if (r + 1) % self.eval_every == 0 or r + 1 == self.rounds:
            scores = await trio.to_thread.run_sync(trainer.evaluate)
        status = f"round {r + 1}/{self.rounds} loss {loss:.3f} peers {rep.received}/{rep.peers}"
        if scores is not None:  # evaluated rounds carry the task's metrics after a "|"
            status += " | " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
        self.notifier.status(status)
        log.log(logging.INFO if scores is not None else logging.DEBUG, status)
        return RoundRecord(
            r,
            loss,
            scores,
            rep.peers,
            rep.received,
            rep.missing,
            rep.bytes_out,
            rep.consensus_gap,
            time.perf_counter() - t0,
            rep.excluded,
            resynced,
            rep.resynced,
        )

    async def _resync(self, r: int, majority: list[ID]) -> str | None:
        """Adopt a majority peer's state after round r; the first that delivers it whole."""
        assert isinstance(self.exchange, Averaging)
        numel = self.trainer.numel
        for peer in majority:
            snap = await self.exchange.fetch_state(peer, r, numel)
            if snap is not None:
                await trio.to_thread.run_sync(
                    self.trainer.load_state_vectors, snap.vectors, snap.step
                )
                log.warning("round %d: out of sync; adopted the state of %s", r, peer)
                return str(peer)
        log.warning(
            "round %d: out of sync and no majority peer delivered its state; applying our own"
            " mean, the next round resynchronises again",
            r,
        )
        return None
