"""The exact codec's round as a reduce-scatter then an all-gather (GradsSharding per round).

Theory of operation. The run's members (agreed at the start barrier, canonical order:
ascending peer-ID bytes) cut the flat Delta into N shards; shard s is owned by member
s mod N, so every member owns exactly one and every node computes the same plan.
Each round:

1. Publish. A node keeps its Delta (float32) and its start-of-round state digest in the
   outbox (fflnode.exchange) and serves "piece" requests: a raw range of it, with the
   digest in the header's meta. An empty range is a probe: the digest alone.
2. Reduce-scatter. The owner of shard s probes every live member for its digest, keeps
   those with the most common one (fflnode.exchange.majority_start: a restarted or
   drifted node is left out by every owner alike), and pulls their pieces of shard s in
   canonical order, at most REDUCE_WINDOW members fetched ahead of the one being added,
   into one float64 accumulator: the result is float32(sum / count), bit-exact whatever
   order the pieces arrived in. A member contributes all its pieces or nothing (a pull
   that fails leaves it out of that shard), and the result carries the bitmap of who
   contributed and the majority digest.
3. All-gather. Every node pulls each shard's result from its owner ("reduced"), which
   answers once it has reduced. If the owner is dead, frozen or fails, the node reduces
   that shard itself from the members' outboxes (step 2): the same canonical result
   whenever it sees the same contributors, and otherwise a difference that the next
   round's majority start digest repairs (the node in the minority resyncs).

Bytes per node per round: its pieces to N - 1 owners and its shard to N - 1 gatherers,
about 2 |theta| (N - 1) / N whatever N is (the all-to-all exchange was (N - 1) |theta|).
Aggregation memory: one shard's float64 accumulator plus REDUCE_WINDOW shards in flight,
O(|theta| / N). Lossy codecs keep the all-gather of their compressed Deltas (Averaging):
at 1 bit per coordinate that is (N - 1) |theta| / 32 per node, less than this scheme's
2 |theta| below N = 64, and it avoids a second quantisation at the owner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import trio
from libp2p.peer.id import ID

from fflnode import wire
from fflnode.errors import FflError, WireError
from fflnode.exchange import START_KEY, Averaging, Published, RoundReport, majority_start
from fflnode.p2p import bulk

log = logging.getLogger(__name__)

PIECE, REDUCED = "piece", "reduced"  # `what` of a member's raw Delta range, a shard result
# Members whose shard pieces are fetched ahead of the one being added: 2 overlaps one
# transfer with the next while holding at most 2 shards' worth of pieces per reduction.
REDUCE_WINDOW = 2
# Bitmap of contributors in a result's meta: 62 members per integer (msgpack ints, and
# the wire's meta allows at most a few dozen entries).
BITS_PER_WORD = 62
COUNT_KEY = "count"


class ShardUnavailable(FflError):
    """No contribution to a shard could be gathered this round."""


@dataclass
class ShardResult:
    values: np.ndarray  # float32, the shard's canonical mean
    majority: int  # the start digest the contributors shared
    contributors: list[int]  # indices into the canonical member list

    def meta(self) -> dict[str, int]:
        words: dict[str, int] = {}
        for i in self.contributors:
            key = f"c{i // BITS_PER_WORD}"
            words[key] = words.get(key, 0) | (1 << (i % BITS_PER_WORD))
        return {START_KEY: self.majority, COUNT_KEY: len(self.contributors), **words}


def contributors_of(meta: dict, members: int, peer: str) -> list[int]:
    """The contributor indices a result's meta names (WireError if inconsistent)."""
    out = []
    for i in range(members):
        word = meta.get(f"c{i // BITS_PER_WORD}", 0)
        if isinstance(word, int) and word >> (i % BITS_PER_WORD) & 1:
            out.append(i)
    if meta.get(COUNT_KEY) != len(out) or not out:
        raise WireError(peer, "schema", "a shard result's contributors do not add up")
    return out


class ShardedAveraging(Averaging):
    """Exact averaging by per-round reduce-scatter and all-gather (codec none only)."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        if self.codec.name != "none":
            raise ValueError("the sharded exchange carries exact float32 Deltas only")
        self.members = sorted([*self.peers, self.me], key=lambda p: p.to_bytes())
        self.index = {p: i for i, p in enumerate(self.members)}
        self.results: dict[tuple[int, int], ShardResult] = {}
        self.result_ready: dict[tuple[int, int], trio.Event] = {}

    # ------------------------------------------------------------------ plan
    def shards(self, numel: int) -> list[tuple[int, int, ID]]:
        """(lo, hi, owner) of each shard: N near-equal ranges, shard s owned by member s."""
        n = len(self.members)
        base, extra = divmod(numel, n)
        out, lo = [], 0
        for s, owner in enumerate(self.members):
            hi = lo + base + (1 if s < extra else 0)
            out.append((lo, hi, owner))
            lo = hi
        return out

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.chunk_elems, hi)) for a in range(lo, hi, self.chunk_elems)]

    # ------------------------------------------------------------------ publish
    def encode(self, round: int, delta: torch.Tensor, start: int) -> Published:
        """The raw Delta (the exact codec: what receivers reduce is what we hold)."""
        return Published([], delta.detach().contiguous(), start=start)

    def bytes_out(self, round: int) -> int:
        return 0  # accounted as traffic per request (Traffic.sent)

    def _forget_before(self, r: int) -> None:
        super()._forget_before(r)
        for d in (self.results, self.result_ready):
            for key in [k for k in d if k[0] < r]:
                del d[key]

    # ------------------------------------------------------------------ serving
    async def _resolve(self, peer: str, msg: wire.Message) -> bulk.Resolved:
        if msg["what"] not in (PIECE, REDUCED):
            return await super()._resolve(peer, msg)
        self._check_request(peer, msg)
        r, lo, hi = msg["round"], msg["lo"], msg["hi"]
        if msg["what"] == PIECE:
            with trio.move_on_after(self.round_timeout_s):
                await self._event(self.ready, r).wait()
            pub = self.published.get(r)
            if pub is None:
                raise bulk.Unavailable("not-ready", f"round {r} not finished here")
            numel = pub.estimate.numel()
            if not (0 <= lo <= hi <= numel and hi - lo <= self.chunk_elems):
                raise bulk.Unavailable("bad-request", f"range [{lo}, {hi}) not served")
            return "none", [("values", pub.estimate[lo:hi].numpy())], {START_KEY: pub.start}
        s = msg["index"]
        if s >= len(self.members):
            raise bulk.Unavailable("bad-request", f"no shard {s}")
        key = (r, s)
        with trio.move_on_after(self.round_timeout_s):
            await self.result_ready.setdefault(key, trio.Event()).wait()
        res = self.results.get(key)
        if res is None:
            raise bulk.Unavailable("not-ready", f"shard {s} of round {r} not reduced here")
        pub = self.published.get(r)
        numel = pub.estimate.numel() if pub is not None else 0
        slo, shi, _ = self.shards(numel)[s]
        if not (slo <= lo < hi <= shi and hi - lo <= self.chunk_elems):
            raise bulk.Unavailable("bad-request", f"range [{lo}, {hi}) is not in shard {s}")
        return "none", [("values", res.values[lo - slo : hi - slo])], res.meta()

    # ------------------------------------------------------------------ reduce
    async def _probe(self, peer: ID, round: int, at: int) -> int | None:
        """A member's start digest for `round` (an empty piece), or None."""
        got: list[int] = []

        def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            start = header.meta.get(START_KEY)
            if not isinstance(start, int):
                raise WireError(str(peer), "schema", "a piece without its start digest")
            got.append(start)

        req = bulk.Request(round, PIECE, 0, at, at, "none")
        ok = await self.pull(peer, [req], on_piece, 0)
        return got[0] if ok and got else None

    async def reduce(self, round: int, s: int, numel: int) -> ShardResult:
        """Shard s of `round`, reduced from the members' outboxes (owner or fallback)."""
        lo, hi, _ = self.shards(numel)[s]
        pub = self.published[round]
        starts: dict[int, int] = {self.index[self.me]: pub.start}

        async def probe(peer: ID) -> None:
            got = await self._probe(peer, round, lo)
            if got is not None:
                starts[self.index[peer]] = got

        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                if self.liveness.is_alive(peer):
                    nursery.start_soon(probe, peer)
        majority = majority_start(starts.values())
        chosen = sorted(i for i, st in starts.items() if st == majority)
        acc = np.zeros(hi - lo, dtype=np.float64)
        delivered: list[int] = []
        added = [trio.Event() for _ in chosen]
        pieces = self.pieces(lo, hi)

        async def one(k: int, i: int) -> None:
            if k >= REDUCE_WINDOW:  # at most REDUCE_WINDOW members fetched ahead
                await added[k - REDUCE_WINDOW].wait()
            buf = await self._fetch(self.members[i], round, pieces, lo, hi)
            if k:
                await added[k - 1].wait()
            if buf is not None:  # canonical order: member k after member k - 1
                acc[:] += buf  # float32 -> float64 exactly, then one rounding per add
                delivered.append(i)
            added[k].set()

        async with trio.open_nursery() as nursery:
            for k, i in enumerate(chosen):
                nursery.start_soon(one, k, i)
        if not delivered:
            raise ShardUnavailable(f"shard {s}: no contribution arrived")
        acc /= len(delivered)
        return ShardResult(acc.astype(np.float32), majority, delivered)

    async def _fetch(
        self, peer: ID, round: int, pieces: list[tuple[int, int]], lo: int, hi: int
    ) -> np.ndarray | None:
        """Member `peer`'s pieces [lo, hi) of its round Delta, whole or None."""
        if peer == self.me:
            return self.published[round].estimate[lo:hi].numpy()
        buf = np.empty(hi - lo, dtype=np.float32)

        def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            values = arrays.get("values")
            if set(arrays) != {"values"} or values.shape != (req.hi - req.lo,):
                raise WireError(str(peer), "schema", f"piece [{req.lo}, {req.hi}) misshapen")
            buf[req.lo - lo : req.hi - lo] = values

        requests = [bulk.Request(round, PIECE, 0, a, b, "none") for a, b in pieces]
        return buf if await self.pull(peer, requests, on_piece, hi - lo) else None

    async def _own(self, round: int, s: int, numel: int) -> None:
        key = (round, s)
        try:
            self.results[key] = await self.reduce(round, s, numel)
        except ShardUnavailable as e:
            log.warning("round %d: could not reduce our shard %d: %s", round, s, e)
        finally:
            self.result_ready.setdefault(key, trio.Event()).set()

    # ------------------------------------------------------------------ gather
    async def _gather_shard(self, round: int, s: int, numel: int) -> ShardResult | None:
        lo, hi, owner = self.shards(numel)[s]
        if owner == self.me:
            await self.result_ready.setdefault((round, s), trio.Event()).wait()
            return self.results.get((round, s))
        buf = np.empty(hi - lo, dtype=np.float32)
        metas: list[dict] = []

        def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            values = arrays.get("values")
            if set(arrays) != {"values"} or values.shape != (req.hi - req.lo,):
                raise WireError(str(owner), "schema", f"shard [{req.lo}, {req.hi}) misshapen")
            buf[req.lo - lo : req.hi - lo] = values
            metas.append(dict(header.meta))

        if self.liveness.is_alive(owner):
            requests = [
                bulk.Request(round, REDUCED, s, a, b, "none") for a, b in self.pieces(lo, hi)
            ]
            if await self.pull(owner, requests, on_piece, hi - lo) and metas:
                try:
                    if any(m != metas[0] for m in metas):
                        raise WireError(str(owner), "schema", "pieces of one shard disagree")
                    who = contributors_of(metas[0], len(self.members), str(owner))
                    start = metas[0].get(START_KEY)
                    if isinstance(start, int):
                        return ShardResult(buf, start, who)
                    raise WireError(str(owner), "schema", "a shard result without its digest")
                except WireError as e:
                    self.traffic.reject_error(e, f"shard {s} result")
        # About the owner, so through the peer log: a member that never serves its shard
        # must not write a line a round (the fuzzer's insider drew 400 in 400 rounds).
        text = f"round {round}: reducing its shard {s} ourselves"
        self.traffic.peer_log.log(str(owner), "reduce-self", text, logging.INFO)
        try:
            return await self.reduce(round, s, numel)
        except ShardUnavailable as e:  # nobody's contribution: not one peer's doing
            log.warning("round %d: %s", round, e)
            return None

    async def gather(self, round: int) -> tuple[torch.Tensor, RoundReport]:
        pub = self.published[round]
        numel = pub.estimate.numel()
        n = len(self.members)
        results: dict[int, ShardResult | None] = {}

        async def gather_one(s: int) -> None:
            results[s] = await self._gather_shard(round, s, numel)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._own, round, self.index[self.me], numel)
            for s in range(n):
                nursery.start_soon(gather_one, s)
        mean = torch.zeros(numel, dtype=torch.float32)
        got = {s: r for s, r in results.items() if r is not None}
        for s, res in got.items():
            lo, hi, _ = self.shards(numel)[s]
            mean[lo:hi] = torch.from_numpy(res.values)
        majority = majority_start(r.majority for r in got.values()) if got else pub.start
        full = set.intersection(*(set(r.contributors) for r in got.values())) if got else set()
        seen = set.union(*(set(r.contributors) for r in got.values())) if got else set()
        me = self.index[self.me]
        kept = [self.members[i] for i in sorted(full) if i != me]
        missing = [str(p) for p in self.peers if self.index[p] not in seen]
        report = RoundReport(
            round,
            len(self.peers),
            len(kept),
            missing,
            [],
            0,
            0.0,
            [],
            in_sync=pub.start == majority and len(got) == n,
            kept_peers=kept,
        )
        if len(got) < n:
            log.warning(
                "round %d: %d of %d shards missing: applying our own mean", round, n - len(got), n
            )
        if not report.in_sync:
            self.out_of_sync.add(round)
            self._event(self.snapshot_ready, round).set()
        return mean, report


__all__ = ["PIECE", "REDUCED", "ShardedAveraging", "ShardResult"]
