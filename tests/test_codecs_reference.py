"""The benchmark's reference codecs (tools/codecs_reference.py) against their definitions,
and against the packages that ship them where those install (torch.distributed's
PowerSGD hook always; hivemind's quantizers when hivemind is importable)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fflnode.codecs import ChunkContext, ErrorFeedback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from codecs_reference import (  # noqa: E402
    QSGD,
    Float16,
    HivemindCodec,
    PowerSGD,
    QuantileQuantization,
    SignScale,
    UniformQuantization,
)


def ctx(n: int, seed: int = 0, round: int = 0) -> ChunkContext:
    return ChunkContext(seed=seed, round=round, chunk=0, numel=n)


def nmse(est: torch.Tensor, x: torch.Tensor) -> float:
    return float((est - x).double().square().sum() / x.double().square().sum())


def heavy_tailed(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(3) * 0.01


# ------------------------------------------------------------------------ QSGD


def test_qsgd_is_unbiased_the_mean_over_seeds_converges_to_x() -> None:
    x, codec, seeds = heavy_tailed(1000), QSGD(levels=1, bucket=128), 4000
    total, per_seed = torch.zeros_like(x, dtype=torch.float64), []
    for s in range(seeds):
        est = codec.decode(codec.encode(x, ctx(1000, seed=s)), ctx(1000))
        total += est.double()
        per_seed.append(nmse(est, x))
    # E||mean - x||^2 = E||Q(x) - x||^2 / seeds for independent seeds: allow 3x that
    assert nmse((total / seeds).float(), x) < 3 * float(np.mean(per_seed)) / seeds


@pytest.mark.parametrize(("levels", "bucket"), [(1, 128), (7, 512), (127, 512)])
def test_qsgd_variance_is_within_the_papers_bound(levels: int, bucket: int) -> None:
    x, codec = heavy_tailed(4096, seed=1), QSGD(levels, bucket)
    errors = [nmse(codec.decode(codec.encode(x, ctx(4096, s)), ctx(4096)), x) for s in range(50)]
    bound = min(bucket / levels**2, math.sqrt(bucket) / levels)  # Alistarh et al., Lemma 3.1
    assert float(np.mean(errors)) <= bound


def test_qsgd_values_lie_on_the_norm_grid_and_the_wire_is_fixed_width() -> None:
    n, codec = 1000, QSGD(levels=7, bucket=128)
    x = heavy_tailed(n, seed=2)
    enc = codec.encode(x, ctx(n))
    est = codec.decode(enc, ctx(n))
    norms = enc.parts["norms"].repeat(128)[:n]
    steps = est.numpy() / norms * 7
    assert np.allclose(steps, np.round(steps), atol=1e-4) and np.abs(steps).max() <= 7 + 1e-4
    assert np.all(np.sign(est.numpy()) * np.sign(x.numpy()) >= 0)  # never flips a sign
    assert codec.bits == 4  # 15 signed levels
    assert enc.wire_bytes == 4 * math.ceil(n / 8) + 4 * math.ceil(n / 128)


# ------------------------------------------------------------------- sign+scale


def test_sign_scale_sends_the_mean_magnitude_of_each_block_with_the_signs() -> None:
    n, block = 1000, 256
    x = heavy_tailed(n, seed=3)
    codec = SignScale(block)
    enc = codec.encode(x, ctx(n))
    est = codec.decode(enc, ctx(n))
    for start in range(0, n, block):
        part = x[start : start + block]
        scale = float(part.abs().mean())
        expect = torch.where(part >= 0, scale, -scale)
        assert torch.allclose(est[start : start + block], expect, rtol=1e-6)
    assert enc.wire_bytes == math.ceil(n / 8) + 4 * math.ceil(n / block)
    whole = SignScale().encode(x, ctx(n))  # one block: EF-signSGD's ||x||_1 / d
    assert whole.parts["scales"][0] == pytest.approx(float(x.abs().mean()), rel=1e-6)


# ------------------------------------------------ hivemind-style quantization


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_codebook_holds_the_mean_of_each_bin(bits: int) -> None:
    x = heavy_tailed(5000, seed=4)
    codec = UniformQuantization(bits)
    codes = codec.codes(x)
    enc = codec.encode(x, ctx(5000))
    book = enc.parts["codebook"]
    for k in range(1 << bits):
        members = x[codes.long() == k]
        if members.numel():
            assert book[k] == pytest.approx(float(members.double().mean()), rel=1e-5, abs=1e-9)
    order = torch.argsort(x)
    assert bool((codes[order].diff().to(torch.int16) >= 0).all())  # bins are intervals
    assert torch.equal(codec.decode(enc, ctx(5000)), torch.from_numpy(book[codes.numpy()]))
    assert enc.wire_bytes == 8 + 4 * (1 << bits) + bits * math.ceil(5000 / 8)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantile_bins_hold_equal_numbers_of_values(bits: int) -> None:
    n = 4096
    x = heavy_tailed(n, seed=5)
    counts = torch.bincount(QuantileQuantization(bits).codes(x).long(), minlength=1 << bits)
    assert int(counts.max() - counts.min()) <= 2


def test_float16_is_a_clamped_cast() -> None:
    x = torch.tensor([1e-3, -2.5, 1e6, -1e6])
    enc = Float16().encode(x, ctx(4))
    assert enc.wire_bytes == 8
    assert Float16().decode(enc, ctx(4)).tolist() == [
        float(torch.tensor(1e-3).half()),
        -2.5,
        65504.0,
        -65504.0,
    ]


@pytest.mark.parametrize("n", [5000, 250_001])  # one quantile chunk, and three
def test_quantizers_match_hivemind_bit_for_bit(n: int) -> None:
    quantization = pytest.importorskip("hivemind.compression.quantization")
    x = heavy_tailed(n, seed=6)
    for ours, theirs in (
        (UniformQuantization(8), quantization.Uniform8BitQuantization()),
        (QuantileQuantization(8), quantization.Quantile8BitQuantization()),
    ):
        codes, book = theirs.quantize(x.clone())
        enc = ours.encode(x, ctx(n))
        assert np.array_equal(enc.parts["codes"], codes)
        assert np.array_equal(enc.parts["codebook"], book)
        from hivemind.compression import CompressionInfo

        message = theirs.compress(x, CompressionInfo.from_tensor(x))
        assert len(message.buffer) == enc.wire_bytes
        assert torch.equal(ours.decode(enc, ctx(n)), torch.from_numpy(book[codes]))
        # hivemind 1.1.12's own extract() calls int() on a 1-element array, an error
        # from numpy 2.4 on; HivemindCodec reads the same buffer layout around it
        assert torch.equal(
            HivemindCodec(type(theirs).__name__).decode(
                HivemindCodec(type(theirs).__name__).encode(x, ctx(n)), ctx(n)
            ),
            ours.decode(enc, ctx(n)),
        )


# ---------------------------------------------------------------------- PowerSGD


def test_powersgd_at_full_rank_reconstructs_exactly() -> None:
    shapes = [(8, 6), (5,)]
    x = heavy_tailed(53, seed=7)
    codec = PowerSGD(shapes, rank=6, min_compression_rate=0)
    est = codec.decode(codec.encode(x, ctx(53)), ctx(53))
    assert torch.allclose(est, x, rtol=1e-4, atol=1e-7)


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation() -> None:
    g = torch.Generator().manual_seed(8)
    u, _ = torch.linalg.qr(torch.randn(40, 30, generator=g))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    s = torch.tensor([0.7**i for i in range(30)])
    m = (u * s) @ v.T
    codec = PowerSGD([(40, 30)], rank=3)
    for r in range(40):  # the same matrix every round: power iteration on it
        est = codec.decode(codec.encode(m.reshape(-1), ctx(1200, round=r)), ctx(1200))
    best = float(s[3:].square().sum() / s.square().sum())  # Eckart-Young
    assert nmse(est, m.reshape(-1)) == pytest.approx(best, rel=1e-3)


def test_powersgd_wire_is_n_plus_m_times_r_floats_per_compressed_matrix() -> None:
    shapes = [(10,), (10, 64), (192, 64), (192, 1)]  # the GRU's head and rnn, in part
    n = sum(math.prod(s) for s in shapes)
    codec = PowerSGD(shapes, rank=2)
    enc = codec.encode(heavy_tailed(n, seed=9), ctx(n))
    # (10, 64) and (192, 64) pass the min_compression_rate test; (192, 1) never can
    assert enc.wire_bytes == 4 * ((10 + 64) * 2 + (192 + 64) * 2 + 10 + 192)
    assert codec.wire_floats() * 4 == enc.wire_bytes


class _Bucket:
    """What torch's powerSGD_hook reads from a DDP GradBucket."""

    def __init__(self, flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> None:
        self.flat = flat
        self.views, offset = [], 0
        for shape in shapes:
            numel = math.prod(shape)
            self.views.append(flat[offset : offset + numel].view(shape))
            offset += numel

    def buffer(self) -> torch.Tensor:
        return self.flat

    def gradients(self) -> list[torch.Tensor]:
        return self.views

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True


def test_powersgd_with_error_feedback_matches_torch_powersgd_hook() -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as hook

    shapes = [(10,), (16, 8), (12, 3, 4)]
    n = sum(math.prod(s) for s in shapes)
    rank, seed = 2, 11
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        state = hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=2,
            use_error_feedback=True,
            warm_start=True,
            random_seed=seed,
        )
        for _ in range(2):  # the hook runs plain all-reduce before start_powerSGD_iter
            hook.powerSGD_hook(state, _Bucket(torch.zeros(n), shapes)).wait()
        ours = PowerSGD(shapes, rank=rank)
        # the hook's first Qs: one fork of torch's global RNG, seeded from its numpy RNG
        torch.manual_seed(np.random.RandomState(seed).randint(1_000_000_000))
        ours.q_memory[0] = [torch.randn(1, 8, rank)[0], torch.randn(1, 12, rank)[0]]
        ef = ErrorFeedback(ours)
        for r in range(4):
            x = heavy_tailed(n, seed=100 + r)
            theirs = hook.powerSGD_hook(state, _Bucket(x.clone(), shapes)).wait()
            _, est = ef.encode(x, ctx(n, round=r))
            assert torch.allclose(est, theirs, rtol=1e-4, atol=1e-6), f"round {r}"
            assert torch.allclose(ef.residual[0], state.error_dict[0], rtol=1e-3, atol=1e-6)
    finally:
        dist.destroy_process_group()
