"""The final merge over real libp2p hosts in one process: exact, hash-agreed, bounded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import trio
from libp2p.peer.id import ID
from safetensors.torch import load_file

from fflnode.merge.protocol import MERGE_PROTOCOL, MergeOutcome, MergeSession
from fflnode.p2p.fastpath import Channel, FastPath
from fflnode.prism.writer import save_tensors
from fflnode.tensors import FlatLayout, canonical_mean, model_hash
from tests.p2p_harness import peers

MERGE_TIMEOUT_S = 60.0


def random_model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(37, 11, generator=g),
        "encoder.bias": torch.randn(37, generator=g),
        "head.weight": torch.randn(5, 37, generator=g) * 1e6,  # magnitudes that round
        "a_first": torch.randn(3, generator=g) * 1e-6,
    }


async def run_merge(
    tmp_path: Path,
    n: int,
    shards: int,
    piece_elems: int,
    fast: int = 0,
    model: Callable[[int], dict[str, torch.Tensor]] = random_model,
) -> dict[ID, MergeOutcome]:
    """A merge of n peers, the first `fast` of them with a FastPath (the others with none:
    their links are libp2p streams on MERGE_PROTOCOL); checks exactness and the hashes."""
    async with peers(n) as ps, trio.open_nursery() as servers:
        models = {p.id: model(i) for i, p in enumerate(ps)}
        layout = FlatLayout.of(models[ps[0].id])
        members = [p.id for p in ps]
        sessions: list[MergeSession] = []
        for i, p in enumerate(ps):
            fp = None
            if i < fast:
                assert p.key_pair is not None

                async def on_channel(peer: ID, channel: Channel, i: int = i) -> None:
                    await sessions[i].handle_channel(peer, channel)

                fp = FastPath(p.host, p.key_pair, on_channel, listen_host="127.0.0.1")
                await servers.start(fp.serve)
            s = MergeSession(
                p.host,
                p.membership,
                "test-run",
                members,
                layout,
                shards=shards,
                quorum=0,
                window=2,
                piece_elems=piece_elems,
                timeout_s=MERGE_TIMEOUT_S,
                traffic=p.traffic,
                fastpath=fp,
            )
            p.host.set_stream_handler(MERGE_PROTOCOL, s.handle)
            sessions.append(s)
        outcomes: dict[ID, MergeOutcome] = {}

        async def one(p, s):
            d = tmp_path / str(p.id)
            d.mkdir()
            save_tensors(d / "premerge.safetensors", models[p.id])
            outcomes[p.id] = await s.run(d / "premerge.safetensors", d / "merged.safetensors")

        with trio.fail_after(MERGE_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for p, s in zip(ps, sessions, strict=True):
                    nursery.start_soon(one, p, s)
        servers.cancel_scope.cancel()

    expected = canonical_mean([(pid.to_bytes(), m) for pid, m in models.items()])
    expected_hash = model_hash(expected)
    for pid, outcome in outcomes.items():
        merged = load_file(str(tmp_path / str(pid) / "merged.safetensors"))
        assert set(merged) == set(expected)
        for k in expected:
            assert torch.equal(merged[k], expected[k]), k
        assert outcome.hash == expected_hash
        assert outcome.shards == (shards or n)  # 0: one per member
        assert sorted(outcome.members) == sorted(str(m) for m in models)
    owned = sorted(j for o in outcomes.values() for j in o.owned)
    assert owned == list(range(shards or n))  # every shard reduced by exactly one owner
    return outcomes


async def test_three_node_merge_is_exact_and_hash_agreed(tmp_path: Path):
    # 7 shards of pieces of 64 elements: shards span tensor boundaries and several pieces.
    await run_merge(tmp_path, n=3, shards=7, piece_elems=64)


async def test_merge_differs_from_a_naive_float32_mean(tmp_path: Path):
    # Guard: the data must be such that order/precision matter, or the test above proves
    # nothing about canonical reduction.
    ms = [random_model(i) for i in range(3)]
    naive = {k: (ms[0][k] + ms[1][k] + ms[2][k]) / 3 for k in ms[0]}
    exact = canonical_mean([(bytes([i]), m) for i, m in enumerate(ms)])
    assert any(not torch.equal(naive[k], exact[k]) for k in exact)
    assert np.isfinite(sum(float(v.sum()) for v in exact.values()))


def wide_model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(1 << 20, generator=g), "b": torch.randn(999, generator=g) * 1e6}


async def test_merge_over_fast_paths_is_exact_and_holds_shards_plus_two_windows(tmp_path: Path):
    # 4 MiB over 4 nodes (M = N = 4), windows of 2 x 64 Ki elements (512 KiB): pieces of
    # 64 KiB, 16 per shard. The tracked aggregation memory (owned results, accumulators,
    # pieces held) stays within |theta|/N + 2 windows.
    outcomes = await run_merge(
        tmp_path, n=4, shards=0, piece_elems=1 << 16, fast=4, model=wide_model
    )
    numel = sum(t.numel() for t in wide_model(0).values())
    for o in outcomes.values():
        assert 0 < o.aggregation_peak_bytes <= 4 * numel / 4 + 2 * o.window_bytes


async def test_merge_falls_back_to_libp2p_for_a_peer_without_a_fast_path(tmp_path: Path):
    await run_merge(tmp_path, n=3, shards=5, piece_elems=64, fast=2)
