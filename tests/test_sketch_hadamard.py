"""The randomized Hadamard rotation: exact inverse, orthogonality, layout, reference formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fflnode.errors import ConfigError, FormatError
from fflnode.sketch.hadamard import (
    BLOCK,
    TILE_BLOCKS,
    RandomizedHadamard,
    hadamard16,
    padded_numel,
    tile_blocks,
)
from fflnode.sketch.rng import ChunkSeed


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread for these tests (restored after): with two, every torch op
    here ran ~30x slower whenever another process held a core of this 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WHERE = ChunkSeed(42, 3, 1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


@settings(max_examples=25, deadline=None)
@given(numel=st.integers(1, 3 * TILE_BLOCKS * BLOCK + 700), seed=st.integers(0, 2**64 - 1))
def test_inverse_undoes_forward_to_float_tolerance(numel: int, seed: int) -> None:
    rot = RandomizedHadamard(numel, ChunkSeed(seed, 0, 0))
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    z = rot.forward(x)
    assert z.shape == (rot.padded,) and rot.padded == padded_numel(numel)
    assert rel(rot.inverse(z), x) < 1e-6
    assert abs(float(z.double().norm() / x.double().norm()) - 1) < 1e-6


def test_matrix_is_orthogonal() -> None:
    numel = 300  # padded to 512: the rotation is a 512 x 300 isometry
    rot = RandomizedHadamard(numel, WHERE)
    m = torch.stack([rot.forward(e) for e in torch.eye(numel)], dim=1).double()
    torch.testing.assert_close(m.T @ m, torch.eye(numel, dtype=torch.float64), atol=1e-6, rtol=0)
    square = RandomizedHadamard(2 * BLOCK, WHERE)
    q = torch.stack([square.forward(e) for e in torch.eye(2 * BLOCK)], dim=1).double()
    torch.testing.assert_close(
        q @ q.T, torch.eye(2 * BLOCK, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_inner_products_are_preserved() -> None:
    rot = RandomizedHadamard(100_000, WHERE)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(100_000, generator=g), torch.randn(100_000, generator=g)
    got = float(rot.forward(x).double() @ rot.forward(y).double())
    assert got == pytest.approx(
        float(x.double() @ y.double()), abs=1e-3 * float(x.norm() * y.norm())
    )


def test_hadamard16_is_symmetric_orthogonal_and_exact() -> None:
    h = hadamard16(torch.device("cpu"))
    assert torch.equal(h, h.T)
    assert torch.equal(h @ h, torch.eye(16))  # entries +-1/4: products and sums are exact
    assert set(h.abs().unique().tolist()) == {0.25}


def test_tiles_cover_the_padded_chunk_with_odd_block_counts() -> None:
    for blocks in [1, 2, 3, 4, 1020, 1021, 1022, 1023, 5 * 1021 + 6]:
        sizes = tile_blocks(blocks)
        assert sum(sizes) == blocks
        assert all(m % 2 == 1 and 1 <= m <= TILE_BLOCKS for m in sizes)


def reference_forward(rot: RandomizedHadamard, x: np.ndarray) -> np.ndarray:
    """The module docstring's formula in float64 numpy: shift, tile, sign, 256-point WHT."""
    w = np.zeros(rot.padded)
    w[: rot.numel] = x
    w = np.roll(w, -rot.shift)
    h = hadamard16(torch.device("cpu")).double().numpy()
    s = rot.signs().double().numpy()
    out = []
    for t, (start, m) in enumerate(rot.tiles):
        u = w[start : start + m * BLOCK].reshape(16, 16, m)
        out.append(np.einsum("ia,jb,abk->ijk", h, h, s[t][:, :, None] * u).reshape(-1))
    return np.concatenate(out)


@pytest.mark.parametrize("numel", [1, 256, 1000, TILE_BLOCKS * BLOCK + 300])
def test_forward_matches_the_reference_formula(numel: int) -> None:
    rot = RandomizedHadamard(numel, WHERE)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(2))
    want = reference_forward(rot, x.double().numpy())
    np.testing.assert_allclose(rot.forward(x).double().numpy(), want, atol=1e-5, rtol=0)


def test_a_spike_spreads_evenly_over_its_block() -> None:
    numel = 51 * BLOCK
    rot = RandomizedHadamard(numel, WHERE)
    spike = torch.zeros(numel)
    spike[1234] = 1.0
    z = rot.forward(spike)
    nz = z.abs() > 0
    assert int(nz.sum()) == BLOCK
    torch.testing.assert_close(z[nz].abs(), torch.full((BLOCK,), 1 / 16))


def test_randomness_depends_on_seed_round_and_chunk_only() -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    same = RandomizedHadamard(5000, ChunkSeed(42, 3, 1)).forward(x)
    assert torch.equal(RandomizedHadamard(5000, WHERE).forward(x), same)
    for other in [ChunkSeed(43, 3, 1), ChunkSeed(42, 4, 1), ChunkSeed(42, 3, 2)]:
        assert not torch.allclose(RandomizedHadamard(5000, other).forward(x), same)


def test_structured_input_is_spread_evenly_over_blocks() -> None:
    # One large column (period 64) and a contiguous run: the in-tile stride puts an
    # equal share of both in every block, where contiguous blocks would hold all or none.
    x = torch.zeros(64 * 1024)
    x[20_000:30_000] = 1.0
    x[::64] = 10.0
    rot = RandomizedHadamard(x.numel(), WHERE)
    z = rot.forward(x)
    start, m = rot.tiles[0]
    energy = z[start : start + m * BLOCK].view(16, 16, m).square().sum((0, 1))
    assert float(energy.max() / energy.min()) < 1.1
    contiguous = x[: m * BLOCK].view(m, BLOCK).square().sum(1)
    assert float(contiguous.max() / contiguous.min()) > 1.5  # what a plain layout gets


def test_output_buffers_are_used_and_bad_shapes_rejected() -> None:
    rot = RandomizedHadamard(1000, WHERE)
    x = torch.randn(1000)
    z = torch.empty(rot.padded)
    assert rot.forward(x, out=z) is z
    back = torch.empty(1000)
    assert rot.inverse(z, out=back) is back
    with pytest.raises(FormatError):
        rot.forward(torch.randn(999))
    with pytest.raises(FormatError):
        rot.forward(torch.randn(1000, dtype=torch.float64))
    with pytest.raises(FormatError):
        rot.inverse(torch.randn(1000))
    with pytest.raises(ConfigError):
        RandomizedHadamard(0, WHERE)
