"""The per-round reduce-scatter / all-gather of the exact codec (fflnode.exchange_sharded),
on real libp2p hosts: the canonical mean bit for bit on every node, bytes per node that
do not grow with N, a dead owner's shard reduced by the others, a drifted node left out."""

from __future__ import annotations

import logging

import torch
import trio

from fflnode.codecs import NoneCodec
from fflnode.errors import short_peer
from fflnode.exchange import SHARD_PROTOCOL, Averaging, canonical_mean_of
from fflnode.exchange_sharded import ShardedAveraging
from tests.p2p_harness import peers

ROUND_TIMEOUT_S = 60.0  # a round takes < 1 s here; generous for a machine at load 12
NUMEL = 10_000
CHUNK = 1024  # shards of 2,500 elements cut into 3 requests each: pieces are exercised


def make(ps, cls=ShardedAveraging, **kw):
    members = [p.id for p in ps]
    out = {}
    for p in ps:
        a = cls(
            p.host,
            "test-run",
            1,
            NoneCodec(),
            me=p.id,
            peers=[m for m in members if m != p.id],
            chunk_elems=CHUNK,
            round_timeout_s=ROUND_TIMEOUT_S,
            traffic=p.traffic,
            liveness=p.membership,
            **kw,
        )
        p.host.set_stream_handler(SHARD_PROTOCOL, a.handle)
        out[p.id] = a
    return out


async def run_round(exchanges, r, deltas, starts, only=None):
    means, reports = {}, {}

    async def one(pid):
        a = exchanges[pid]
        a.publish(r, await trio.to_thread.run_sync(a.encode, r, deltas[pid], starts[pid]))
        means[pid], reports[pid] = await a.gather(r)

    with trio.fail_after(ROUND_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for pid in only or exchanges:
                nursery.start_soon(one, pid)
    return means, reports


def random_deltas(pids, r):
    return {
        pid: torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 * r + i))
        for i, pid in enumerate(pids)
    }


async def test_every_node_gets_the_bit_identical_canonical_mean():
    async with peers(4) as ps:
        ex = make(ps)
        for r in range(3):
            deltas = random_deltas(list(ex), r)
            means, reports = await run_round(ex, r, deltas, {pid: 7 for pid in ex})
            expected = canonical_mean_of({pid.to_bytes(): d for pid, d in deltas.items()})
            for pid, mean in means.items():
                assert torch.equal(mean, expected), "not the canonical mean bit for bit"
                assert reports[pid].in_sync and reports[pid].received == 3
                assert not reports[pid].missing


async def test_bytes_per_node_are_about_two_model_sizes_whatever_n():
    """Reduce-scatter + all-gather: ~2 |theta| (N-1)/N sent per node and round; the
    all-gather exchange sends (N-1) |theta|."""
    sent = {}
    for cls in (ShardedAveraging, Averaging):
        async with peers(4) as ps:
            ex = make(ps, cls)
            before = {p.id: p.traffic.total_sent for p in ps}
            await run_round(ex, 0, random_deltas(list(ex), 0), {pid: 7 for pid in ex})
            sent[cls] = [p.traffic.total_sent - before[p.id] for p in ps]
    model = 4 * NUMEL
    for b in sent[ShardedAveraging]:
        assert 1.3 * model < b < 1.7 * model  # 2 x 3/4 |theta| plus headers
    assert min(sent[Averaging]) > 2.8 * model  # 3 |theta|: N - 1 pulls of it


async def test_a_dead_owners_shard_is_reduced_by_the_others_identically(caplog):
    """...round after round, with one line about it per node (not one a round: the
    fuzzer's insider, a member that never served its shard, drew 400 in 400 rounds)."""
    caplog.set_level(logging.INFO)
    async with peers(4) as ps:
        ex = make(ps)
        dead = sorted(ex, key=lambda p: p.to_bytes())[2]  # owns shard 2
        alive = [pid for pid in ex if pid != dead]
        # the dead member never publishes and is not alive for the others
        for p in ps:
            if p.id == dead:
                await p.host.close()
        with trio.fail_after(ROUND_TIMEOUT_S):
            for p in ps:
                if p.id != dead:
                    ok = await p.membership.wait_until(
                        lambda p=p: dead not in p.membership.alive(), ROUND_TIMEOUT_S
                    )
                    assert ok
        for r in range(3):
            deltas = random_deltas(list(ex), r)
            starts = {pid: 7 for pid in ex}
            means, reports = await run_round(ex, r, deltas, starts, only=alive)
            expected = canonical_mean_of({pid.to_bytes(): deltas[pid] for pid in alive})
            for pid in alive:
                assert torch.equal(means[pid], expected)
                assert reports[pid].missing == [str(dead)]
    lines = [r.getMessage() for r in caplog.records]
    about = [x for x in lines if "reducing its shard 2 ourselves" in x]
    assert len(about) == len(alive), about  # round 0's, once per node
    assert all(x.startswith(short_peer(str(dead))) for x in about), about


async def test_a_node_that_started_from_another_state_is_left_out_by_every_owner():
    async with peers(4) as ps:
        ex = make(ps)
        pids = list(ex)
        drifted = pids[0]
        starts = {pid: (99 if pid == drifted else 7) for pid in pids}
        deltas = random_deltas(pids, 0)
        means, reports = await run_round(ex, 0, deltas, starts)
        expected = canonical_mean_of(
            {pid.to_bytes(): deltas[pid] for pid in pids if pid != drifted}
        )
        for pid in pids:
            assert torch.equal(means[pid], expected)
        assert not reports[drifted].in_sync  # it resyncs (fflnode.rounds)
        assert all(reports[pid].in_sync for pid in pids if pid != drifted)
        assert drifted not in reports[pids[1]].kept_peers
