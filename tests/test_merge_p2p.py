"""The final merge over real libp2p hosts in one process: exact, hash-agreed, bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import trio
from safetensors.torch import load_file

from fflnode.merge.protocol import MERGE_PROTOCOL, MergeSession
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


async def run_merge(tmp_path: Path, n: int, shards: int, piece_elems: int) -> None:
    async with peers(n) as ps:
        models = {p.id: random_model(i) for i, p in enumerate(ps)}
        layout = FlatLayout.of(models[ps[0].id])
        members = [p.id for p in ps]
        sessions = []
        for p in ps:
            s = MergeSession(
                p.host, p.membership, "test-run", members, layout, shards=shards, quorum=0,
                window=2, piece_elems=piece_elems, timeout_s=MERGE_TIMEOUT_S, traffic=p.traffic,
            )
            p.host.set_stream_handler(MERGE_PROTOCOL, s.handle)
            sessions.append(s)
        outcomes = {}

        async def one(p, s):
            d = tmp_path / str(p.id)
            d.mkdir()
            save_tensors(d / "premerge.safetensors", models[p.id])
            outcomes[p.id] = await s.run(d / "premerge.safetensors", d / "merged.safetensors")

        with trio.fail_after(MERGE_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for p, s in zip(ps, sessions, strict=True):
                    nursery.start_soon(one, p, s)

    expected = canonical_mean([(pid.to_bytes(), m) for pid, m in models.items()])
    expected_hash = model_hash(expected)
    for pid, outcome in outcomes.items():
        merged = load_file(str(tmp_path / str(pid) / "merged.safetensors"))
        assert set(merged) == set(expected)
        for k in expected:
            assert torch.equal(merged[k], expected[k]), k
        assert outcome.hash == expected_hash
        assert outcome.shards == shards
        assert sorted(outcome.members) == sorted(str(m) for m in models)
    owned = sorted(j for o in outcomes.values() for j in o.owned)
    assert owned == list(range(shards))  # every shard reduced by exactly one owner


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
