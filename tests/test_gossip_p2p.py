"""Round exchanges over real libp2p hosts: gossip copies stay identical, averaging is exact."""

from __future__ import annotations

import numpy as np
import torch
import trio

from fflnode.codecs import ChunkContext, Codec, Encoded, NoneCodec
from fflnode.exchange import SHARD_PROTOCOL, Averaging, Gossip, canonical_mean_of
from fflnode.train.topology import neighbours
from tests.p2p_harness import peers

ROUND_TIMEOUT_S = 30.0
NUMEL = 3000
CHUNK = 1024  # three chunks, the last one short


class HalfPrecision(Codec):
    """A lossy test codec: float16 on the wire."""

    name = "f16-test"

    def encode(self, chunk: torch.Tensor, ctx: ChunkContext) -> Encoded:
        return Encoded(self.name, {"values": chunk.to(torch.float16).numpy()})

    def decode(self, enc: Encoded, ctx: ChunkContext) -> torch.Tensor:
        return torch.from_numpy(enc.parts["values"].astype(np.float32))


async def one_round(g: Gossip, r: int, local: torch.Tensor, pid, mixed: dict, reports: dict):
    g.publish(r, await trio.to_thread.run_sync(g.encode, r, local))
    mixed[pid], reports[pid] = await g.gather(r, local)


async def gossip_rounds(codec: Codec, rounds: int, topo: str):
    async with peers(4) as ps:
        members = sorted((p.id for p in ps), key=lambda i: i.to_bytes())
        by = {m.to_bytes(): m for m in members}
        init = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))
        gossips = {}
        for p in ps:
            nb = [by[b] for b in neighbours(topo, list(by), p.id.to_bytes(), 0, 1, 2)]
            g = Gossip(
                p.host,
                "test-run",
                1,
                codec,
                initial=init,
                peers=nb,
                gamma=1.0,
                chunk_elems=CHUNK,
                round_timeout_s=ROUND_TIMEOUT_S,
                traffic=p.traffic,
            )
            p.host.set_stream_handler(SHARD_PROTOCOL, g.handle)
            gossips[p.id] = g
        history = []
        for r in range(rounds):
            local = {
                pid: init + torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 * r + i))
                for i, pid in enumerate(members)
            }
            mixed, reports = {}, {}
            with trio.fail_after(ROUND_TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    for pid in members:
                        nursery.start_soon(
                            one_round, gossips[pid], r, local[pid], pid, mixed, reports
                        )
            history.append((local, mixed, reports))
        return gossips, history


async def test_copies_match_their_owner_bit_for_bit_with_a_lossy_codec():
    gossips, history = await gossip_rounds(HalfPrecision(), rounds=3, topo="ring")
    for pid, g in gossips.items():
        for nb, copy in g.copies.items():
            assert torch.equal(copy, gossips[nb].public), "a neighbour's copy drifted"
        # lossy: the public copy is not the local model, but close (fp16 of the residual)
        local = history[-1][0][pid]
        assert not torch.equal(g.public, local)
        assert float((g.public - local).norm() / local.norm()) < 1e-3
    reports = [rep for _, _, reps in history for rep in reps.values()]
    assert all(rep.received == rep.peers == 2 for rep in reports)


async def test_exact_codec_mix_is_the_neighbourhood_average():
    gossips, history = await gossip_rounds(NoneCodec(), rounds=2, topo="ring")
    local, mixed, reports = history[-1]
    for pid, g in gossips.items():
        hood = [pid, *g.peers]
        expected = sum(local[q] for q in hood) / len(hood)
        assert torch.allclose(mixed[pid], expected, atol=1e-5, rtol=0)
        assert reports[pid].bytes_out == 4 * NUMEL


async def test_averaging_gives_every_node_the_bit_identical_canonical_mean():
    async with peers(4) as ps:
        members = [p.id for p in ps]
        averagers = {}
        for p in ps:
            a = Averaging(
                p.host,
                "test-run",
                1,
                HalfPrecision(),
                error_feedback=True,
                me=p.id,
                peers=[m for m in members if m != p.id],
                chunk_elems=CHUNK,
                round_timeout_s=ROUND_TIMEOUT_S,
                traffic=p.traffic,
            )
            p.host.set_stream_handler(SHARD_PROTOCOL, a.handle)
            averagers[p.id] = a
        means = {}
        for r in range(2):
            deltas = {
                pid: torch.randn(NUMEL, generator=torch.Generator().manual_seed(10 * r + i))
                for i, pid in enumerate(members)
            }

            async def one(pid, r=r, deltas=deltas):
                a = averagers[pid]
                a.publish(r, await trio.to_thread.run_sync(a.encode, r, deltas[pid], 7))
                means[pid], report = await a.gather(r)
                assert report.received == 3 and not report.missing

            with trio.fail_after(ROUND_TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    for pid in members:
                        nursery.start_soon(one, pid)
            first = means[members[0]]
            assert all(torch.equal(m, first) for m in means.values()), "nodes disagree"
            decoded = {pid.to_bytes(): averagers[pid].published[r].estimate for pid in members}
            assert torch.equal(first, canonical_mean_of(decoded))
            exact = sum(deltas.values()) / 4
            assert float((first - exact).norm() / exact.norm()) < 1e-3  # fp16 + feedback
        # error feedback: what fp16 lost is carried, not dropped
        assert all(
            a.residual is not None and a.residual.abs().max() > 0 for a in averagers.values()
        )
