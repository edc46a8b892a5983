"""The training rounds of one node: resume, step, exchange, resync, checkpoint.

Owns the loop between the start barrier and the final merge. Each round: local steps,
encode and publish Delta, gather the peers' (fflnode.exchange), outer step, record the
state peers may resync from, checkpoint. Under churn (fflnode.exchange, "Staying in
consensus under churn"):
* a node whose peers' heartbeats report rounds ahead of it by more than one jumps to
  their round (it restarted, or was left out while frozen): it cannot be waited for;
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID

from fflnode import checkpoint
from fflnode.exchange import Averaging, Gossip, RoundExchange, StateSnapshot, state_digest
from fflnode.p2p.membership import Membership
from fflnode.sdnotify import Notifier
from fflnode.train.trainer import LocalTrainer

log = logging.getLogger(__name__)

# A node whose peers are this many rounds ahead was left behind (restarted, frozen, cut
# off): peers never wait more than one round for a node they still count on.
BEHIND_BY = 2


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
        adversary: Any | None = None,
    ) -> None:
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
        self.adversary = adversary  # fflnode_harness.adversary, resilience tests only
        self.next_round = 0
        self.resumed_from: int | None = None
        self.jumps: list[tuple[int, int]] = []
        self._pending: checkpoint.Checkpoint | None = None
        self._pending_event = trio.Event()
        self._written = trio.Event()
        self._written_round = -1
        self.checkpoints_written = 0

    # ------------------------------------------------------------------ resume
    def resume(self, ckpt: checkpoint.Checkpoint) -> None:
        """Continue after the checkpoint's round, from its state."""
        vectors = [ckpt.weights, *(ckpt.outer[k] for k in ("m", "v") if k in ckpt.outer)]
        self.trainer.load_state_vectors(vectors, ckpt.outer_step)
        if ckpt.sampler is not None:
            self.trainer.load_sampler_state(ckpt.sampler)
        load = getattr(self.exchange, "load_state_dict", None)
        if load is not None:
            load(ckpt.exchange)
        self.next_round = ckpt.round + 1
        self.exchange.first_round = self.next_round
        self.resumed_from = ckpt.round
        log.info("resumed from the checkpoint after round %d", ckpt.round)

    def _snapshot(self, r: int) -> checkpoint.Checkpoint:
        """A copy of the state after round r (the writer runs while training goes on)."""
        t = self.trainer
        outer = {k: v.clone() for k, v in (("m", t.outer.m), ("v", t.outer.v)) if v is not None}
        state = {k: v.clone() for k, v in getattr(self.exchange, "state_dict", dict)().items()}
        return checkpoint.Checkpoint(
            self.run_id,
            r,
            [str(p) for p in self.members],
            t.outer.t,
            t.flat(),
            outer,
            state,
            t.sampler_state(),
        )

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
                r = self._caught_up(r)
                if r >= self.rounds:
                    break
                self.records.append(await self._round(r))
                if (r + 1) % self.checkpoint_every == 0 or r + 1 == self.rounds:
                    self._pending = await trio.to_thread.run_sync(self._snapshot, r)
                    self._pending_event.set()
                    last = r
                r += 1
            while last is not None and self._written_round < last:  # flush the final one
                await self._written.wait()
            nursery.cancel_scope.cancel()

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

    async def _round(self, r: int) -> RoundRecord:
        trainer = self.trainer
        t0 = time.perf_counter()
        self.membership.round = r
        start_vectors = trainer.state_vectors()
        theta_start = start_vectors[0]
        loss = await trio.to_thread.run_sync(trainer.inner_steps, abandon_on_cancel=True)
        theta_local = trainer.flat()
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
            assert isinstance(self.exchange, Gossip)
            public = theta_local
            if self.adversary is not None:
                public = theta_start - self.adversary.corrupt(theta_start - theta_local)
            pub = await trio.to_thread.run_sync(self.exchange.encode, r, public)
            self.exchange.publish(r, pub)
            theta_mix, rep = await self.exchange.gather(r, theta_local)
            await trio.to_thread.run_sync(trainer.outer_step, theta_start, theta_start - theta_mix)
        self.exchange.record_state(r, StateSnapshot.of(trainer.state_vectors(), trainer.outer.t))
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
        numel = self.trainer.flat().numel()
        for peer in majority:
            snap = await self.exchange.fetch_state(peer, r, numel)
            if snap is not None:
                self.trainer.load_state_vectors(snap.vectors, snap.step)
                log.warning("round %d: out of sync; adopted the state of %s", r, peer)
                return str(peer)
        log.warning(
            "round %d: out of sync and no majority peer delivered its state; applying our own"
            " mean, the next round resynchronises again",
            r,
        )
        return None
