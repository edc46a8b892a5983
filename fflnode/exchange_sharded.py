"""A round as a reduce-scatter then an all-gather (GradsSharding per round), for the
exact codec and for lossy ones.

Theory of operation. The run's members (agreed at the start barrier, canonical order:
ascending peer-ID bytes) cut the flat Delta into N shards; shard s is owned by member
s mod N, so every member owns exactly one and every node computes the same plan. The
chunks a Delta is encoded and requested by (`spans`) are cut inside each shard, so a
shard is a whole number of chunks. Each round:

1. Publish. A node keeps its Delta and its start-of-round state digest in the outbox
   (fflnode.exchange). The exact codec serves "piece" requests: a raw float32 range of
   it, with the digest in the header's meta. A lossy codec publishes its encoded chunks
   (error feedback on the sender, as the all-gather does) and serves them as "delta"
   chunks. An empty "piece" is a probe: the digest alone, for either.
2. Reduce-scatter. The owner of shard s probes every live member for its digest, keeps
   those with the most common one (fflnode.exchange.majority_start: a restarted or
   drifted node is left out by every owner alike), and pulls their pieces of shard s in
   canonical order, at most REDUCE_WINDOW members fetched ahead of the one being added,
   into one float64 accumulator: the result is float32(sum / count), bit-exact whatever
   order the pieces arrived in (a lossy codec's chunks are decoded first; the owner's
   own contribution is its decoded estimate, what any receiver would decode). A member
   contributes all its pieces or nothing (a pull that fails leaves it out of that
   shard), and the result carries the bitmap of who contributed and the majority digest.
   A lossy codec's owner then re-encodes the mean (plus its own residual of that shard:
   owner-side error feedback) with `codec.for_mean()` (holo: the least-squares scale)
   in chunk contexts of their own (`REDUCED_CHUNK`), and the decoded re-encoding is the
   shard's result: what the owner applies is what every gatherer decodes.
3. All-gather. Every node pulls each shard's result from its owner ("reduced"), which
   answers once it has reduced. If the owner is dead, frozen or fails, the node reduces
   that shard itself from the members' outboxes (step 2): the same canonical result
   whenever it sees the same contributors (a lossy re-encoding without the owner's
   residual, which no other node holds: deterministic in the codec's context), and
   otherwise a difference that the next round's majority start digest repairs (the node
   in the minority resyncs).

Bytes per node per round: its pieces to N - 1 owners and its shard to N - 1 gatherers,
about 2 |theta| (N - 1) / N whatever N is (the all-to-all exchange was (N - 1) |theta|);
a lossy codec at b bits moves b/32 of that (1 bit, 4 nodes: 3/64 |theta|, against the
all-gather's 3/32). Aggregation memory: one shard's float64 accumulator plus
REDUCE_WINDOW shards in flight, O(|theta| / N), and for a lossy codec the owner's
residual of its shard. The price of a lossy codec here is a second quantisation, of the
mean, which the owner's error feedback carries into the next round (measured on the LM
in docs/benchmarks.md, "Lossy reduce-scatter").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import trio
from libp2p.peer.id import ID

from fflnode import wire
from fflnode.codecs import Encoded
from fflnode.errors import FflError, WireError
from fflnode.exchange import START_KEY, Averaging, Published, RoundReport, majority_start
from fflnode.p2p import bulk

log = logging.getLogger(__name__)

PIECE, REDUCED = "piece", "reduced"  # `what` of a member's raw Delta range, a shard result
# Chunk-context offset of an owner's re-encoding of its shard's mean: chunk i of the mean
# is encoded as chunk REDUCED_CHUNK + i, so its seeded randomness (holo's rotation) is
# independent of the members' encodings of chunk i, whose errors it would otherwise
# repeat rather than average. Far above any chunk count a wire header can index.
REDUCED_CHUNK = 1 << 40
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
    chunks: list[Encoded] | None = None  # a lossy codec: the owner's encoding of the mean

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


def raw_values(arrays: dict, req: bulk.Request, peer: str, what: str) -> np.ndarray:
    """The float32 range an exact piece or shard result carries (WireError if not that)."""
    values = arrays.get("values")
    if set(arrays) != {"values"} or values.shape != (req.hi - req.lo,):
        raise WireError(peer, "schema", f"{what} [{req.lo}, {req.hi}) misshapen")
    return values


def codec_meta(meta: dict) -> dict:
    """A lossy shard result's header meta less the result's own keys: the codec's."""
    return {
        k: v
        for k, v in meta.items()
        if k not in (START_KEY, COUNT_KEY) and not (k[:1] == "c" and k[1:].isdigit())
    }


class ShardedAveraging(Averaging):
    """Averaging by per-round reduce-scatter and all-gather (the plain mean: robust none).
    The exact codec is bit-exact; a lossy one is re-encoded by each shard's owner."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        if self.robust != "none":
            raise ValueError("the sharded exchange takes the plain mean only (robust 'none')")
        self.exact = self.codec.name == "none"
        self.members = sorted([*self.peers, self.me], key=lambda p: p.to_bytes())
        self.index = {p: i for i, p in enumerate(self.members)}
        self.results: dict[tuple[int, int], ShardResult] = {}
        self.result_ready: dict[tuple[int, int], trio.Event] = {}
        # A lossy codec's owner-side error feedback: what its re-encodings of our shard's
        # mean left out, carried into the next round (empty until the first).
        self.owner_residual: torch.Tensor | None = None if self.exact else torch.empty(0)
        self.mean_codec = self.codec.for_mean()  # what owners re-encode a mean with

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

    def spans(self, numel: int) -> list[tuple[int, int]]:
        """The chunks of a Delta, cut inside each shard: a shard is whole chunks."""
        return [p for lo, hi, _ in self.shards(numel) for p in self.pieces(lo, hi)]

    def shard_chunks(self, numel: int, s: int) -> list[tuple[int, int, int]]:
        """(chunk index, lo, hi) of the chunks of shard s, in `spans` order."""
        first = sum(len(self.pieces(lo, hi)) for lo, hi, _ in self.shards(numel)[:s])
        lo, hi, _ = self.shards(numel)[s]
        return [(first + k, a, b) for k, (a, b) in enumerate(self.pieces(lo, hi))]

    # ------------------------------------------------------------------ publish
    def encode(self, round: int, delta: torch.Tensor, start: int) -> Published:
        """The exact codec: the raw Delta (what receivers reduce is what we hold). A
        lossy one: its chunks with the sender's error feedback (Averaging.encode)."""
        if not self.exact:
            return super().encode(round, delta, start)
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
            assert pub.estimate is not None
            numel = pub.estimate.numel()
            if not (0 <= lo <= hi <= numel and hi - lo <= self.chunk_elems):
                raise bulk.Unavailable("bad-request", f"range [{lo}, {hi}) not served")
            if hi > lo and not self.exact:  # a lossy codec's Delta goes out encoded only
                raise bulk.Unavailable("codec", f"this run uses codec {self.codec.name!r}")
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
        numel = pub.estimate.numel() if pub is not None and pub.estimate is not None else 0
        slo, shi, _ = self.shards(numel)[s]
        if not (slo <= lo < hi <= shi and hi - lo <= self.chunk_elems):
            raise bulk.Unavailable("bad-request", f"range [{lo}, {hi}) is not in shard {s}")
        if res.chunks is None:
            return "none", [("values", res.values[lo - slo : hi - slo])], res.meta()
        k = (lo - slo) // self.chunk_elems
        if self.pieces(slo, shi)[k] != (lo, hi):
            raise bulk.Unavailable("bad-request", f"range [{lo}, {hi}) is not a chunk of {s}")
        enc = res.chunks[k]
        return enc.codec, list(enc.parts.items()), res.meta()

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

    async def reduce(self, round: int, s: int, numel: int, *, owner: bool) -> ShardResult:
        """Shard s of `round`, reduced from the members' outboxes: by its owner, or by a
        node whose owner did not answer (`owner` False: no owner-side feedback)."""
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

        async def one(k: int, i: int) -> None:
            if k >= REDUCE_WINDOW:  # at most REDUCE_WINDOW members fetched ahead
                await added[k - REDUCE_WINDOW].wait()
            buf = await self._fetch(self.members[i], round, s, numel, majority)
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
        mean = acc.astype(np.float32)
        if self.exact:
            return ShardResult(mean, majority, delivered)
        chunks, values = await trio.to_thread.run_sync(self._reencode, round, s, numel, mean, owner)
        return ShardResult(values, majority, delivered, chunks)

    def _reencode(
        self, round: int, s: int, numel: int, mean: np.ndarray, feedback: bool
    ) -> tuple[list[Encoded], np.ndarray]:
        """A lossy codec's encoding of shard s's mean, chunk by chunk, and its decoding
        (the shard's result). With `feedback` (the owner) the residual of our shard is
        added first and what the encoding leaves out is kept for the next round."""
        target = torch.from_numpy(mean)
        res = self.owner_residual
        if feedback and res is not None and res.shape == target.shape:
            target = target + res
        lo = self.shards(numel)[s][0]
        chunks, values = [], torch.empty_like(target)
        for i, a, b in self.shard_chunks(numel, s):
            ctx = self.ctx(round, REDUCED_CHUNK + i, a, b)
            enc = self.mean_codec.encode(target[a - lo : b - lo].contiguous(), ctx)
            values[a - lo : b - lo] = self.mean_codec.decode(enc, ctx)
            chunks.append(enc)
        if feedback:
            self.owner_residual = target - values
        return chunks, values.numpy()

    async def _fetch(
        self, peer: ID, round: int, s: int, numel: int, majority: int
    ) -> np.ndarray | None:
        """Member `peer`'s shard s of its round Delta (decoded), whole or None."""
        lo, hi, _ = self.shards(numel)[s]
        pub = self.published[round]
        if peer == self.me:
            assert pub.estimate is not None
            return pub.estimate[lo:hi].numpy()
        buf = np.empty(hi - lo, dtype=np.float32)
        if self.exact:

            def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
                buf[req.lo - lo : req.hi - lo] = raw_values(arrays, req, str(peer), "piece")

            requests = [bulk.Request(round, PIECE, 0, a, b, "none") for a, b in self.pieces(lo, hi)]
            return buf if await self.pull(peer, requests, on_piece, hi - lo) else None

        def keep(req: bulk.Request, enc: Encoded, decoded: torch.Tensor) -> None:
            buf[req.lo - lo : req.hi - lo] = decoded.numpy()

        start = await self._pull_round(peer, round, numel, keep, self.shard_chunks(numel, s))
        if start is None:
            return None
        if start != majority:  # the probe said otherwise
            self.traffic.reject("schema", str(peer), "chunks from another start than probed")
            return None
        return buf

    async def _own(self, round: int, s: int, numel: int) -> None:
        key = (round, s)
        try:
            self.results[key] = await self.reduce(round, s, numel, owner=True)
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
        chunks = self.shard_chunks(numel, s)
        chunk_of = {(a, b): i for i, a, b in chunks}

        async def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            meta = dict(header.meta)
            metas.append(meta)
            if self.exact:
                buf[req.lo - lo : req.hi - lo] = raw_values(arrays, req, str(owner), "shard")
                return
            enc = Encoded(header.codec, dict(arrays), codec_meta(meta))
            # A request's index names the shard; the chunk's context is its index in
            # `spans`, known from its range.
            ctx = self.ctx(round, REDUCED_CHUNK + chunk_of[(req.lo, req.hi)], req.lo, req.hi)
            est = await trio.to_thread.run_sync(self._decode, enc, ctx, str(owner), self.mean_codec)
            buf[req.lo - lo : req.hi - lo] = est.numpy()

        if self.liveness.is_alive(owner):
            requests = [
                bulk.Request(round, REDUCED, s, a, b, self.codec.name) for _, a, b in chunks
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
            return await self.reduce(round, s, numel, owner=False)
        except ShardUnavailable as e:  # nobody's contribution: not one peer's doing
            log.warning("round %d: %s", round, e)
            return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        if self.owner_residual is not None:
            out["ef.owner_residual"] = self.owner_residual
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if self.owner_residual is not None and "ef.owner_residual" in state:
            self.owner_residual = state["ef.owner_residual"]

    async def gather(self, round: int) -> tuple[torch.Tensor, RoundReport]:
        pub = self.published[round]
        assert pub.estimate is not None
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
