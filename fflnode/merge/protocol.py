"""The final global merge over libp2p: agree, reduce-scatter, all-gather, verify.

Theory of operation.
1. Agree on participants (fflnode.agreement, two phases: propose, lock, commit). Each
   node proposes the run members it sees alive (itself included) in `merge.ready`
   announcements, re-sent every heartbeat; once its view has been stable for
   AGREE_SETTLE_S and every member of it proposes the same, it locks that set, and it
   commits once every member has locked it. A node locks one set only, so two nodes
   can never merge different sets (a proposal alone could: a member that matched a
   peer's view and committed, while that peer's view changed, split a merge on a loaded
   2-core testnet). Fewer than `quorum` members, a set committed without this node, or
   no agreement by the deadline, is a MergeError. Each proposal carries the fingerprint
   of its sender's premerge weights; on agreement every member drops the outliers by
   one rule (fflnode.merge.fingerprint) and the rest merge. An excluded node learns it
   the same way and stops with MergeExcluded.
   A member lost after agreement (killed, frozen) fails the shards that needed it; the
   node then starts attempt k + 1 (node.py, up to MERGE_ATTEMPTS): every message and
   request names its attempt, older ones are ignored or refused, a node that hears of a
   newer attempt joins it, and the new agreement leaves the lost member out, so its
   shards get new owners.
2. Plan. Every participant computes the same plan (fflnode.merge.plan): M shards of the
   flat vector, owners by rendezvous hashing over the agreed members.
3. Reduce-scatter. An owner pulls its shard from every member in canonical order
   (ascending peer-ID bytes), piece by piece, a bounded window ahead, and adds into a
   float64 accumulator (fflnode.merge.reduce). It holds O(|theta|/M) plus the window,
   never the model. A member that cannot deliver fails the shard loudly.
4. All-gather. Every node pulls each merged shard from its owner and writes it at its
   place in merged.safetensors (atomic: temp file, fsync, rename).
5. Verify. Each node hashes its merged file, announces the hash with the digest of the
   member list, and waits for every member's. Any difference is a MergeError.

Premerge pieces are read from the node's premerge file through Prism (io_uring into a
bounded slot pool), so serving costs one piece of memory per open request, whatever the
model size; the merged file is hashed through it the same way.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from fflnode import wire
from fflnode.agreement import Agreement, Decision
from fflnode.errors import FflError, MergeError, short_peer
from fflnode.merge import fingerprint
from fflnode.merge.plan import Shard, canonical_members, plan
from fflnode.merge.reduce import CanonicalReducer
from fflnode.p2p import bulk
from fflnode.p2p.membership import HEARTBEAT_S, Membership
from fflnode.prism.store import TensorStore
from fflnode.prism.writer import AtomicSafetensorsWriter
from fflnode.tensors import FlatLayout, ModelHasher

log = logging.getLogger(__name__)

MERGE_PROTOCOL = "/fflnode/merge/1.0.0"
# Attempts to pull one member's shard before the shard fails: a transient stream reset
# on a loaded machine should not sink a merge, a dead member should sink it quickly.
PULL_ATTEMPTS = 3
PULL_RETRY_DELAY_S = 1.0
# Shards reduced or gathered at once by one node: 2 overlaps one transfer's latency
# with another's, and bounds memory at 2 shard accumulators.
SHARD_PARALLELISM = 2
# After verifying, wait this long at most for every member to say it is done too, so
# nobody exits while a peer may still be pulling from it.
DONE_GRACE_S = 30.0
# A member lost mid-merge costs one attempt; three survive two losses in a row, and a
# run that keeps losing members that fast has a bigger problem than the merge.
MERGE_ATTEMPTS = 3
# A node's view of the live members must hold still this long before it locks it: two
# missed heartbeats, so a member whose heartbeat is late for a moment on a loaded
# machine is not merged without (a member that really died stays gone).
AGREE_SETTLE_S = 2.0


@dataclass
class MergeOutcome:
    hash: str
    members: list[str]
    shards: int
    owned: list[int]
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # agreed member -> why left out
    attempt: int = 0  # the attempt that completed (> 0: a member was lost mid-merge)


class MergeRetry(MergeError):
    """Peers moved on to a newer attempt of the merge: join it."""

    def __init__(self, attempt: int) -> None:
        super().__init__(f"peers started merge attempt {attempt}")
        self.attempt = attempt


class MergeTimeout(MergeError):
    """The merge deadline passed; another attempt would wait as long again."""


class MergeMismatch(MergeError):
    """The merged hashes disagree: a correctness failure, never retried."""


class MergeExcluded(MergeError):
    """This node's weights are an outlier by the rule every member applies."""


def members_digest(members: list[ID]) -> str:
    h = hashlib.sha256()
    for m in canonical_members([p.to_bytes() for p in members]):
        h.update(len(m).to_bytes(2, "big") + m)
    return h.hexdigest()


class MergeSession:
    """One node's part in the run's final merge."""

    def __init__(
        self,
        host: IHost,
        membership: Membership,
        run_id: str,
        run_members: list[ID],
        layout: FlatLayout,
        *,
        shards: int,
        quorum: int,
        window: int,
        piece_elems: int,
        timeout_s: float,
        traffic: bulk.Traffic,
        store_options: dict[str, object] | None = None,
        seed: int = 0,
        exclude_outliers: bool = True,
        attempt: int = 0,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.host = host
        self.membership = membership
        self.run_id = run_id
        self.run_members = set(run_members)
        self._run_member_names = {str(p) for p in run_members}
        self.layout = layout
        self.shards_cfg = shards
        self.quorum = quorum or len(run_members) // 2 + 1  # 0: a majority of the run
        self.window = window
        self.piece_elems = piece_elems
        self.timeout_s = timeout_s
        self.traffic = traffic
        self.store_options = dict(store_options or {})
        self.seed = seed
        self.attempt = attempt
        self.on_phase = on_phase or (lambda status: None)  # systemd STATUS= of each phase
        self.newer_attempt = attempt  # the highest attempt a run member announced
        self.exclude_outliers = exclude_outliers
        self.fingerprint: bytes = b""
        self.fingerprints: dict[ID, bytes | None] = {}
        self.me = host.get_id()
        self.premerge: TensorStore | None = None
        self.premerge_ready = trio.Event()
        self.agreed: list[ID] | None = None
        self.agreed_event = trio.Event()
        self.plan: list[Shard] = []
        self.results: dict[int, np.ndarray] = {}
        self.result_ready: dict[int, trio.Event] = {}
        self.failed: dict[int, str] = {}
        self.agreement = Agreement(
            str(self.me),
            quorum=self.quorum,
            eligible=self._run_member_names.__contains__,
            settle_s=AGREE_SETTLE_S,
        )
        self.hashes: dict[ID, tuple[str, str]] = {}
        membership.on("merge.ready", self._on_ready)
        membership.on("merge.hash", self._on_hash)

    # ------------------------------------------------------------------ announcements
    def _on_ready(self, peer: ID, msg: wire.Message) -> None:
        # A proposal naming a peer outside the run is no proposal (_agree looks each up).
        if peer not in self.run_members or not self._run_member_names.issuperset(msg["members"]):
            return
        attempt = msg.fields.get("attempt", 0)
        self.newer_attempt = max(self.newer_attempt, attempt)
        if attempt == self.attempt and msg["shards"] == self._m(msg["members"]):
            self.agreement.heard(str(peer), msg["members"], msg["stage"])
            self.fingerprints[peer] = msg.fields.get("fp")

    def _on_hash(self, peer: ID, msg: wire.Message) -> None:
        if peer in self.run_members and msg.fields.get("attempt", 0) == self.attempt:
            self.hashes[peer] = (msg["hash"], msg["digest"])

    def _m(self, members: list[ID]) -> int:
        return self.shards_cfg or len(members)

    # ------------------------------------------------------------------ serving
    async def handle(self, stream: INetStream) -> None:
        await bulk.serve(stream, MERGE_PROTOCOL, self.run_id, self._resolve, self.traffic)

    async def _resolve(self, peer: str, msg: wire.Message) -> bulk.Resolved:
        if peer not in self._run_member_names:  # before waiting: outsiders wait for nothing
            raise bulk.Unavailable("not-member", "requester is not a member of this run")
        if msg["round"] != self.attempt:
            raise bulk.Unavailable("stale-attempt", f"this node is at merge attempt {self.attempt}")
        with trio.move_on_after(self.timeout_s):
            await self.agreed_event.wait()
        if self.agreed is None or peer not in {str(p) for p in self.agreed}:
            raise bulk.Unavailable("not-member", "requester is not an agreed merge member")
        lo, hi, j = msg["lo"], msg["hi"], msg["index"]
        if not (0 <= j < len(self.plan) and self.plan[j].lo <= lo < hi <= self.plan[j].hi):
            raise bulk.Unavailable("bad-request", f"range [{lo}, {hi}) is not in shard {j}")
        if hi - lo > self.piece_elems:
            raise bulk.Unavailable("bad-request", f"piece of {hi - lo} > {self.piece_elems}")
        if msg["what"] == "premerge":
            await self.premerge_ready.wait()
            values = await self._read_premerge(lo, hi)
        elif msg["what"] == "merged":
            shard = self.plan[j]
            if shard.owner != self.me.to_bytes():
                raise bulk.Unavailable("not-owner", f"shard {j} is owned elsewhere")
            with trio.move_on_after(self.timeout_s):
                await self.result_ready[j].wait()
            if j in self.failed or j not in self.results:
                raise bulk.Unavailable("failed", self.failed.get(j, f"shard {j} not reduced"))
            values = self.results[j][lo - shard.lo : hi - shard.lo]
        else:
            raise bulk.Unavailable("bad-request", f"{MERGE_PROTOCOL} does not serve {msg['what']}")
        return "none", [("values", values)], {}

    # ------------------------------------------------------------------ the merge
    async def run(self, premerge_path: Path, out_path: Path) -> MergeOutcome:
        t0 = time.perf_counter()
        phases: dict[str, float] = {}
        self.premerge = TensorStore.open(premerge_path, **self.store_options)  # type: ignore[arg-type]
        if not self.premerge.is_flat_float32() or self.premerge.numel != self.layout.numel:
            raise MergeError(f"{premerge_path}: not the run's canonical float32 flat checkpoint")
        self.premerge_ready.set()
        self.fingerprint = await self._fingerprint()
        with trio.move_on_after(self.timeout_s) as deadline:
            outcome = await self._run_phases(t0, phases, out_path)
        if deadline.cancelled_caught:
            stage = "agree on members" if self.agreed is None else "complete"
            raise MergeTimeout(
                f"merge attempt {self.attempt} did not {stage} within merge.timeout_s"
                f" = {self.timeout_s:.0f} s (alive run members: {len(self.membership.alive())})"
            )
        return outcome

    async def _run_phases(
        self, t0: float, phases: dict[str, float], out_path: Path
    ) -> MergeOutcome:
        excluded: dict[str, str] = {}
        async with trio.open_nursery() as announcer:
            members = await self._agree(announcer)
            if self.exclude_outliers:
                members, excluded = self._drop_outliers(members)
            phases["agree"] = time.perf_counter() - t0
            digest = members_digest(members)
            member_bytes = canonical_members([p.to_bytes() for p in members])
            self.plan = plan(self.run_id, self.layout.numel, self._m(members), member_bytes)
            self.result_ready = {s.index: trio.Event() for s in self.plan}
            self.agreed = members
            self.agreed_event.set()
            owned = [s for s in self.plan if s.owner == self.me.to_bytes()]
            self.on_phase(f"merge agreed: {len(members)} members, attempt {self.attempt}")
            log.info(
                "merge: %d members agreed, %d shards, this node owns %s",
                len(members),
                len(self.plan),
                [s.index for s in owned],
            )
            t1 = time.perf_counter()
            await self._bounded(owned, lambda s: self._reduce(s, member_bytes))
            phases["reduce_scatter"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            with AtomicSafetensorsWriter.for_flat(
                out_path, self.layout, {"fflnode.run": self.run_id, "fflnode.digest": digest}
            ) as writer:
                await self._bounded(self.plan, lambda s: self._gather(s, writer))
                await trio.to_thread.run_sync(writer.commit)
            phases["all_gather"] = time.perf_counter() - t2
            my_hash = await self._hash_file(out_path)
            await self._verify(members, my_hash, digest)
            phases["verify"] = time.perf_counter() - t2 - phases["all_gather"]
            announcer.cancel_scope.cancel()
        return MergeOutcome(
            my_hash,
            [str(p) for p in members],
            len(self.plan),
            [s.index for s in owned],
            time.perf_counter() - t0,
            phases,
            excluded,
            self.attempt,
        )

    async def _fingerprint(self) -> bytes:
        """The premerge weights' fingerprint, streamed piece by piece through Prism."""
        fp = fingerprint.Fingerprinter(self.seed)
        for lo in range(0, self.layout.numel, self.piece_elems):
            hi = min(lo + self.piece_elems, self.layout.numel)
            piece = await self._read_premerge(lo, hi)
            await trio.to_thread.run_sync(fp.add, piece, lo)
        return fp.to_bytes()

    def _drop_outliers(self, members: list[ID]) -> tuple[list[ID], dict[str, str]]:
        """The agreed members minus those whose fingerprint is an outlier."""
        fps = {str(p): self.fingerprints.get(p) for p in members if p != self.me}
        fps[str(self.me)] = self.fingerprint
        verdict = fingerprint.outliers(fps, len(self.fingerprint))
        for peer, why in verdict.excluded.items():
            log.warning("merge: excluding %s: %s", short_peer(peer), why)
        if str(self.me) in verdict.excluded:
            raise MergeExcluded(f"excluded from the merge: {verdict.excluded[str(self.me)]}")
        kept = [p for p in members if str(p) not in verdict.excluded]
        if len(kept) < self.quorum:
            raise MergeError(
                f"{len(kept)} members after excluding outliers, below the quorum {self.quorum}"
            )
        return kept, verdict.excluded

    def close(self) -> None:
        """Release the premerge file once no member can need it (after wait_all_done)."""
        if self.premerge is not None:
            self.premerge.close()

    async def _read_premerge(self, lo: int, hi: int) -> np.ndarray:
        assert self.premerge is not None
        out = np.empty(hi - lo, dtype=np.float32)
        await self.premerge.read_into(lo, hi, out)
        return out

    async def _hash_file(self, path: Path) -> str:
        """The model hash of a file, streamed through Prism chunk by chunk."""
        hasher = ModelHasher()
        async with TensorStore.open(path, **self.store_options) as store:  # type: ignore[arg-type]
            for name in store.names():
                hasher.begin_tensor(name)
                async with store.tensor_chunks(name) as chunks:
                    async for chunk in chunks:
                        with chunk:
                            hasher.update(chunk.data)  # ~1 ms per 1 MiB slot
        return hasher.hexdigest()

    async def wait_all_done(self, members: list[str]) -> bool:
        """After verifying: wait (bounded) until every member reports phase 'done'."""
        others = [p for p in self.membership.peers if str(p) in members and p != self.me]

        def all_done() -> bool:
            return all(self.membership.peers[p].phase == "done" for p in others)

        return await self.membership.wait_until(all_done, DONE_GRACE_S)

    async def _bounded(self, shards: list[Shard], fn) -> None:  # type: ignore[no-untyped-def]
        limiter = trio.CapacityLimiter(SHARD_PARALLELISM)

        async def one(s: Shard) -> None:
            async with limiter:
                await fn(s)

        async with trio.open_nursery() as nursery:
            for s in shards:
                nursery.start_soon(one, s)

    # ------------------------------------------------------------------ 1. agreement
    async def _agree(self, announcer: trio.Nursery) -> list[ID]:
        by_str = {str(p): p for p in self.run_members}
        announced: tuple[tuple[str, ...], str] | None = None
        last_sent = -float("inf")
        while True:
            if self.newer_attempt > self.attempt:
                raise MergeRetry(self.newer_attempt)
            now = trio.current_time()
            alive = [str(p) for p in self.membership.alive() if p in self.run_members]
            decision = self.agreement.decide(alive, now)
            if decision.excluded:
                raise MergeError(
                    f"merge attempt {self.attempt}: {len(decision.members)} members agreed "
                    "without this node (it was not seen alive when they did)"
                )
            # Announce a change at once, an unchanged one once per heartbeat: every
            # announcement wakes every peer's loop, so answering each one would echo.
            if (decision.members, decision.stage) != announced or now - last_sent >= HEARTBEAT_S:
                await self._announce(decision)
                announced, last_sent = (decision.members, decision.stage), now
            if decision.committed:
                announcer.start_soon(self._keep_announcing, decision)
                return [by_str[p] for p in decision.members]
            with trio.move_on_after(HEARTBEAT_S):
                await self.membership.wait_changed()

    def _lost(self, members: list[ID]) -> list[ID]:
        """Agreed members that died or froze since (a verify wait ends early for them)."""
        return [p for p in members if p != self.me and not self.membership.is_alive(p)]

    async def _keep_announcing(self, decision: Decision) -> None:
        """Keep the commitment visible for members still converging."""
        while True:
            await trio.sleep(HEARTBEAT_S)  # a period, not synchronisation
            await self._announce(decision)

    async def _announce(self, decision: Decision) -> None:
        """Our proposal, with the fingerprint and the attempt every proposal carries."""
        await self.membership.publish(
            "merge.ready",
            members=list(decision.members),
            shards=self._m(decision.members),
            stage=decision.stage,
            fp=self.fingerprint,
            attempt=self.attempt,
        )

    # ------------------------------------------------------------------ 3. reduce
    async def _reduce(self, shard: Shard, members: list[bytes]) -> None:
        pieces = shard.pieces(self.piece_elems)
        reducer = CanonicalReducer(
            members, [(lo - shard.lo, hi - shard.lo) for lo, hi in pieces], self.window
        )
        try:
            for member in members:
                await self._pull_member(shard, member, pieces, reducer)
            self.results[shard.index] = await trio.to_thread.run_sync(reducer.result)
        except FflError as e:
            self.failed[shard.index] = f"shard {shard.index}: {e}"
            raise MergeError(f"shard {shard.index} reduction failed: {e}") from e
        finally:
            self.result_ready[shard.index].set()

    async def _pull_member(
        self,
        shard: Shard,
        member: bytes,
        pieces: list[tuple[int, int]],
        reducer: CanonicalReducer,
    ) -> None:
        piece_of = {lo: k for k, (lo, _) in enumerate(pieces)}
        if member == self.me.to_bytes():
            for k, (lo, hi) in enumerate(pieces):
                reducer.add(member, k, await self._read_premerge(lo, hi))
            return
        requests = [
            bulk.Request(self.attempt, "premerge", shard.index, lo, hi) for lo, hi in pieces
        ]

        def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            if set(arrays) != {"values"}:
                raise MergeError(f"shard {shard.index}: parts {sorted(arrays)}, not 'values'")
            reducer.add(member, piece_of[req.lo], arrays["values"])

        peer = ID(member)
        for attempt in range(1, PULL_ATTEMPTS + 1):
            done = [k for k, n in enumerate(reducer.next) if n > reducer.position[member]]
            todo = [r for r in requests if piece_of[r.lo] not in done]
            try:
                await bulk.pull(
                    self.host,
                    peer,
                    MERGE_PROTOCOL,
                    self.run_id,
                    todo,
                    on_piece,
                    self.traffic,
                    window=self.window,
                    wait_s=self.timeout_s / 2,
                    expected_bytes=4 * shard.numel,
                )
                return
            except FflError as e:
                if attempt == PULL_ATTEMPTS:
                    raise MergeError(
                        f"member {short_peer(str(peer))} did not deliver shard {shard.index} "
                        f"after {PULL_ATTEMPTS} attempts: {e}"
                    ) from e
                log.warning(
                    "merge: pulling shard %d from %s failed (%s); retrying",
                    shard.index,
                    short_peer(str(peer)),
                    e,
                )
                await trio.sleep(PULL_RETRY_DELAY_S)  # back-off before a retry

    # ------------------------------------------------------------------ 4. gather
    async def _gather(self, shard: Shard, writer: AtomicSafetensorsWriter) -> None:
        if shard.owner == self.me.to_bytes():
            await self.result_ready[shard.index].wait()
            if shard.index in self.failed:
                raise MergeError(self.failed[shard.index])
            await trio.to_thread.run_sync(writer.write_flat, shard.lo, self.results[shard.index])
            return
        requests = [
            bulk.Request(self.attempt, "merged", shard.index, lo, hi)
            for lo, hi in shard.pieces(self.piece_elems)
        ]

        async def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            values = arrays.get("values")
            if set(arrays) != {"values"} or values.dtype != np.float32:
                raise MergeError(f"shard {shard.index}: parts {sorted(arrays)}, not float32 values")
            if values.shape != (req.hi - req.lo,):
                raise MergeError(
                    f"shard {shard.index}: piece of shape {list(values.shape)} "
                    f"for [{req.lo}, {req.hi})"
                )
            await trio.to_thread.run_sync(writer.write_flat, req.lo, values)

        owner = ID(shard.owner)
        try:
            await bulk.pull(
                self.host,
                owner,
                MERGE_PROTOCOL,
                self.run_id,
                requests,
                on_piece,
                self.traffic,
                window=self.window,
                wait_s=self.timeout_s,
                expected_bytes=4 * shard.numel,
            )
        except FflError as e:
            raise MergeError(f"shard {shard.index} from owner {short_peer(str(owner))}: {e}") from e

    # ------------------------------------------------------------------ 5. verify
    async def _verify(self, members: list[ID], my_hash: str, digest: str) -> None:
        others = [p for p in members if p != self.me]

        def have_all() -> bool:
            done = all(p in self.hashes for p in others)
            return done or bool(self._lost(others)) or self.newer_attempt > self.attempt

        async def publish() -> None:
            while True:  # now, then every heartbeat: late joiners need our hash too
                await self.membership.publish(
                    "merge.hash", hash=my_hash, digest=digest, attempt=self.attempt
                )
                await trio.sleep(HEARTBEAT_S)  # a period, not synchronisation

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            await self.membership.wait_until(have_all, self.timeout_s)
            nursery.cancel_scope.cancel()
        missing = [short_peer(str(p)) for p in others if p not in self.hashes]
        if self.newer_attempt > self.attempt:
            raise MergeRetry(self.newer_attempt)
        if missing:
            raise MergeError(f"no merged hash from {', '.join(missing)}")
        wrong = [
            f"{short_peer(str(p))}={self.hashes[p][0][:12]}"
            for p in others
            if self.hashes[p] != (my_hash, digest)
        ]
        if wrong:
            raise MergeMismatch(
                f"merged hashes disagree: ours {my_hash[:12]} (members {digest[:8]}), "
                f"theirs {', '.join(wrong)}"
            )
