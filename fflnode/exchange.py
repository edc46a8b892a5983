"""The per-round exchange of pseudo-gradients: exact averaging or consensus gossip.

Each round a node encodes its Delta chunk by chunk with the run's codec and publishes
the encoding; the peers it mixes with pull it over `/fflnode/shard/1.0.0` (one stream
per peer, chunks pipelined, the pull waiting up to `round_timeout_s` for the serving
node to finish its round). Received chunks are validated by the codec and decoded off
the trio thread. Two strategies use this machinery:

* `Averaging` (the complete graph): every node pulls every member's Delta and takes the
  canonical mean (ascending peer-ID bytes, float64 sums) of the *decoded* estimates, its
  own included. All nodes thus compute the bit-identical pseudo-gradient and, from equal
  starting weights, the bit-identical outer step: exact consensus, no copies kept. With
  inner SGD, outer Adam and one local step per round this is data-parallel Adam
  (FedOpt). Lossy codecs take optional error feedback (the sender's residual).

* `Gossip` (ring, random-regular): mixing only neighbours' Deltas never pulls nodes'
  weights together (measured: 28 % merged on a ring vs 69 % complete), so nodes keep
  public copies x̂ of themselves and their neighbours (Koloskova et al., CHOCO-SGD):
  Delta_i = x̂_i - theta_local_i is sent, every holder applies x̂_i -= decode(Delta_i),
  and theta_mix = theta_local + gamma w sum_j (x̂_j - x̂_i). With the exact codec and
  gamma = 1 this averages the neighbours' weights; lossy encodings' losses stay in
  x̂_i - theta and are re-sent. The neighbour set is fixed for the run; a neighbour that
  misses a round is resynchronised from its whole public copy ("weights").

A peer whose contribution does not arrive in full is left out of that round (reported
in RoundReport.missing); the round goes on. Only peers the membership calls alive are
pulled, and a pull is abandoned the moment its peer dies or is found frozen.

Staying in consensus under churn (averaging). Every Delta's header carries a digest of
its sender's state at the start of the round (`meta["start"]`). A node averages only
the contributions whose start digest is the most common one (ties: the smallest), so a
node that restarted from an old checkpoint, missed a round, or drifted is left out by
everyone alike; that node sees itself in the minority, fetches the whole state (weights
and outer-optimizer moments, digest-verified) from a majority peer, and is back in the
next round. One mechanism covers restart, catch-up and divergence repair.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import torch
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from fflnode import robust, wire
from fflnode.codecs import ChunkContext, Codec, Encoded
from fflnode.errors import FflError, FormatError, WireError, short_peer
from fflnode.p2p import bulk

log = logging.getLogger(__name__)

_T = TypeVar("_T")  # a round contribution: a decoded Delta, or its encoded chunks

SHARD_PROTOCOL = "/fflnode/shard/1.0.0"
# Rounds kept in the outbox: a peer still counted on is at most one round behind (we
# wait for its round r+1 before starting r+2); a node catching up from heartbeats,
# which lag up to a second (~4 rounds here), can still fetch the round it jumps to.
KEEP_ROUNDS = 4
# Rounds past our own a peer may ask for and be made to wait on: one in step asks for at
# most the next (it published first); further ahead is refused at once, which bounds the
# per-round books a member's requests can grow to KEEP_ROUNDS + ROUNDS_AHEAD entries.
ROUNDS_AHEAD = 2


@dataclass
class RoundReport:
    round: int
    peers: int  # peers mixed with by design
    received: int  # peers whose contribution arrived in full
    missing: list[str]
    resynced: list[str]
    bytes_out: int  # body bytes of our encoding (what one pull of it costs)
    consensus_gap: float  # gossip: mean ||x̂_j - x̂_i|| / ||x̂_i||; averaging: 0
    excluded: list[str] = field(default_factory=list)  # averaging: out-of-sync contributors
    in_sync: bool = True  # averaging: our start state was the majority's
    kept_peers: list[ID] = field(default_factory=list)  # averaging: the in-sync peers


@dataclass
class Published:
    chunks: list[Encoded]
    # what receivers decode (averaging) or x̂_i after the round; None when encoded chunk
    # by chunk (encode_chunks): the chunks decode to it, one at a time
    estimate: torch.Tensor | None
    served: torch.Tensor | None = None  # gossip: the public copy served for resyncs
    start: int = 0  # averaging: digest of our state at the start of the round


@dataclass
class StateSnapshot:
    """A node's whole training state after a round: what a resyncing peer adopts."""

    vectors: list[torch.Tensor]  # weights first, then the outer optimizer's moments
    step: int  # the outer optimizer's step counter
    digest: int

    @classmethod
    def of(cls, vectors: Sequence[torch.Tensor], step: int) -> StateSnapshot:
        vs = [v.detach().clone() for v in vectors]
        return cls(vs, step, state_digest(vs, step))


STATE_PARTS = ("weights", "m", "v")  # names on the wire, in StateSnapshot.vectors order


@dataclass
class DiskState:
    """A node's whole training state after a round, served from disk (an out-of-core
    node's block file) instead of copies in RAM: `read(lo, hi)` gives the parts'
    elements [lo, hi) (weights first), `compute_digest()` the state_digest of it all
    (read once, when first asked), `valid()` whether the disk still holds that state (the
    next outer step rewrites it: then the request is refused; a piece read across the
    rewrite fails the fetcher's digest check). Call read and compute_digest off the loop."""

    numel: int
    step: int
    read: Callable[[int, int], list[torch.Tensor]]
    compute_digest: Callable[[], int]
    valid: Callable[[], bool]
    _digest: int | None = None

    def digest(self) -> int:
        if self._digest is None:
            self._digest = self.compute_digest()
        return self._digest


def state_digest(vectors: Sequence[torch.Tensor], step: int) -> int:
    """63-bit digest of a training state (fits a msgpack int in a header's meta)."""
    h = hashlib.sha256(step.to_bytes(8, "big"))
    for v in vectors:
        h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "big") >> 1


class Liveness:
    """What the exchange needs from membership (fflnode.p2p.membership.Membership)."""

    def is_alive(self, peer: ID) -> bool:  # pragma: no cover - interface
        return True

    async def wait_changed(self) -> None:  # pragma: no cover - interface
        await trio.sleep_forever()


class RoundExchange:
    """Outbox, serving and pulling shared by both strategies."""

    def __init__(
        self,
        host: IHost,
        run_id: str,
        seed: int,
        codec: Codec,
        *,
        peers: list[ID],
        chunk_elems: int,
        round_timeout_s: float,
        traffic: bulk.Traffic,
        liveness: Liveness | None = None,
    ) -> None:
        self.host = host
        self.run_id = run_id
        self.seed = seed
        self.codec = codec
        self.peers = list(peers)
        self._peer_names = {str(p) for p in self.peers}
        self.chunk_elems = chunk_elems
        self.round_timeout_s = round_timeout_s
        self.traffic = traffic
        self.liveness: Liveness = liveness or Liveness()
        self.published: dict[int, Published] = {}
        self.ready: dict[int, trio.Event] = {}
        self.snapshots: dict[int, StateSnapshot | DiskState] = {}
        self.snapshot_ready: dict[int, trio.Event] = {}
        self.current_round = -1
        # Rounds below this are not ours to serve (a node catching up skips them).
        self.first_round = 0

    def spans(self, numel: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.chunk_elems, numel)) for a in range(0, numel, self.chunk_elems)]

    def ctx(self, round: int, index: int, lo: int, hi: int) -> ChunkContext:
        return ChunkContext(self.seed, round, index, hi - lo)

    @staticmethod
    def _event(events: dict[int, trio.Event], r: int) -> trio.Event:
        return events.setdefault(r, trio.Event())

    def _encode_chunks(
        self, round: int, target: torch.Tensor
    ) -> tuple[list[Encoded], torch.Tensor]:
        """Encode `target` chunk by chunk; also return the receivers' decoded estimate."""
        chunks, estimate = [], torch.empty_like(target)
        for i, (lo, hi) in enumerate(self.spans(target.numel())):
            ctx = self.ctx(round, i, lo, hi)
            enc = self.codec.encode(target[lo:hi].contiguous(), ctx)
            estimate[lo:hi] = self.codec.decode(enc, ctx)
            chunks.append(enc)
        return chunks, estimate

    def publish(self, round: int, published: Published) -> None:
        self.published[round] = published
        self._event(self.ready, round).set()
        self.current_round = round
        self._forget_before(round - KEEP_ROUNDS + 1)

    def record_state(self, round: int, snapshot: StateSnapshot | DiskState) -> None:
        """Our whole state after `round`, served to peers that must resynchronise."""
        self.snapshots[round] = snapshot
        self._event(self.snapshot_ready, round).set()

    def _forget_before(self, r: int) -> None:
        for d in (self.published, self.ready, self.snapshots, self.snapshot_ready):
            for old in [k for k in d if k < r]:
                del d[old]

    def bytes_out(self, round: int) -> int:
        pub = self.published.get(round)
        return sum(e.wire_bytes for e in pub.chunks) if pub else 0

    # ------------------------------------------------------------------ serving
    async def handle(self, stream: INetStream) -> None:
        await bulk.serve(stream, SHARD_PROTOCOL, self.run_id, self._resolve, self.traffic)

    async def _resolve(self, peer: str, msg: wire.Message) -> bulk.Resolved:
        r, what = msg["round"], msg["what"]
        if what not in ("delta", "weights"):
            raise bulk.Unavailable("bad-request", f"{SHARD_PROTOCOL} does not serve {what}")
        self._check_request(peer, msg)
        if what == "weights":
            return await self._resolve_weights(r, msg["lo"], msg["hi"])
        with trio.move_on_after(self.round_timeout_s):
            await self._event(self.ready, r).wait()
        pub = self.published.get(r)
        if pub is None:
            raise bulk.Unavailable("not-ready", f"round {r} not finished here")
        if msg["codec"] != self.codec.name:
            raise bulk.Unavailable("codec", f"this run uses codec {self.codec.name!r}")
        index = msg["index"]
        if not 0 <= index < len(pub.chunks):
            raise bulk.Unavailable("bad-request", f"chunk {index} of {len(pub.chunks)}")
        enc = pub.chunks[index]
        return enc.codec, list(enc.parts.items()), {**enc.meta, START_KEY: pub.start}

    def _check_request(self, peer: str, msg: wire.Message) -> None:
        """Refuse, before any wait, a request from outside our peers or for a round we
        cannot hold: the per-round books stay bounded whatever members ask."""
        r = msg["round"]
        if peer not in self._peer_names:
            raise bulk.Unavailable("not-peer", "requester does not mix with us")
        if r < self.first_round:
            raise bulk.Unavailable("not-in-round", f"round {r}: we joined at {self.first_round}")
        if r <= self.current_round - KEEP_ROUNDS:
            raise bulk.Unavailable("gone", f"round {r} no longer held (now {self.current_round})")
        if r > max(self.current_round, self.first_round) + ROUNDS_AHEAD:
            # Nobody in step asks that far ahead, and waiting would keep one event per
            # asked round: refuse at once (a peer that far ahead does not wait for us).
            raise bulk.Unavailable("not-ready", f"round {r} is ahead of us ({self.current_round})")

    async def _resolve_weights(self, r: int, lo: int, hi: int) -> bulk.Resolved:
        raise bulk.Unavailable("bad-request", "this exchange serves no weights")

    def _check_range(self, lo: int, hi: int, numel: int) -> None:
        if not 0 <= lo < hi <= numel or hi - lo > self.chunk_elems:
            raise bulk.Unavailable("bad-request", f"range [{lo}, {hi}) not served")

    # ------------------------------------------------------------------ pulling
    async def pull(
        self, peer: ID, requests: list[bulk.Request], on_piece: bulk.OnPiece, numel: int
    ) -> bool:
        """Pull `requests` from `peer`; False if it failed, died or froze meanwhile."""
        done = False

        async def watch(scope: trio.CancelScope) -> None:
            while self.liveness.is_alive(peer):
                await self.liveness.wait_changed()
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            try:
                await bulk.pull(
                    self.host,
                    peer,
                    SHARD_PROTOCOL,
                    self.run_id,
                    requests,
                    on_piece,
                    self.traffic,
                    wait_s=self.round_timeout_s,
                    expected_bytes=4 * numel * len(STATE_PARTS),
                )
                done = True
            except (FflError, WireError) as e:
                # A member whose answer fails every round must not write a line a round:
                # one per peer per peerlog.WINDOW_S, then a count.
                self.traffic.peer_log.log(str(peer), "pull", f"nothing pulled: {e}")
            nursery.cancel_scope.cancel()
        if not done and not self.liveness.is_alive(peer):
            log.info("gave up on %s: no longer alive", short_peer(str(peer)))
        return done

    async def pull_delta(self, peer: ID, round: int, numel: int) -> tuple[torch.Tensor, int] | None:
        """A peer's decoded round-`round` Delta and the start digest it came with."""
        out = torch.empty(numel, dtype=torch.float32)

        def keep(req: bulk.Request, enc: Encoded, decoded: torch.Tensor) -> None:
            out[req.lo : req.hi] = decoded

        start = await self._pull_round(peer, round, numel, keep)
        return None if start is None else (out, start)

    async def pull_encoded(
        self, peer: ID, round: int, numel: int
    ) -> tuple[list[Encoded], int] | None:
        """A peer's round-`round` Delta as its encoded chunks (kept, not decoded: what a
        node that streams its rounds holds, b/32 of |θ| per peer at b bits) and its start
        digest. Every chunk is validated and decoded once on arrival, as pull_delta does,
        so a chunk that would decode to a bad estimate is refused here, not mid-mean."""
        chunks: list[Encoded | None] = [None] * len(self.spans(numel))

        def keep(req: bulk.Request, enc: Encoded, decoded: torch.Tensor) -> None:
            chunks[req.index] = enc

        start = await self._pull_round(peer, round, numel, keep)
        if start is None:
            return None
        if any(c is None for c in chunks):
            self.traffic.reject("schema", str(peer), "a Delta with chunks missing")
            return None
        return [c for c in chunks if c is not None], start

    async def _pull_round(
        self,
        peer: ID,
        round: int,
        numel: int,
        keep: Callable[[bulk.Request, Encoded, torch.Tensor], None],
        chunks: Sequence[tuple[int, int, int]] | None = None,
    ) -> int | None:
        """Pull `peer`'s round-`round` Delta chunk by chunk (all of it, or only `chunks`:
        (index, lo, hi) of spans(numel)), each validated and decoded once on arrival and
        handed to `keep(request, encoded, decoded)`; the one start digest its chunks
        carry, or None (nothing pulled, or chunks that disagree)."""
        starts: set[int] = set()

        async def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            meta = dict(header.meta)
            start = meta.pop(START_KEY, None)
            if not isinstance(start, int):
                raise WireError(str(peer), "schema", "delta without its start digest")
            starts.add(start)
            enc = Encoded(header.codec, dict(arrays), meta)
            ctx = self.ctx(round, req.index, req.lo, req.hi)
            keep(req, enc, await trio.to_thread.run_sync(self._decode, enc, ctx, str(peer)))

        if chunks is None:
            chunks = [(i, lo, hi) for i, (lo, hi) in enumerate(self.spans(numel))]
        requests = [
            bulk.Request(round, "delta", i, lo, hi, self.codec.name) for i, lo, hi in chunks
        ]
        if not await self.pull(peer, requests, on_piece, sum(hi - lo for _, lo, hi in chunks)):
            return None
        if len(starts) != 1:
            detail = f"a Delta whose chunks carry {len(starts)} start digests"
            self.traffic.reject("schema", str(peer), detail)
            return None
        return starts.pop()

    def _decode(
        self, enc: Encoded, ctx: ChunkContext, peer: str, codec: Codec | None = None
    ) -> torch.Tensor:
        """A peer's chunk validated and decoded (by the run's codec unless told)."""
        codec = codec or self.codec
        try:
            codec.validate(enc, ctx)
            est = codec.decode(enc, ctx)
        except FormatError as e:  # counted (per peer) where bulk.pull catches it
            raise WireError(peer, "codec", str(e)) from None
        if est.shape != (ctx.numel,) or not bool(torch.isfinite(est).all()):
            raise WireError(peer, "codec", f"chunk {ctx.chunk} decodes to a bad estimate")
        return est


START_KEY = "start"  # header meta: the sender's start-of-round state digest


class ResidualStore(Protocol):
    """Where a streamed encode keeps error feedback, chunk by chunk (the out-of-core
    trainer's block file): get(i) is None until chunk i's first put."""

    def get(self, i: int) -> torch.Tensor | None: ...

    def put(self, i: int, residual: torch.Tensor) -> None: ...


class Averaging(RoundExchange):
    """Exact mean of the in-sync members' decoded Deltas (the complete graph)."""

    def __init__(
        self,
        *args: object,
        error_feedback: bool = False,
        me: ID,
        robust: str = "none",
        trim: int = 1,
        **kw: object,
    ) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.me = me
        self.robust = robust
        self.trim = trim
        # Rounds after which we were out of sync (and, until a resync, hold no state worth
        # serving); trimmed with the other per-round books.
        self.out_of_sync: set[int] = set()
        self.residual: torch.Tensor | None = None if not error_feedback else torch.empty(0)

    def _mix(self, kept: dict[bytes, torch.Tensor]) -> torch.Tensor:
        """The round's aggregate of the in-sync Deltas (fflnode.robust)."""
        if self.robust == "trimmed-mean":
            if len(kept) <= 2 * self.trim:
                log.warning(
                    "trimmed mean of %d Deltas with trim %d: tolerates fewer corrupt peers",
                    len(kept),
                    self.trim,
                )
            mix = robust.trimmed_mean(kept, self.trim)
        elif self.robust == "mad-mean":
            mix = robust.mad_mean(kept)
        elif self.robust == "centered-clip":
            # From this round's coordinate-wise median, not last round's mix: a resynced
            # node adopts weights and moments but no mix, and must clip as the rest do.
            mix, _ = robust.centered_clip(kept, None)
        else:
            mix = canonical_mean_of(kept)
        return mix

    def _forget_before(self, r: int) -> None:
        super()._forget_before(r)
        self.out_of_sync = {k for k in self.out_of_sync if k >= r}

    def encode(self, round: int, delta: torch.Tensor, start: int) -> Published:
        """Encode Delta (+ the error-feedback residual); run in a worker thread."""
        target = delta.detach()
        if self.residual is not None and self.residual.numel() == target.numel():
            target = target + self.residual
        chunks, estimate = self._encode_chunks(round, target)
        if self.residual is not None:
            self.residual = target - estimate
        return Published(chunks, estimate, start=start)

    def encode_chunks(
        self,
        round: int,
        deltas: Iterable[torch.Tensor],
        start: int,
        residual: ResidualStore | None = None,
    ) -> Published:
        """`encode` for a Delta handed over chunk by chunk (spans(numel) order), with the
        error-feedback residual kept by `residual` chunk by chunk too: the same chunk
        encodings as encode() of the whole Delta (every operation is per element or per
        chunk), and nothing |θ|-sized held. Run in a worker thread."""
        chunks = []
        for i, delta in enumerate(deltas):
            target = delta.detach()
            prior = None if residual is None else residual.get(i)
            if prior is not None:
                target = target + prior
            ctx = self.ctx(round, i, 0, target.numel())
            enc = self.codec.encode(target.contiguous(), ctx)
            if residual is not None:
                residual.put(i, target - self.codec.decode(enc, ctx))
            chunks.append(enc)
        return Published(chunks, None, start=start)

    async def gather_streamed(
        self, round: int, numel: int
    ) -> tuple[Callable[[int], torch.Tensor], RoundReport]:
        """gather() for a node that streams its rounds: the peers' encodings are kept and
        the mean is handed out chunk by chunk, `mean_of(i)` (call it in a worker thread):
        bit-identical to chunk i of gather()'s mean (the same decodes, float64 sums in the
        same order, the same division). Only the plain mean streams (robust "none")."""
        if self.robust != "none":
            raise FflError(f"robust {self.robust!r} needs whole Deltas; only 'none' streams")
        pub = self.published[round]
        contributions, kept = await self._pull_majority(
            pub.chunks, pub.start, lambda peer: self.pull_encoded(peer, round, numel)
        )
        order = sorted(kept)
        spans = self.spans(numel)

        def mean_of(i: int) -> torch.Tensor:
            lo, hi = spans[i]
            ctx = self.ctx(round, i, lo, hi)
            acc = torch.zeros(hi - lo, dtype=torch.float64)
            for key in order:
                acc += self.codec.decode(kept[key][i], ctx).to(torch.float64)
            return (acc / len(order)).to(torch.float32)

        return mean_of, self._report(round, {k: s for k, (_, s) in contributions.items()}, kept)

    async def gather(self, round: int) -> tuple[torch.Tensor, RoundReport]:
        """The canonical mean of this round's decoded Deltas whose senders started the
        round from the majority's state; ours is among them unless we are out of sync."""
        pub = self.published[round]
        assert pub.estimate is not None
        numel = pub.estimate.numel()
        contributions, kept = await self._pull_majority(
            pub.estimate, pub.start, lambda peer: self.pull_delta(peer, round, numel)
        )
        mean = await trio.to_thread.run_sync(self._mix, kept)
        return mean, self._report(round, {k: s for k, (_, s) in contributions.items()}, kept)

    async def _pull_majority(
        self,
        mine: _T,
        start: int,
        pull: Callable[[ID], Awaitable[tuple[_T, int] | None]],
    ) -> tuple[dict[bytes, tuple[_T, int]], dict[bytes, _T]]:
        """Every live peer's contribution to this round, pulled at once, beside ours
        (`mine`, from start digest `start`): all of them with their start digests, and
        those that started from the majority's state (the ones the mean is made of)."""
        contributions: dict[bytes, tuple[_T, int]] = {self.me.to_bytes(): (mine, start)}

        async def one(peer: ID) -> None:
            got = await pull(peer)
            if got is not None:
                contributions[peer.to_bytes()] = got

        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                if self.liveness.is_alive(peer):
                    nursery.start_soon(one, peer)
        majority = majority_start(s for _, s in contributions.values())
        return contributions, {k: v for k, (v, s) in contributions.items() if s == majority}

    def _report(
        self, round: int, contributions: dict[bytes, int], kept: dict[bytes, object]
    ) -> RoundReport:
        """The round's report from every contribution's start digest and the kept ones;
        marks the round out of sync here when ours was not the majority's."""
        pub = self.published[round]
        majority = majority_start(contributions.values())
        by_bytes = {p.to_bytes(): p for p in self.peers}
        excluded = [str(by_bytes[k]) for k in contributions if k not in kept and k in by_bytes]
        missing = [str(p) for p in self.peers if p.to_bytes() not in contributions]
        report = RoundReport(
            round,
            len(self.peers),
            len(kept) - (1 if self.me.to_bytes() in kept else 0),
            missing,
            [],
            self.bytes_out(round),
            0.0,
            excluded,
            in_sync=pub.start == majority,
            kept_peers=[by_bytes[k] for k in sorted(kept) if k in by_bytes],
        )
        for peer in excluded:  # one line per peer per window: a member may do it each round
            self.traffic.peer_log.log(
                peer, "out-of-sync", f"left out of round {round}: it started from another state"
            )
        if not report.in_sync:
            # We hold no majority state after this round until a resync lands: answer a
            # peer asking for it now rather than at the round timeout. Two nodes whose
            # partial views each put the other in the majority would otherwise wait on
            # each other for that whole timeout.
            self.out_of_sync.add(round)
            self._event(self.snapshot_ready, round).set()
        return report

    async def _resolve_weights(self, r: int, lo: int, hi: int) -> bulk.Resolved:
        """Our whole state after round r (weights, outer moments), for a resync."""
        with trio.move_on_after(self.round_timeout_s):
            await self._event(self.snapshot_ready, r).wait()
        snap = self.snapshots.get(r)
        if snap is None and r in self.out_of_sync:
            raise bulk.Unavailable("out-of-sync", f"round {r}: out of sync here too")
        if snap is None:
            raise bulk.Unavailable("not-ready", f"no state after round {r} here")
        if isinstance(snap, DiskState):
            return await self._resolve_disk_state(r, snap, lo, hi)
        self._check_range(lo, hi, snap.vectors[0].numel())
        parts = [
            (name, v[lo:hi].numpy()) for name, v in zip(STATE_PARTS, snap.vectors, strict=False)
        ]
        return "none", parts, {"step": snap.step, "digest": snap.digest}

    async def _resolve_disk_state(self, r: int, snap: DiskState, lo: int, hi: int) -> bulk.Resolved:
        """A piece of a state served from disk, read (and digested, once) off the loop."""
        self._check_range(lo, hi, snap.numel)
        if not snap.valid():
            raise bulk.Unavailable("gone", f"round {r}: our state has moved on")
        digest = await trio.to_thread.run_sync(snap.digest)
        values = await trio.to_thread.run_sync(snap.read, lo, hi)
        parts = [(name, v.numpy()) for name, v in zip(STATE_PARTS, values, strict=False)]
        return "none", parts, {"step": snap.step, "digest": digest}

    async def fetch_state(self, peer: ID, round: int, numel: int) -> StateSnapshot | None:
        """A peer's whole state after `round`, or None unless it arrives intact and its
        digest (recomputed here) matches the one the peer announced with it."""
        vectors: list[torch.Tensor] = []
        claims: set[tuple[int, int]] = set()

        async def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            if not vectors:
                vectors.extend(torch.empty(numel) for _ in arrays)
            if set(arrays) != set(STATE_PARTS[: len(vectors)]):
                raise WireError(str(peer), "schema", f"state parts {sorted(arrays)}")
            if any(a.shape != (req.hi - req.lo,) for a in arrays.values()):
                raise WireError(str(peer), "schema", f"state piece [{req.lo}, {req.hi}) misshapen")
            for v, name in zip(vectors, STATE_PARTS, strict=False):
                v[req.lo : req.hi] = torch.from_numpy(arrays[name].copy())
            step, digest = header.meta.get("step"), header.meta.get("digest")
            if not isinstance(step, int) or not isinstance(digest, int):
                raise WireError(str(peer), "schema", "state without its step and digest")
            claims.add((step, digest))

        requests = [
            bulk.Request(round, "weights", i, lo, hi, "none")
            for i, (lo, hi) in enumerate(self.spans(numel))
        ]
        if not await self.pull(peer, requests, on_piece, numel) or len(claims) != 1:
            return None
        step, digest = claims.pop()
        snap = StateSnapshot(vectors, step, state_digest(vectors, step))
        if snap.digest != digest:
            self.traffic.reject("hash", str(peer), "a state that fails its digest")
            return None
        return snap

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.residual is None else {"ef.residual": self.residual}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.residual is not None and "ef.residual" in state:
            self.residual = state["ef.residual"]


def majority_start(starts: Iterable[int]) -> int:
    """The most common start digest; ties go to the smallest, so every node picks the
    same one from the same contributions."""
    counts = Counter(starts)
    best = max(counts.values())
    return min(s for s, c in counts.items() if c == best)


def canonical_mean_of(estimates: dict[bytes, torch.Tensor]) -> torch.Tensor:
    """float32(sum of float64 values in ascending key order / count): bit-identical on
    every node that holds the same estimates, whatever order they arrived in."""
    acc = torch.zeros(next(iter(estimates.values())).numel(), dtype=torch.float64)
    for key in sorted(estimates):
        acc += estimates[key].to(torch.float64)
    return (acc / len(estimates)).to(torch.float32)


class Gossip(RoundExchange):
    """CHOCO-style consensus gossip over a fixed sparse graph."""

    def __init__(self, *args: object, initial: torch.Tensor, gamma: float, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.gamma = gamma
        self.public = initial.detach().clone()  # x̂_i
        self.copies = {p: initial.detach().clone() for p in self.peers}  # x̂_j
        self.stale: set[ID] = set()

    def encode(self, round: int, theta_local: torch.Tensor) -> Published:
        """Encode Delta = x̂ - theta_local and apply it to x̂ (run in a worker thread)."""
        chunks, estimate = self._encode_chunks(round, self.public - theta_local.detach())
        self.public -= estimate  # exactly what every neighbour computes on receipt
        return Published(chunks, estimate, served=self.public.clone())

    async def _resolve_weights(self, r: int, lo: int, hi: int) -> bulk.Resolved:
        """Our public copy after round r, exact float32 (a neighbour's resync)."""
        with trio.move_on_after(self.round_timeout_s):
            await self._event(self.ready, r).wait()
        pub = self.published.get(r)
        if pub is None or pub.served is None:
            raise bulk.Unavailable("not-ready", f"round {r} not finished here")
        self._check_range(lo, hi, pub.served.numel())
        return "none", [("values", pub.served[lo:hi].numpy())], {}

    async def pull_public(self, peer: ID, round: int, numel: int) -> torch.Tensor | None:
        out = torch.empty(numel, dtype=torch.float32)

        async def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            values = arrays.get("values")
            if len(arrays) != 1 or values is None or values.dtype != np.float32:
                raise WireError(str(peer), "schema", f"public copy parts {sorted(arrays)}")
            if values.shape != (req.hi - req.lo,):
                raise WireError(str(peer), "schema", f"public copy [{req.lo}, {req.hi}) misshapen")
            out[req.lo : req.hi] = torch.from_numpy(values.copy())

        requests = [
            bulk.Request(round, "weights", i, lo, hi, "none")
            for i, (lo, hi) in enumerate(self.spans(numel))
        ]
        return out if await self.pull(peer, requests, on_piece, numel) else None

    async def gather(
        self, round: int, theta_local: torch.Tensor
    ) -> tuple[torch.Tensor, RoundReport]:
        """Update neighbours' copies from their round-`round` Deltas; return theta_mix."""
        numel = theta_local.numel()
        arrived: list[ID] = []
        resynced: list[str] = []

        async def one(peer: ID) -> None:
            resync = peer in self.stale
            if resync:
                got = await self.pull_public(peer, round, numel)
            else:
                pulled = await self.pull_delta(peer, round, numel)
                got = None if pulled is None else pulled[0]
            if got is None:
                self.stale.add(peer)
                return
            if resync:
                self.copies[peer].copy_(got)
                resynced.append(str(peer))
            else:
                self.copies[peer].sub_(got)
            self.stale.discard(peer)
            arrived.append(peer)

        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                if self.liveness.is_alive(peer):
                    nursery.start_soon(one, peer)
                else:
                    self.stale.add(peer)
        arrived.sort(key=lambda p: p.to_bytes())
        mixed, gap = await trio.to_thread.run_sync(self._mix, theta_local, arrived)
        report = RoundReport(
            round,
            len(self.peers),
            len(arrived),
            [str(p) for p in self.peers if p not in arrived],
            resynced,
            self.bytes_out(round),
            gap,
        )
        return mixed, report

    def _mix(self, theta_local: torch.Tensor, arrived: list[ID]) -> tuple[torch.Tensor, float]:
        w = 1.0 / (len(self.peers) + 1)
        mixed = theta_local.detach().clone()
        gaps = []
        norm = float(self.public.norm()) or 1.0
        for peer in arrived:
            diff = self.copies[peer] - self.public
            mixed.add_(diff, alpha=self.gamma * w)
            gaps.append(float(diff.norm()) / norm)
        return mixed, float(np.mean(gaps)) if gaps else 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"gossip.public": self.public}
        out.update({f"gossip.copy.{p}": t for p, t in self.copies.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Resume from a checkpoint: our public copy as it was, and every neighbour
        marked stale, so the first round pulls each neighbour's whole public copy
        (they moved on while we were down) instead of applying Deltas to an old one.
        The neighbours, who missed us, resync our copy the same way."""
        numel = self.public.numel()
        public = state.get("gossip.public")
        if public is not None and public.shape == (numel,) and public.dtype == torch.float32:
            self.public = public.clone()
        for peer in self.peers:
            saved = state.get(f"gossip.copy.{peer}")
            if saved is not None and saved.shape == (numel,) and saved.dtype == torch.float32:
                self.copies[peer] = saved.clone()
        self.stale = set(self.peers)
