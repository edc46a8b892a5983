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
in RoundReport.missing); the round goes on.
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
# Rounds kept in the outbox: a peer may still be pulling round r while we start r+1; it
# cannot be further behind, since we wait for its round r+1 before starting r+2.
KEEP_ROUNDS = 2


@dataclass
class RoundReport:
    round: int
    peers: int  # peers mixed with by design
    received: int  # peers whose contribution arrived in full
    missing: list[str]
    resynced: list[str]
    bytes_out: int  # body bytes of our encoding (what one pull of it costs)
    consensus_gap: float  # gossip: mean ||x̂_j - x̂_i|| / ||x̂_i||; averaging: 0


@dataclass
class Published:
    chunks: list[Encoded]
    estimate: torch.Tensor  # what receivers decode (averaging) or x̂_i after the round
    served: torch.Tensor | None = None  # gossip: the public copy served for resyncs


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
        self.published: dict[int, Published] = {}
        self.ready: dict[int, trio.Event] = {}
        self.current_round = -1

    def spans(self, numel: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.chunk_elems, numel)) for a in range(0, numel, self.chunk_elems)]

    def ctx(self, round: int, index: int, lo: int, hi: int) -> ChunkContext:
        return ChunkContext(self.seed, round, index, hi - lo)

    def _event(self, r: int) -> trio.Event:
        return self.ready.setdefault(r, trio.Event())

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
        self._event(round).set()
        self.current_round = round
        for old in [r for r in self.published if r <= round - KEEP_ROUNDS]:
            del self.published[old]
            self.ready.pop(old, None)

    def bytes_out(self, round: int) -> int:
        pub = self.published.get(round)
        return sum(e.wire_bytes for e in pub.chunks) if pub else 0

    # ------------------------------------------------------------------ serving
    async def handle(self, stream: INetStream) -> None:
        await bulk.serve(stream, SHARD_PROTOCOL, self.run_id, self._resolve, self.traffic)

    async def _resolve(self, peer: str, msg: wire.Message) -> bulk.Resolved:
        r, index, what = msg["round"], msg["index"], msg["what"]
        if peer not in self._peer_names:
            raise bulk.Unavailable("not-peer", "requester does not mix with us")
        if what not in ("delta", "weights"):
            raise bulk.Unavailable("bad-request", f"{SHARD_PROTOCOL} does not serve {what}")
        if r <= self.current_round - KEEP_ROUNDS:
            raise bulk.Unavailable("gone", f"round {r} no longer held (now {self.current_round})")
        with trio.move_on_after(self.round_timeout_s):
            await self._event(r).wait()
        pub = self.published.get(r)
        if pub is None:
            raise bulk.Unavailable("not-ready", f"round {r} not finished here")
        if what == "weights":
            lo, hi = msg["lo"], msg["hi"]
            if (
                pub.served is None
                or not 0 <= lo < hi <= pub.served.numel()
                or (hi - lo > self.chunk_elems)
            ):
                raise bulk.Unavailable("bad-request", f"weights [{lo}, {hi}) not served")
            return "none", [("values", pub.served[lo:hi].numpy())], {}
        if msg["codec"] != self.codec.name:
            raise bulk.Unavailable("codec", f"this run uses codec {self.codec.name!r}")
        if not 0 <= index < len(pub.chunks):
            raise bulk.Unavailable("bad-request", f"chunk {index} of {len(pub.chunks)}")
        enc = pub.chunks[index]
        return enc.codec, list(enc.parts.items()), dict(enc.meta)

    # ------------------------------------------------------------------ pulling
    async def pull_estimate(
        self, peer: ID, round: int, numel: int, *, weights: bool = False
    ) -> torch.Tensor | None:
        """A peer's decoded round-`round` Delta (or its public weights), or None."""
        out = torch.empty(numel, dtype=torch.float32)
        spans = self.spans(numel)

        async def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            if weights:
                out[req.lo : req.hi] = torch.from_numpy(arrays["values"].copy())
                return
            enc = Encoded(header.codec, dict(arrays), dict(header.meta))
            ctx = self.ctx(round, req.index, req.lo, req.hi)
            out[req.lo : req.hi] = await trio.to_thread.run_sync(self._decode, enc, ctx, str(peer))

        what, codec = ("weights", "none") if weights else ("delta", self.codec.name)
        requests = [bulk.Request(round, what, i, lo, hi, codec) for i, (lo, hi) in enumerate(spans)]
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
            log.warning("round %d: nothing from %s: %s", round, short_peer(str(peer)), e)
            return None
        return out

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


class Averaging(RoundExchange):
    """Exact mean of every member's decoded Delta (the complete graph)."""

    def __init__(self, *args: object, error_feedback: bool = False, me: ID, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.me = me
        self.residual: torch.Tensor | None = None if not error_feedback else torch.empty(0)

    def encode(self, round: int, delta: torch.Tensor) -> Published:
        """Encode Delta (+ the error-feedback residual); run in a worker thread."""
        target = delta.detach()
        if self.residual is not None and self.residual.numel() == target.numel():
            target = target + self.residual
        chunks, estimate = self._encode_chunks(round, target)
        if self.residual is not None:
            self.residual = target - estimate
        return Published(chunks, estimate)

    async def gather(self, round: int) -> tuple[torch.Tensor, RoundReport]:
        """The canonical mean of this round's decoded Deltas, ours included."""
        own = self.published[round].estimate
        estimates: dict[bytes, torch.Tensor] = {self.me.to_bytes(): own}

        async def one(peer: ID) -> None:
            est = await self.pull_estimate(peer, round, own.numel())
            if est is not None:
                estimates[peer.to_bytes()] = est

        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                nursery.start_soon(one, peer)
        mean = await trio.to_thread.run_sync(canonical_mean_of, estimates)
        missing = [str(p) for p in self.peers if p.to_bytes() not in estimates]
        report = RoundReport(
            round, len(self.peers), len(estimates) - 1, missing, [], self.bytes_out(round), 0.0
        )
        return mean, report

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.residual is None else {"ef.residual": self.residual}


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

    async def gather(
        self, round: int, theta_local: torch.Tensor
    ) -> tuple[torch.Tensor, RoundReport]:
        """Update neighbours' copies from their round-`round` Deltas; return theta_mix."""
        numel = theta_local.numel()
        arrived: list[ID] = []
        resynced: list[str] = []

        async def one(peer: ID) -> None:
            resync = peer in self.stale
            got = await self.pull_estimate(peer, round, numel, weights=resync)
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
                nursery.start_soon(one, peer)
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
