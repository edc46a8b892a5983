"""The state phase of `fflnode run`: federate the task's SSM states after the weight merge.

Theory of operation. Once the weight merge has verified and the merged weights are in the
model, node.py calls `run_states` (only for a task with the state capability, [states]
not "off"). For each state epoch e (states.epochs of them, back to back):

1. Fold. The task's local contexts of epoch e (context id -> this node's segment) are
   folded into per-layer states by the MERGED model, FOLD_BATCH contexts per worker-thread
   call, and encoded once by the state codec (fflnode.ssm.state_codec); what the node
   composes and serves is decode(encode(states)), so every member uses the same bits.
   Its own states are written to data_dir/states/own-<e>.safetensors.
2. Agree (attempt a). As the weight merge does (fflnode.agreement: propose, lock,
   commit), over `states.ready` announcements on the run's state topic, which also carry
   the contexts each member holds (a bitmap). Eligible: the members the weight merge
   agreed (a later epoch: those of the epoch before); quorum: states.quorum, or a
   majority of the merge's members.
3. Pull. From every other member, the contexts it holds, `batch` consecutive contexts per
   request over /fflnode/state/1.0.0, each body validated against the LOCAL model's
   state spec (shape, dtype, finite, bounded, log-decay <= 0) before any of it is kept.
4. Compose and write. For every context any member holds, its holders' states in
   ascending peer-ID-bytes order (exact for one layer, approximate from layer 2 on), to
   data_dir/states/merged-<e>.safetensors (fflnode.ssm.epoch), hashed.
5. Verify. `states.hash` {hash, digest of the members} to and from every member; a
   different hash is StatesMismatch (exit code 3, as a weight-merge mismatch). Then each
   node says `done` and waits (at most DONE_GRACE_S) until every member did, so nobody
   leaves while a peer still needs its states or its hash.

Churn. A member that dies (or freezes, or is banned by the gate) during the phase fails
what needed it: the pulls from it, or the verify waiting for its hash. The node then
starts attempt a + 1 (up to STATE_ATTEMPTS; a node hearing of a newer attempt joins it):
the members agree again among those alive, so the lost member is left out and its
states are not composed: the contexts only it held are absent from the merged file, and
the share it held of the others is missing from their states (the report lists it under
"left_out"). States already pulled from the survivors are kept. Fewer than the quorum, no
agreement within states.timeout_s, or no attempts left: StatesError (exit code 1); the
merged weights of the run stay valid. A member whose bodies fail validation is counted
by the gate (and banned after access.blacklist_after offences); its states never enter.

Must never: compose states that did not validate, compose in any order but the canonical
one, or wait without a deadline.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID
from torch import nn

from fflnode.agreement import Agreement, Decision
from fflnode.errors import (
    ConfigError,
    FflError,
    FormatError,
    MergeError,
    WireError,
    leaf_error,
    short_peer,
)
from fflnode.p2p.bulk import Traffic
from fflnode.p2p.membership import HEARTBEAT_S, Membership
from fflnode.prism.reader import SafetensorsFile
from fflnode.prism.writer import save_tensors
from fflnode.ssm import epoch as ep
from fflnode.ssm.federation import STATE_PROTOCOL, StateBook, batch_tag
from fflnode.ssm.federation_net import StateFederation, StatePullError
from fflnode.ssm.state_codec import layer_shape, make_state_codec
from fflnode.ssm.states import LayerState, unstack_layers
from fflnode.train.task import StateTask

log = logging.getLogger(__name__)

# Contexts folded per worker-thread call: 64 one-layer MQAR segments take ~10 ms; the
# loop answers peers between calls.
FOLD_BATCH = 64
# A member lost mid-epoch costs one attempt; three survive two losses in a row (as the
# weight merge's MERGE_ATTEMPTS).
STATE_ATTEMPTS = 3
# Pulls of one member's states before the attempt fails: a stream reset on a loaded
# machine should not sink an epoch; a dead member should sink the attempt quickly.
PULL_ATTEMPTS = 3
PULL_RETRY_DELAY_S = 1.0
# A member's view of who is alive must hold this long before it locks (as the merge).
AGREE_SETTLE_S = 2.0
# After verifying, how long a node waits for every member to say `done` before leaving.
DONE_GRACE_S = 30.0
# A member of the committed set whose held contexts we have not heard yet announces
# them every heartbeat; this long without them fails the attempt.
HOLDINGS_WAIT_S = 10.0
# Fewer members alive than the quorum for this long (two membership timeouts: a member
# paused by a loaded machine comes back within one) ends the epoch at once, instead of
# at its deadline: nobody is coming.
QUORUM_LOST_S = 10.0


class StatesError(FflError):
    """The state phase could not complete (quorum, deadline, attempts): exit code 1."""


class StatesRetry(StatesError):
    """This attempt cannot complete (a member lost, a pull failed): try `attempt`."""

    def __init__(self, attempt: int, why: str) -> None:
        super().__init__(f"state attempt {attempt - 1} failed: {why}")
        self.attempt = attempt


class StatesMismatch(MergeError):
    """Members composed different states: a correctness failure, never retried."""


@dataclass(frozen=True)
class StatesPlan:
    """What the composition root checked and the phase needs (from [states] and [run])."""

    epochs: int
    codec: str
    bits: int
    batch: int
    quorum: int
    timeout_s: float
    seed: int
    partition: int
    nodes: int


def plan_states(cfg: Any, loaded: Any, model: nn.Module | None) -> StatesPlan | None:
    """The state phase of this run, checked now (ConfigError), or None when it has none."""
    mode = cfg.states.federate
    where = f"{cfg.source}: states.federate {mode!r}"
    if mode == "off":
        return None
    if not loaded.federates_states or model is None:
        if mode == "on":
            raise ConfigError(
                f"{where}: task {loaded.spec!r} has no state capability (state_spec, "
                "local_contexts, fold, evaluate_states: docs/tasks.md)"
            )
        return None
    task = loaded.task
    try:
        layer_shape(task.state_spec(model))
        contexts = task.local_contexts(cfg.train.partition_index, cfg.run.nodes, cfg.run.seed, 0)
        ep.check_contexts(contexts, f"task {loaded.spec!r}: local_contexts")
    except (ConfigError, FormatError) as e:
        raise ConfigError(f"{where}: {e}") from None
    make_state_codec(cfg.states.codec, cfg.states.bits, cfg.run.seed)
    return StatesPlan(
        epochs=cfg.states.epochs,
        codec=cfg.states.codec,
        bits=cfg.states.bits,
        batch=cfg.states.batch,
        quorum=cfg.states.quorum,
        timeout_s=cfg.states.timeout_s,
        seed=cfg.run.seed,
        partition=cfg.train.partition_index,
        nodes=cfg.run.nodes,
    )


@dataclass
class _Session:
    """One attempt of one epoch: its agreement and the hashes heard."""

    epoch: int
    attempt: int
    agreement: Agreement
    newer: int = 0  # the highest attempt of this epoch a member announced
    hashes: dict[ID, tuple[str, str]] = field(default_factory=dict)
    done: set[ID] = field(default_factory=set)


async def run_states(
    plan: StatesPlan,
    task: StateTask,
    model: nn.Module,
    *,
    membership: Membership,
    traffic: Traffic,
    members: Sequence[str],
    screen: Callable[[ID, Any], bool],
    data_dir: Path,
    status: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """Run the state epochs with the merge's `members`; returns the report's `states`."""
    phase = StatePhase(plan, task, model, membership, traffic, members, screen, data_dir, status)
    return await phase.run()


class StatePhase:
    def __init__(
        self,
        plan: StatesPlan,
        task: StateTask,
        model: nn.Module,
        membership: Membership,
        traffic: Traffic,
        members: Sequence[str],
        screen: Callable[[ID, Any], bool],
        data_dir: Path,
        status: Callable[[str], None],
    ) -> None:
        self.plan, self.task, self.model = plan, task, model
        self.membership, self.traffic, self.screen = membership, traffic, screen
        self.data_dir, self.status = data_dir, status
        self.me = membership.me
        self.spec = tuple(tuple(int(d) for d in s) for s in task.state_spec(model))
        self.codec = make_state_codec(plan.codec, plan.bits, plan.seed)
        self.book = StateBook(self.spec, self.me.to_bytes(), self.codec)
        self.fed = StateFederation(membership, self.book, traffic, batch=plan.batch)
        self.run_members = [ID.from_base58(m) for m in members]
        self.quorum = plan.quorum or len(self.run_members) // 2 + 1
        self.holdings: dict[tuple[int, ID], frozenset[int]] = {}
        self.session: _Session | None = None
        self.fed.on("states.ready", self._on_ready)
        self.fed.on("states.hash", self._on_hash)

    # ------------------------------------------------------------------ announcements
    def _on_ready(self, peer: ID, msg: Any) -> None:
        epoch = msg["epoch"]
        if peer not in self.run_members or not 0 <= epoch < self.plan.epochs:
            return
        held = ep.parse_held(msg["contexts"], msg["held"])
        known = self.holdings.setdefault((epoch, peer), held)
        if known != held:  # a member's contexts are fixed for an epoch
            self.traffic.reject("held", str(peer), f"states.ready: epoch {epoch} holdings changed")
            return
        s = self.session
        if s is None or epoch != s.epoch:
            return
        s.newer = max(s.newer, msg["attempt"])
        if msg["attempt"] == s.attempt:
            s.agreement.heard(str(peer), msg["members"], msg["stage"])

    def _on_hash(self, peer: ID, msg: Any) -> None:
        s = self.session
        if s is None or peer not in self.run_members or msg["epoch"] != s.epoch:
            return
        s.newer = max(s.newer, msg["attempt"])
        if msg["attempt"] == s.attempt:
            s.hashes[peer] = (msg["hash"], msg["digest"])
            if msg.get("done"):
                s.done.add(peer)

    # ------------------------------------------------------------------ the phase
    async def run(self) -> dict[str, Any]:
        (self.data_dir / ep.STATES_DIR).mkdir(parents=True, exist_ok=True)
        self.membership.pubsub.set_topic_validator(
            self.fed.topic, self.fed.validator(self.screen), False
        )
        records = []
        eligible = list(self.run_members)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.fed.run)
            for epoch in range(self.plan.epochs):
                record, eligible = await self._epoch(epoch, eligible)
                records.append(record)
            nursery.cancel_scope.cancel()
        return {"codec": batch_tag(self.codec), "batch": self.fed.batch, "epochs": records}

    async def _epoch(self, epoch: int, eligible: list[ID]) -> tuple[dict[str, Any], list[ID]]:
        t0 = time.perf_counter()
        sent0 = self.traffic.sent.get(STATE_PROTOCOL, 0)
        received0 = self.traffic.received.get(STATE_PROTOCOL, 0)
        own = await self._fold(epoch)
        seconds = {"fold": time.perf_counter() - t0}
        attempt = 0
        while True:
            try:
                outcome = await self._attempt(epoch, attempt, eligible, own, seconds)
                break
            except Exception as e:  # a nursery wraps what its body raised in a group
                retry = leaf_error(e)
                if not isinstance(retry, StatesRetry):
                    raise retry from None
                attempt = max(retry.attempt, attempt + 1)
                if attempt >= STATE_ATTEMPTS:
                    raise StatesError(f"state epoch {epoch}: no attempts left: {retry}") from None
                log.warning("state epoch %d: %s; trying again (attempt %d)", epoch, retry, attempt)
        members, digest, merged, path = outcome
        t = time.perf_counter()
        alone = await trio.to_thread.run_sync(self._evaluate, own, epoch)
        with_merged = await trio.to_thread.run_sync(self._evaluate, merged, epoch)
        seconds["evaluate"] = time.perf_counter() - t
        record = {
            "epoch": epoch,
            "attempt": attempt,
            "hash": digest,
            "file": str(path),
            "members": [str(p) for p in members],
            "left_out": [str(p) for p in self.run_members if p not in members],
            "contexts": len(merged),
            "held": len(own),
            "bytes_pulled": self.traffic.received.get(STATE_PROTOCOL, 0) - received0,
            "bytes_served": self.traffic.sent.get(STATE_PROTOCOL, 0) - sent0,
            "alone": alone,
            "merged": with_merged,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        }
        self.status(f"states epoch {epoch} merged {digest[:16]} with {len(members)}")
        return record, members

    async def _fold(self, epoch: int) -> dict[int, tuple[LayerState, ...]]:
        """Fold this node's contexts of `epoch`, hold them (encoded once), write own-<e>."""
        p = self.plan
        contexts = await trio.to_thread.run_sync(
            self.task.local_contexts, p.partition, p.nodes, p.seed, epoch
        )
        ids = ep.check_contexts(contexts, "the task's local_contexts")
        self.status(f"states epoch {epoch}: folding {len(ids)} contexts")
        own: dict[int, tuple[LayerState, ...]] = {}
        for lo in range(0, len(ids), FOLD_BATCH):
            chunk = ids[lo : lo + FOLD_BATCH]
            helds = await trio.to_thread.run_sync(self._fold_chunk, contexts, chunk, epoch)
            for c, held in zip(chunk, helds, strict=True):
                self.book.put_held(c, held)
                own[c] = held.states
            self.fed.book_changed()
        if own:
            tensors = ep.file_tensors(own)
            await trio.to_thread.run_sync(
                save_tensors, ep.own_path(self.data_dir, epoch), tensors, self._meta(epoch, [])
            )
        return own

    def _fold_chunk(self, contexts: Mapping[int, Any], chunk: list[int], epoch: int) -> list[Any]:
        states = self.task.fold(self.model, [contexts[c] for c in chunk])
        if len(states) != len(self.spec) or any(
            tuple(s.h.shape) != (len(chunk), *shape)
            for s, shape in zip(states, self.spec, strict=False)
        ):
            raise ConfigError(
                f"the task's fold returned {[tuple(s.h.shape) for s in states]} for "
                f"{len(chunk)} segments; state_spec says {list(self.spec)} per segment"
            )
        return [
            self.book.held_for(c, epoch, s)
            for c, s in zip(chunk, unstack_layers(states), strict=True)
        ]

    def _evaluate(self, states: Mapping[int, Sequence[LayerState]], epoch: int) -> dict:
        p = self.plan
        scores = self.task.evaluate_states(self.model, states, p.partition, p.nodes, p.seed, epoch)
        return {str(k): float(v) for k, v in dict(scores).items()}

    def _meta(self, epoch: int, members: list[ID]) -> dict[str, str]:
        return {
            "fflnode.run": self.membership.run_id,
            "fflnode.states.epoch": str(epoch),
            "fflnode.states.codec": batch_tag(self.codec),
            "fflnode.states.members": json.dumps([str(m) for m in members]),
        }

    # ------------------------------------------------------------------ one attempt
    async def _attempt(
        self,
        epoch: int,
        attempt: int,
        eligible: list[ID],
        own: dict[int, tuple[LayerState, ...]],
        seconds: dict[str, float],
    ) -> tuple[list[ID], str, dict[int, tuple[LayerState, ...]], Path]:
        names = {str(p) for p in eligible} | {str(self.me)}
        agreement = Agreement(
            str(self.me),
            quorum=self.quorum,
            eligible=names.__contains__,
            rank=lambda m: ID.from_base58(m).to_bytes(),
            settle_s=AGREE_SETTLE_S,
        )
        s = self.session = _Session(epoch, attempt, agreement, newer=attempt)
        n_bits, held = ep.held_bitmap(own)
        result = None
        with trio.move_on_after(self.plan.timeout_s) as deadline:
            async with trio.open_nursery() as announcer:
                t = time.perf_counter()
                members = await self._agree(s, eligible, n_bits, held, announcer)
                seconds["agree"] = seconds.get("agree", 0.0) + time.perf_counter() - t
                self.status(
                    f"states epoch {epoch} agreed: {len(members)} members, attempt {attempt}"
                )
                holdings = await self._holdings(s, members, own)
                t = time.perf_counter()
                await self._pull_all(s, holdings)
                seconds["pull"] = seconds.get("pull", 0.0) + time.perf_counter() - t
                t = time.perf_counter()
                merged, path, digest = await self._compose(epoch, members, holdings)
                seconds["compose"] = time.perf_counter() - t
                t = time.perf_counter()
                await self._verify(s, members, digest)
                seconds["verify"] = time.perf_counter() - t
                announcer.cancel_scope.cancel()
                result = (members, digest, merged, path)
        if deadline.cancelled_caught or result is None:
            raise StatesError(
                f"state epoch {epoch} attempt {attempt} did not complete within "
                f"states.timeout_s = {self.plan.timeout_s:g} s "
                f"(alive members: {len(self.membership.alive())})"
            )
        return result

    async def _agree(
        self, s: _Session, eligible: list[ID], n_bits: int, held: bytes, announcer: trio.Nursery
    ) -> list[ID]:
        eligible_set = set(eligible)
        announced: tuple[tuple[str, ...], str] | None = None
        last_sent = -float("inf")
        short_since: float | None = None  # since when fewer than the quorum are alive

        async def announce(decision: Decision) -> None:
            await self.fed.publish(
                "states.ready",
                epoch=s.epoch,
                attempt=s.attempt,
                members=list(decision.members),
                stage=decision.stage,
                contexts=n_bits,
                held=held,
            )

        while True:
            if s.newer > s.attempt:
                raise StatesRetry(s.newer, "peers moved on to a newer attempt")
            now = trio.current_time()
            alive = [str(p) for p in self.membership.alive() if p in eligible_set]
            if len(alive) + 1 >= self.quorum:
                short_since = None
            elif short_since is None:
                short_since = now
            elif now - short_since >= QUORUM_LOST_S:
                raise StatesError(
                    f"state epoch {s.epoch}: {len(alive) + 1} members alive, below the quorum "
                    f"{self.quorum}, for {QUORUM_LOST_S:g} s"
                )
            decision = s.agreement.decide(alive, now)
            if decision.excluded:
                raise StatesError(
                    f"state epoch {s.epoch}: {len(decision.members)} members agreed without "
                    "this node (it was not seen alive when they did)"
                )
            if (decision.members, decision.stage) != announced or now - last_sent >= HEARTBEAT_S:
                await announce(decision)
                announced, last_sent = (decision.members, decision.stage), now
            if decision.committed:

                async def keep_announcing(decision: Decision = decision) -> None:
                    while True:  # members still converging need our commitment
                        await trio.sleep(HEARTBEAT_S)  # a period, not synchronisation
                        await announce(decision)

                announcer.start_soon(keep_announcing)
                return [ID.from_base58(m) for m in decision.members]
            with trio.move_on_after(HEARTBEAT_S):
                await self.fed.wait_heard()

    async def _holdings(
        self, s: _Session, members: list[ID], own: Mapping[int, object]
    ) -> dict[bytes, frozenset[int]]:
        """Every member's held contexts (ours included), waiting (bounded) for any not
        heard yet: a member that committed announces them every heartbeat."""

        def known() -> bool:
            return all((s.epoch, p) in self.holdings for p in members if p != self.me)

        if not await self.membership.wait_until(known, HOLDINGS_WAIT_S):
            raise StatesRetry(s.attempt + 1, "a member's held contexts were never heard")
        out = {p.to_bytes(): self.holdings[(s.epoch, p)] for p in members if p != self.me}
        out[self.me.to_bytes()] = frozenset(own)
        return out

    async def _pull_all(self, s: _Session, holdings: Mapping[bytes, frozenset[int]]) -> None:
        plan = ep.receive_plan(self.me.to_bytes(), holdings)
        failed: dict[ID, str] = {}

        async def one(peer: ID, contexts: list[int]) -> None:
            for k in range(1, PULL_ATTEMPTS + 1):
                todo = [c for c in contexts if not self.book.has(peer.to_bytes(), c, s.epoch)]
                if not todo:
                    return
                try:
                    await self.fed.pull(peer, todo, s.epoch)
                    return
                except WireError as e:  # counted by the gate already
                    failed[peer] = f"invalid states: {e}"
                    return
                except StatePullError as e:
                    if k == PULL_ATTEMPTS or not self.membership.is_alive(peer):
                        failed[peer] = str(e)
                        return
                    log.warning(
                        "states: pulling from %s failed (%s); retrying", short_peer(str(peer)), e
                    )
                    await trio.sleep(PULL_RETRY_DELAY_S)  # back-off before a retry

        async with trio.open_nursery() as nursery:
            for peer_bytes, contexts in plan.items():
                nursery.start_soon(one, ID(peer_bytes), contexts)
        if failed:
            why = "; ".join(f"{short_peer(str(p))}: {w}" for p, w in failed.items())
            raise StatesRetry(s.attempt + 1, f"states not pulled from {why}")

    async def _compose(
        self, epoch: int, members: list[ID], holdings: Mapping[bytes, frozenset[int]]
    ) -> tuple[dict[int, tuple[LayerState, ...]], Path, str]:
        me = self.me.to_bytes()
        per_context = {
            c: self.book.members(c, epoch, [p for p in who if p != me], own=me in who)
            for c, who in ep.holders(holdings).items()
        }
        path = ep.merged_path(self.data_dir, epoch)
        meta = self._meta(epoch, members)

        def compose_and_write() -> tuple[dict[int, tuple[LayerState, ...]], str]:
            merged = ep.compose(per_context)
            save_tensors(path, ep.file_tensors(merged), meta)
            with SafetensorsFile(path) as f:  # the hash is of what the file holds
                written = f.tensors()
            return merged, ep.states_hash(written)

        merged, digest = await trio.to_thread.run_sync(compose_and_write)
        return merged, path, digest

    async def _verify(self, s: _Session, members: list[ID], my_hash: str) -> None:
        others = [p for p in members if p != self.me]
        digest = ep.members_digest(p.to_bytes() for p in members)
        done = False

        def lost() -> list[ID]:
            return [p for p in others if not self.membership.is_alive(p)]

        async def publish() -> None:
            while True:  # now, then every heartbeat: late members need our hash too
                await self.fed.publish(
                    "states.hash",
                    epoch=s.epoch,
                    attempt=s.attempt,
                    hash=my_hash,
                    digest=digest,
                    done=done,
                )
                await trio.sleep(HEARTBEAT_S)  # a period, not synchronisation

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)

            def heard_all() -> bool:
                return all(p in s.hashes for p in others) or bool(lost()) or s.newer > s.attempt

            await self.membership.wait_until(heard_all, self.plan.timeout_s)
            if s.newer > s.attempt:
                raise StatesRetry(s.newer, "peers moved on to a newer attempt")
            missing = [p for p in others if p not in s.hashes]
            if missing:
                raise StatesRetry(
                    s.attempt + 1,
                    f"no states hash from {', '.join(short_peer(str(p)) for p in missing)}",
                )
            wrong = [
                f"{short_peer(str(p))}={s.hashes[p][0][:12]}"
                for p in others
                if s.hashes[p] != (my_hash, digest)
            ]
            if wrong:
                raise StatesMismatch(
                    f"state epoch {s.epoch}: merged state hashes disagree: ours "
                    f"{my_hash[:12]} (members {digest[:8]}), theirs {', '.join(wrong)}"
                )
            done = True  # the next publish says so; wait for everyone's
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            every = await self.membership.wait_until(
                lambda: all(p in s.done or not self.membership.is_alive(p) for p in others),
                DONE_GRACE_S,
            )
            if not every:
                log.warning("state epoch %d: not every member said done in time", s.epoch)
            nursery.cancel_scope.cancel()


__all__ = [
    "StatesError",
    "StatesMismatch",
    "StatesPlan",
    "StatesRetry",
    "plan_states",
    "run_states",
]
