"""Gossip of pseudo-gradients with neighbours, keeping the nodes in consensus (CHOCO-style).

Why not just average Deltas: mixing only neighbours' Deltas never pulls nodes' weights
together. On a fixed ring each node always misses the same non-IID peer, its bias grows
every round, and the final average of drifted models is poor (measured: 28 % merged vs
69 % with a complete graph). Mixing must contract the disagreement, which needs each
node's weights, and shipping weights defeats compression.

The scheme (Koloskova et al., CHOCO-SGD, applied to DiLoCo's pseudo-gradients): every
node i has a public copy x̂_i of its weights that its neighbours hold too (all copies
start at the shared initial weights). Each round:
  1. Delta_i = x̂_i - theta_local_i  (what x̂_i lacks: this round's progress plus whatever
     earlier encodings lost) is encoded chunk by chunk and published;
  2. every holder of x̂_i, i itself included, applies x̂_i -= decode(Delta_i);
  3. i mixes: theta_mix = theta_local + gamma * w * sum_j (x̂_j - x̂_i), w = 1/(d+1);
  4. the outer optimizer steps on g = theta_start - theta_mix.
With the exact codec and gamma = 1 this is averaging of the neighbours' local models
(D-PSGD); with a lossy codec what one round loses stays in x̂_i - theta and is sent
again, so error feedback is built in. The neighbour set must be fixed for the whole run
(copies of a node are only kept current by its neighbours).

A neighbour whose Delta does not arrive in full is left out of that round's mix and its
copy is marked stale; the next round pulls its whole public copy instead ("public",
uncompressed) to resynchronise. The sum over neighbours follows arrival order, so the
mix is not bit-reproducible across runs; only the final merge promises that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from fflnode import wire
from fflnode.codecs import ChunkContext, Codec, Encoded
from fflnode.errors import FflError, FormatError, WireError, short_peer
from fflnode.p2p import bulk

log = logging.getLogger(__name__)

SHARD_PROTOCOL = "/fflnode/shard/1.0.0"
# Rounds kept in the outbox: a neighbour may still be pulling round r while we start
# r+1; it cannot be further behind, since we wait for its round r+1 before r+2.
KEEP_ROUNDS = 2


@dataclass
class RoundReport:
    round: int
    neighbours: int
    received: int  # neighbours whose contribution arrived in full
    missing: list[str]
    resynced: list[str]
    bytes_out: int  # body bytes of our encoding (what one pull of it costs)
    consensus_gap: float  # mean ||x̂_j - x̂_i|| / ||x̂_i|| over mixed neighbours


@dataclass
class _Published:
    chunks: list[Encoded]
    public: torch.Tensor  # x̂_i after this round's update (served for resyncs)


class Gossip:
    """One node's side of the per-round exchange."""

    def __init__(
        self,
        host: IHost,
        run_id: str,
        seed: int,
        codec: Codec,
        *,
        initial: torch.Tensor,
        neighbours: list[ID],
        gamma: float,
        chunk_elems: int,
        round_timeout_s: float,
        traffic: bulk.Traffic,
    ) -> None:
        self.host = host
        self.run_id = run_id
        self.seed = seed
        self.codec = codec
        self.gamma = gamma
        self.chunk_elems = chunk_elems
        self.round_timeout_s = round_timeout_s
        self.traffic = traffic
        self.neighbours = list(neighbours)
        self.public = initial.detach().clone()  # x̂_i
        self.copies = {p: initial.detach().clone() for p in self.neighbours}  # x̂_j
        self.stale: set[ID] = set()
        self.published: dict[int, _Published] = {}
        self.ready: dict[int, trio.Event] = {}
        self.current_round = -1

    def spans(self, numel: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.chunk_elems, numel)) for a in range(0, numel, self.chunk_elems)]

    def ctx(self, round: int, index: int, lo: int, hi: int) -> ChunkContext:
        return ChunkContext(self.seed, round, index, hi - lo)

    def _event(self, r: int) -> trio.Event:
        return self.ready.setdefault(r, trio.Event())

    # ------------------------------------------------------------------ sending side
    def encode(self, round: int, theta_local: torch.Tensor) -> _Published:
        """Encode Delta = x̂ - theta_local and apply it to x̂ (run in a worker thread)."""
        delta = self.public - theta_local.detach()
        chunks = []
        for i, (lo, hi) in enumerate(self.spans(delta.numel())):
            ctx = self.ctx(round, i, lo, hi)
            enc = self.codec.encode(delta[lo:hi].contiguous(), ctx)
            # The very computation every neighbour performs on receipt: copies stay equal.
            self.public[lo:hi] -= self.codec.decode(enc, ctx)
            chunks.append(enc)
        return _Published(chunks, self.public.clone())

    def publish(self, round: int, published: _Published) -> None:
        self.published[round] = published
        self._event(round).set()
        self.current_round = round
        for old in [r for r in self.published if r <= round - KEEP_ROUNDS]:
            del self.published[old]
            self.ready.pop(old, None)

    async def handle(self, stream: INetStream) -> None:
        await bulk.serve(stream, SHARD_PROTOCOL, self.run_id, self._resolve, self.traffic)

    async def _resolve(self, peer: str, msg: wire.Message) -> bulk.Resolved:
        r, index, what = msg["round"], msg["index"], msg["what"]
        if peer not in {str(p) for p in self.neighbours}:
            raise bulk.Unavailable("not-neighbour", "requester is not our neighbour")
        if what not in ("delta", "weights"):
            raise bulk.Unavailable("bad-request", f"{SHARD_PROTOCOL} does not serve {what}")
        if r <= self.current_round - KEEP_ROUNDS:
            raise bulk.Unavailable("gone", f"round {r} no longer held (now {self.current_round})")
        with trio.move_on_after(self.round_timeout_s):
            await self._event(r).wait()
        pub = self.published.get(r)
        if pub is None:
            raise bulk.Unavailable("not-ready", f"round {r} not finished here")
        if what == "weights":  # resync: our public copy after round r, exact float32
            lo, hi = msg["lo"], msg["hi"]
            if not 0 <= lo < hi <= pub.public.numel() or hi - lo > self.chunk_elems:
                raise bulk.Unavailable("bad-request", f"public range [{lo}, {hi})")
            return "none", [("values", pub.public[lo:hi].numpy())], {}
        if msg["codec"] != self.codec.name:
            raise bulk.Unavailable("codec", f"this run uses codec {self.codec.name!r}")
        if not 0 <= index < len(pub.chunks):
            raise bulk.Unavailable("bad-request", f"chunk {index} of {len(pub.chunks)}")
        enc = pub.chunks[index]
        return enc.codec, list(enc.parts.items()), dict(enc.meta)

    # ------------------------------------------------------------------ receiving side
    async def gather(
        self, round: int, theta_local: torch.Tensor
    ) -> tuple[torch.Tensor, RoundReport]:
        """Update neighbours' copies from their round-`round` Deltas; return theta_mix."""
        numel = theta_local.numel()
        spans = self.spans(numel)
        arrived: set[ID] = set()
        resynced: list[str] = []

        async def one(peer: ID) -> None:
            resync = peer in self.stale
            copy = self.copies[peer]
            staged = copy.clone()  # applied only if every chunk arrives

            async def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
                if resync:
                    staged[req.lo : req.hi] = torch.from_numpy(arrays["values"].copy())
                    return
                enc = Encoded(header.codec, dict(arrays), dict(header.meta))
                ctx = self.ctx(round, req.index, req.lo, req.hi)
                est = await trio.to_thread.run_sync(self._decode, enc, ctx, str(peer))
                staged[req.lo : req.hi] -= est

            what, codec = ("weights", "none") if resync else ("delta", self.codec.name)
            requests = [
                bulk.Request(round, what, i, lo, hi, codec) for i, (lo, hi) in enumerate(spans)
            ]
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
                    expected_bytes=4 * numel,
                )
            except (FflError, WireError) as e:
                self.stale.add(peer)
                log.warning("round %d: nothing from %s: %s", round, short_peer(str(peer)), e)
                return
            copy.copy_(staged)
            self.stale.discard(peer)
            arrived.add(peer)
            if resync:
                resynced.append(str(peer))

        async with trio.open_nursery() as nursery:
            for peer in self.neighbours:
                nursery.start_soon(one, peer)
        mixed, gap = await trio.to_thread.run_sync(
            self._mix, theta_local, sorted(arrived, key=lambda p: p.to_bytes())
        )
        report = RoundReport(
            round,
            len(self.neighbours),
            len(arrived),
            [str(p) for p in self.neighbours if p not in arrived],
            resynced,
            sum(e.wire_bytes for e in self.published[round].chunks)
            if round in self.published
            else 0,
            gap,
        )
        return mixed, report

    def _mix(self, theta_local: torch.Tensor, arrived: list[ID]) -> tuple[torch.Tensor, float]:
        w = 1.0 / (len(self.neighbours) + 1)
        mixed = theta_local.detach().clone()
        gaps = []
        norm = float(self.public.norm()) or 1.0
        for peer in arrived:
            diff = self.copies[peer] - self.public
            mixed.add_(diff, alpha=self.gamma * w)
            gaps.append(float(diff.norm()) / norm)
        return mixed, float(np.mean(gaps)) if gaps else 0.0

    def _decode(self, enc: Encoded, ctx: ChunkContext, peer: str) -> torch.Tensor:
        try:
            self.codec.validate(enc, ctx)
            est = self.codec.decode(enc, ctx)
        except FormatError as e:
            self.traffic.reject("codec")
            raise WireError(peer, "codec", str(e)) from None
        if est.shape != (ctx.numel,) or not bool(torch.isfinite(est).all()):
            self.traffic.reject("codec")
            raise WireError(peer, "codec", f"chunk {ctx.chunk} decodes to a bad estimate")
        return est
