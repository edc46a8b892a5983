"""The shift-fold count sketch (and the dense Gaussian baseline): linearity, adjoint,
definition, JL distortion, heavy-hitter recovery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fflnode.errors import ConfigError, FormatError
from fflnode.sketch.countsketch import ShiftFoldSketch
from fflnode.sketch.dense import GaussianProjection, jl_bound
from fflnode.sketch.rng import ChunkSeed, Purpose


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread for these tests (restored after): with two, every torch op
    here ran ~30x slower whenever another process held a core of this 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WHERE = ChunkSeed(7, 1, 0)


def vec(n: int, seed: int, kind: str = "gauss") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(n, generator=g)
    if kind == "heavy":  # Student-t with 3 degrees of freedom: heavy tails
        t = torch.distributions.StudentT(3.0)
        return t.sample((n,)).to(torch.float32)
    x = torch.zeros(n)  # 1 % nonzero
    idx = torch.randperm(n, generator=g)[: n // 100]
    x[idx] = torch.randn(idx.numel(), generator=g)
    return x


def test_sketches_of_peers_sharing_a_seed_add_up() -> None:
    op = ShiftFoldSketch(1024, 5, WHERE)
    xs = [vec(50_000, s) for s in range(3)]
    summed = sum(op.project(x) for x in xs)
    torch.testing.assert_close(summed, op.project(xs[0] + xs[1] + xs[2]), atol=1e-4, rtol=1e-5)
    a, b = 2.5, -0.75
    torch.testing.assert_close(
        op.project(a * xs[0] + b * xs[1]),
        a * op.project(xs[0]) + b * op.project(xs[1]),
        atol=1e-4,
        rtol=1e-5,
    )


def test_matches_the_definition_entry_by_entry() -> None:
    n, op = 3000, ShiftFoldSketch(64, 3, WHERE)
    x = vec(n, 1).double()
    want = torch.zeros(op.size, dtype=torch.float64)
    for r, k in enumerate(op.widths):
        u = op.where.key(Purpose.SKETCH_SIGNS, r).signs(0, -(-n // k)).double()
        for i in range(n):
            want[op.offsets[r] + i % k] += u[i // k] * x[i] / math.sqrt(3)
    torch.testing.assert_close(op.project(x.float()).double(), want, atol=1e-4, rtol=1e-5)


def test_widths_are_distinct_and_near_nominal() -> None:
    op = ShiftFoldSketch(4096, 7, WHERE)
    assert len(set(op.widths)) == 7
    assert all(4096 - 64 < k <= 4096 for k in op.widths)
    assert op.size == sum(op.widths)
    assert ShiftFoldSketch(4096, 7, ChunkSeed(8, 1, 0)).widths != op.widths


@settings(max_examples=20, deadline=None)
@given(cuts=st.lists(st.integers(0, 20_000), max_size=6), offset=st.integers(0, 10**9))
def test_streaming_pieces_equal_one_projection(cuts: list[int], offset: int) -> None:
    op = ShiftFoldSketch(999, 5, WHERE)
    x = vec(20_000, 2)
    bounds = sorted({0, 20_000, *cuts})
    s = op.zeros()
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        op.accumulate(s, x[lo:hi], offset + lo)
    whole = op.accumulate(op.zeros(), x, offset)
    torch.testing.assert_close(s, whole, atol=1e-4, rtol=1e-5)


def test_adjoint_identity() -> None:
    n = 40_000
    op = ShiftFoldSketch(1500, 5, WHERE)
    x = vec(n, 3).double()
    y = vec(op.size, 4).double()
    lhs = float(op.project(x.float()).double() @ y)
    rhs = float(x @ op.adjoint(y.float(), 0, n).double())
    assert lhs == pytest.approx(rhs, rel=1e-4)
    # an offset window of the adjoint is the same slice of the full adjoint
    torch.testing.assert_close(
        op.adjoint(y.float(), 1234, 5000), op.adjoint(y.float(), 0, n)[1234:6234]
    )


def test_dense_gaussian_adjoint_identity() -> None:
    p = GaussianProjection(64, 5000, WHERE)
    x, y = vec(5000, 5), vec(64, 6)
    assert float(p.apply(x) @ y) == pytest.approx(float(x @ p.adjoint(y)), rel=1e-4)


@pytest.mark.parametrize("width", [1024, 4096])
@pytest.mark.parametrize("kind", ["gauss", "heavy", "sparse"])
def test_distortion_p95_is_within_the_gaussian_jl_bound(width: int, kind: str) -> None:
    n, trials = 1 << 15, 120
    x = vec(n, 10, kind)
    norm = float(x.double().square().sum())
    d = []
    for seed in range(trials):
        op = ShiftFoldSketch(width, 5, ChunkSeed(seed, 0, 0))
        d.append(abs(op.norm_sq(op.project(x)) / norm - 1))
    p95 = float(np.percentile(d, 95))
    assert p95 <= jl_bound(op.size)
    # and it is no worse than a dense Gaussian of the same size would typically be
    assert p95 <= 1.3 * 1.96 * math.sqrt(2 / op.size)


def test_jl_bound_solves_its_tail_inequality() -> None:
    for m in [256, 1024, 5000, 1 << 16]:
        eps = jl_bound(m, 0.05)
        assert 2 * math.exp(-m * (eps**2 - eps**3) / 4) == pytest.approx(0.05, rel=1e-6)
    assert jl_bound(4096) < jl_bound(1024)
    assert jl_bound(10) == math.inf


def test_planted_spikes_are_recovered_exactly() -> None:
    n, op = 200_000, ShiftFoldSketch(4096, 5, WHERE)
    g = torch.Generator().manual_seed(11)
    x = 0.01 * torch.randn(n, generator=g)
    spikes = torch.randperm(n, generator=g)[:12].sort().values
    heights = torch.linspace(3, 10, 12) * torch.sign(torch.randn(12, generator=g))
    x[spikes] = heights
    idx, est = op.heavy_hitters(op.project(x), n, 12)
    assert torch.equal(idx, spikes)
    torch.testing.assert_close(est, heights, atol=0.1, rtol=0)


def test_heavy_hitters_of_a_summed_sketch_find_the_sum_s_spikes() -> None:
    # Each peer's update is noise plus spikes; the shared heavy coordinates only stand
    # out in the sum, which the receiver recovers from the sum of sketches.
    n, op = 100_000, ShiftFoldSketch(2048, 5, WHERE)
    common = torch.tensor([17, 40_000, 99_999])
    peers = []
    for p in range(4):
        x = 0.02 * vec(n, 20 + p)
        x[common] += 1.0
        peers.append(op.project(x))
    idx, est = op.heavy_hitters(sum(peers), n, 3)
    assert torch.equal(idx, common)
    torch.testing.assert_close(est, torch.full((3,), 4.0), atol=0.6, rtol=0)


def test_row_estimates_are_unbiased_over_seeds() -> None:
    n = 5000
    x = vec(n, 30)
    mean = torch.zeros(n, dtype=torch.float64)
    seeds = 200
    for seed in range(seeds):
        op = ShiftFoldSketch(512, 3, ChunkSeed(seed, 2, 2))
        mean += op.adjoint(op.project(x), 0, n).double() / seeds
    # each seed's P^T P x has error variance ~ n/m per coordinate; the mean shrinks it
    err = float((mean - x.double()).square().sum() / x.double().square().sum())
    assert err < 3 * (n / (3 * 512)) / seeds


def test_min_magnitude_filters_noise() -> None:
    n, op = 10_000, ShiftFoldSketch(256, 5, WHERE)
    x = vec(n, 40)
    s = op.project(x)
    idx, _ = op.heavy_hitters(s, n, 50, min_magnitude=10 * op.noise_level(s))
    assert idx.numel() == 0


def test_bad_parameters_and_inputs_are_rejected() -> None:
    with pytest.raises(ConfigError):
        ShiftFoldSketch(8, 5, WHERE)  # too narrow for 5 distinct widths
    with pytest.raises(ConfigError):
        ShiftFoldSketch(1024, 0, WHERE)
    op = ShiftFoldSketch(64, 3, WHERE)
    with pytest.raises(FormatError):
        op.accumulate(torch.zeros(op.size + 1), torch.ones(10), 0)
    with pytest.raises(FormatError):
        op.accumulate(op.zeros(), torch.ones(10, dtype=torch.float64), 0)
    with pytest.raises(FormatError):
        op.row_estimates(op.zeros(), 0, 0)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 7])
def test_tiled_median_and_adjoint_equal_their_definitions(rows: int) -> None:
    n, op = 70_000, ShiftFoldSketch(300, rows, WHERE)
    s = op.project(vec(n, 50))
    est = op.row_estimates(s, 1000, n - 1000).double()
    want = (
        est.median(0).values
        if rows % 2
        else est.sort(0).values[rows // 2 - 1 : rows // 2 + 1].mean(0)
    )
    torch.testing.assert_close(op.estimate(s, 1000, n - 1000).double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        op.adjoint(s, 1000, n - 1000).double(), est.mean(0), atol=1e-5, rtol=1e-5
    )
