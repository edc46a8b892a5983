"""The per-round reduce-scatter / all-gather (fflnode.exchange_sharded), on real libp2p
hosts: the canonical mean bit for bit on every node, bytes per node that do not grow
with N, a dead owner's shard reduced by the others, a drifted node left out; and for a
lossy codec, every node applying the owners' re-encoded means, recomputed here from the
codec alone (both sides' error feedback included), at about half the all-gather's bytes."""

from __future__ import annotations

import logging

import pytest
import torch
import trio

from fflnode.codecs import ChunkContext, HoloCodec, NoneCodec
from fflnode.errors import short_peer
from fflnode.exchange import SHARD_PROTOCOL, Averaging, canonical_mean_of
from fflnode.exchange_sharded import REDUCED_CHUNK, ShardedAveraging
from tests.p2p_harness import peers

ROUND_TIMEOUT_S = 60.0  # a round takes < 1 s here; generous for a machine at load 12
NUMEL = 10_000
CHUNK = 1024  # shards of 2,500 elements cut into 3 requests each: pieces are exercised


SEED = 1


def make(ps, cls=ShardedAveraging, codec=None, chunk=CHUNK, **kw):
    members = [p.id for p in ps]
    out = {}
    for p in ps:
        a = cls(
            p.host,
            "test-run",
            SEED,
            codec or NoneCodec(),
            me=p.id,
            peers=[m for m in members if m != p.id],
            chunk_elems=chunk,
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


def random_deltas(pids, r, numel=NUMEL):
    return {
        pid: torch.randn(numel, generator=torch.Generator().manual_seed(100 * r + i))
        for i, pid in enumerate(pids)
    }


async def kill(ps, dead):
    """Close member `dead`'s host (it never publishes again) and wait until every other
    member's membership no longer calls it alive; the others' IDs."""
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
    return [p.id for p in ps if p.id != dead]


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
        alive = await kill(ps, dead)
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


# ------------------------------------------------------------------ lossy codecs
def lossy_chunks(n: int, numel: int, chunk: int) -> list[list[tuple[int, int, int]]]:
    """Per shard, its (chunk index, lo, hi): N near-equal shards, each cut into pieces of
    at most `chunk`, indexed in order across shards (written out here, not imported)."""
    out, index, lo = [], 0, 0
    for s in range(n):
        hi = lo + numel // n + (1 if s < numel % n else 0)
        own = []
        for a in range(lo, hi, chunk):
            own.append((index, a, min(a + chunk, hi)))
            index += 1
        out.append(own)
        lo = hi
    return out


class LossyOracle:
    """The lossy reduce-scatter's rounds from the codec alone: each member encodes its
    Delta plus its residual chunk by chunk; each shard's mean of the decoded estimates
    (float64 sum in ascending peer-ID order) is re-encoded by its owner, plus the
    owner's residual, in chunk context REDUCED_CHUNK + i, at the `owner_scale`; what
    every node applies is its decoding. `fallback` shards are re-encoded by non-owners:
    without a residual."""

    def __init__(self, codec, members, numel, chunk, owner_scale="mse"):
        self.codec, self.members = codec, sorted(members, key=lambda p: p.to_bytes())
        self.owner_codec = HoloCodec(bits=codec.bits, scale=owner_scale)
        self.plan = lossy_chunks(len(self.members), numel, chunk)
        self.sent = {pid: torch.zeros(numel) for pid in members}
        self.owned = {pid: torch.zeros(numel) for pid in members}

    def code(self, x, r, index, codec=None):
        codec = codec or self.codec
        ctx = ChunkContext(SEED, r, index, x.numel())
        return codec.decode(codec.encode(x.contiguous(), ctx), ctx)

    def round(self, r, deltas, contributors, fallback=()):
        numel = next(iter(deltas.values())).numel()
        est = {}
        for pid in contributors:
            target = deltas[pid] + self.sent[pid]
            est[pid] = torch.empty(numel)
            for shard in self.plan:
                for i, a, b in shard:
                    est[pid][a:b] = self.code(target[a:b], r, i)
            self.sent[pid] = target - est[pid]
        out = torch.empty(numel)
        for s, shard in enumerate(self.plan):
            owner = self.members[s]
            for i, a, b in shard:
                acc = torch.zeros(b - a, dtype=torch.float64)
                for pid in sorted(contributors, key=lambda p: p.to_bytes()):
                    acc += est[pid][a:b].double()
                mean = (acc / len(contributors)).float()
                if s in fallback:
                    out[a:b] = self.code(mean, r, REDUCED_CHUNK + i, self.owner_codec)
                    continue
                target = mean + self.owned[owner][a:b]
                out[a:b] = self.code(target, r, REDUCED_CHUNK + i, self.owner_codec)
                self.owned[owner][a:b] = target - out[a:b]
        return out


async def test_a_lossy_codec_applies_the_owners_reencoded_means_on_every_node():
    """Three rounds of holo at 1 bit: every node's result equals the oracle's bit for
    bit, the chunks a shard is cut into included, both residuals carried."""
    async with peers(4) as ps:
        ex = make(ps, codec=HoloCodec(bits=1, scale="unbiased"), error_feedback=True)
        oracle = LossyOracle(HoloCodec(bits=1, scale="unbiased"), list(ex), NUMEL, CHUNK)
        for r in range(3):
            deltas = random_deltas(list(ex), r)
            means, reports = await run_round(ex, r, deltas, {pid: 7 for pid in ex})
            expected = oracle.round(r, deltas, list(ex))
            exact = canonical_mean_of({pid.to_bytes(): d for pid, d in deltas.items()})
            for pid, mean in means.items():
                assert torch.equal(mean, expected), f"round {r}: not the re-encoded means"
                assert reports[pid].in_sync and reports[pid].received == 3
            # a 1-bit estimate of the mean: correlated with it, not equal to it
            cos = torch.nn.functional.cosine_similarity(expected, exact, dim=0)
            assert 0.3 < float(cos) < 0.99, float(cos)
        # the owner's feedback is one shard's worth (O(|theta| / N)), and it is the
        # oracle's: kept in the exchange's state, so a checkpoint carries it
        for pid, a in ex.items():
            state = a.state_dict()
            assert set(state) == {"ef.residual", "ef.owner_residual"}
            s = sorted(ex, key=lambda p: p.to_bytes()).index(pid)
            lo, hi = oracle.plan[s][0][1], oracle.plan[s][-1][2]
            assert torch.equal(state["ef.owner_residual"], oracle.owned[pid][lo:hi])
            assert torch.equal(state["ef.residual"], oracle.sent[pid])


async def test_a_lossy_dead_owners_shard_is_reencoded_alike_by_the_others():
    async with peers(4) as ps:
        ex = make(ps, codec=HoloCodec(bits=2), error_feedback=True)
        dead = sorted(ex, key=lambda p: p.to_bytes())[1]  # owns shard 1
        alive = await kill(ps, dead)
        oracle = LossyOracle(HoloCodec(bits=2), list(ex), NUMEL, CHUNK)
        for r in range(2):
            deltas = random_deltas(list(ex), r)
            means, reports = await run_round(ex, r, deltas, {pid: 7 for pid in ex}, only=alive)
            expected = oracle.round(r, deltas, alive, fallback={1})
            for pid in alive:
                assert torch.equal(means[pid], expected)
                assert reports[pid].missing == [str(dead)]


async def test_a_lossy_reduce_scatter_sends_about_half_the_all_gathers_bytes():
    """Holo at 1 bit, 4 nodes: each node sends its pieces to 3 owners and its shard to
    3 gatherers, 2 x 3/4 of its encoding, where the all-gather sends 3 whole ones."""
    numel, chunk = 1 << 18, 1 << 14  # payload large beside per-request headers
    sent = {}
    for cls in (ShardedAveraging, Averaging):
        async with peers(4) as ps:
            ex = make(ps, cls, codec=HoloCodec(bits=1), chunk=chunk, error_feedback=True)
            before = {p.id: p.traffic.total_sent for p in ps}
            await run_round(ex, 0, random_deltas(list(ex), 0, numel), {pid: 7 for pid in ex})
            sent[cls] = [p.traffic.total_sent - before[p.id] for p in ps]
    encoding = numel / 8  # 1 bit per coordinate
    for b in sent[ShardedAveraging]:
        assert 1.4 * encoding < b < 1.8 * encoding, b  # 1.5 |enc| plus headers and scales
    for b in sent[Averaging]:
        assert 2.9 * encoding < b < 3.4 * encoding, b


async def test_a_lossy_exchange_serves_only_encoded_chunks_and_whole_result_chunks():
    """A peer's requests to a lossy run, served after a real round: a raw float32 piece
    (what the exact codec serves) is refused naming the codec, a probe still answers;
    a shard result is served only by whole chunks of that shard."""
    from fflnode.p2p import bulk

    async with peers(4) as ps:
        ex = make(ps, codec=HoloCodec(bits=1), error_feedback=True)
        await run_round(ex, 0, random_deltas(list(ex), 0), {pid: 7 for pid in ex})
        members = sorted(ex, key=lambda p: p.to_bytes())
        a, asker = ex[members[0]], str(members[1])

        def msg(what, index, lo, hi):
            return {"round": 0, "what": what, "index": index, "lo": lo, "hi": hi}

        with pytest.raises(bulk.Unavailable) as info:
            await a._resolve(asker, msg("piece", 0, 0, 10))
        assert info.value.code == "codec" and "holo" in info.value.reason
        codec, parts, meta = await a._resolve(asker, msg("piece", 0, 5, 5))  # a probe
        assert meta["start"] == 7 and parts[0][1].size == 0
        lo, hi, _ = a.shards(NUMEL)[0]
        codec, parts, meta = await a._resolve(asker, msg("reduced", 0, lo, lo + CHUNK))
        assert codec == "holo" and meta["count"] == 4
        for index, bad_lo, bad_hi in [
            (0, lo + 1, lo + CHUNK),  # inside a chunk, not one
            (0, lo, hi),  # the whole shard in one request: over chunk_elems
            (0, hi, hi + CHUNK),  # another shard's range
            (4, lo, lo + CHUNK),  # no shard 4
        ]:
            with pytest.raises(bulk.Unavailable) as info:
                await a._resolve(asker, msg("reduced", index, bad_lo, bad_hi))
            assert info.value.code == "bad-request", (index, bad_lo, bad_hi)
