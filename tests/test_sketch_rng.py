"""Shared randomness: torch int32 words == a plain numpy uint32 reference, golden values,
device independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fflnode.errors import ConfigError
from fflnode.sketch import rng
from fflnode.sketch.countsketch import ShiftFoldSketch
from fflnode.sketch.hadamard import RandomizedHadamard
from fflnode.sketch.rng import ChunkSeed, Purpose, StreamKey, mix32_, signs_rows


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread for these tests (restored after): with two, every torch op
    here ran ~30x slower whenever another process held a core of this 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the reference: the same hash written plainly in numpy uint32 -----------------------

U32 = np.uint32


def mix32_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(U32)
    with np.errstate(over="ignore"):
        x ^= x >> U32(16)
        x *= U32(0x7FEB352D)
        x ^= x >> U32(15)
        x *= U32(0x846CA68B)
        x ^= x >> U32(16)
    return x


def derive_np(seed: int, round: int, chunk: int, purpose: int, sub: int = 0) -> tuple[int, int]:
    h = np.array([0x243F6A88, 0x85A308D3], dtype=U32)
    for value in (seed, round, chunk, purpose, sub):
        for w in (value & 0xFFFFFFFF, value >> 32):
            with np.errstate(over="ignore"):
                h = mix32_np((h ^ U32(w)) + U32(0x9E3779B9))
    return int(h[0]), int(h[1])


def words_np(k0: int, k1: int, start: int, count: int) -> np.ndarray:
    i = np.arange(start, start + count, dtype=np.uint64).astype(U32)
    with np.errstate(over="ignore"):
        return mix32_np(mix32_np(i + U32(k0)) ^ U32(k1))


def signs_np(k0: int, k1: int, start_bit: int, count: int) -> np.ndarray:
    w0 = start_bit // 32
    w1 = -(-(start_bit + count) // 32)
    w = words_np(k0, k1, w0, w1 - w0)
    bits = (w[:, None] >> np.arange(32, dtype=U32)) & U32(1)
    return (1.0 - 2.0 * bits.reshape(-1).astype(np.float64))[start_bit - 32 * w0 :][:count]


# ---- golden values: changing the hash or the key schedule must fail here ----------------

GOLDEN_KEY = (2024, 7, 3, Purpose.ROTATION_SIGNS, 0)
GOLDEN_K = (0xDC68927B, 0xB515089A)
GOLDEN_WORDS = [
    0x720FE148,
    0x30BF6021,
    0x157995C7,
    0xAC25328B,
    0x3D2A16CC,
    0xBCD59D77,
    0x135A6EEE,
    0xC4B58594,
]


def test_golden_key_and_first_words_are_pinned() -> None:
    key = StreamKey.derive(*GOLDEN_KEY)
    assert (key.k0, key.k1) == GOLDEN_K
    got = key.words(0, 8).numpy().view(U32).tolist()
    assert got == GOLDEN_WORDS
    assert words_np(*GOLDEN_K, 0, 8).tolist() == GOLDEN_WORDS


def test_key_derivation_matches_numpy_reference() -> None:
    for parts in [(0, 0, 0, 1, 0), (2**64 - 1, 2**40 + 5, 2**33, 4, 17), (7, 1, 2, 5, 3)]:
        key = StreamKey.derive(*parts)
        assert (key.k0, key.k1) == derive_np(*parts)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    start=st.integers(0, rng.COUNTER_LIMIT - 4096),
    count=st.integers(0, 4096),
)
def test_torch_words_match_numpy_reference(seed: int, start: int, count: int) -> None:
    key = StreamKey.derive(seed, 1, 2, Purpose.SKETCH_SIGNS)
    got = key.words(start, count).numpy().view(U32)
    np.testing.assert_array_equal(got, words_np(key.k0, key.k1, start, count))


def test_words_at_the_counter_limit_and_scalar_path_agree() -> None:
    key = StreamKey.derive(5, 6, 7, Purpose.GAUSSIAN)
    last = rng.COUNTER_LIMIT - 3
    got = key.words(last, 3).numpy().view(U32).tolist()
    assert got == words_np(key.k0, key.k1, last, 3).tolist()
    assert got == [key.word(i) for i in range(last, last + 3)]
    with pytest.raises(ConfigError):
        key.words(last, 4)


def test_logical_shift_emulation_on_negative_int32() -> None:
    edge = np.array([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF, 0x12345678], U32)
    x = torch.from_numpy(edge.view(np.int32).copy())
    np.testing.assert_array_equal(mix32_(x).numpy().view(U32), mix32_np(edge))
    assert [rng.mix32_int(int(v)) for v in edge] == mix32_np(edge).tolist()


@settings(max_examples=30, deadline=None)
@given(start=st.integers(0, 10_000), count=st.integers(0, 700))
def test_signs_match_numpy_reference(start: int, count: int) -> None:
    key = StreamKey.derive(11, 0, 9, Purpose.ROTATION_SIGNS)
    got = key.signs(start, count).double().numpy()
    np.testing.assert_array_equal(got, signs_np(key.k0, key.k1, start, count))


def test_batched_sign_rows_equal_single_rows() -> None:
    keys = [StreamKey.derive(3, 4, 5, Purpose.SKETCH_SIGNS, r) for r in range(5)]
    starts = [0, 31, 32, 1000, 77777]
    rows = signs_rows(keys, starts, 129)
    for r, (k, s) in enumerate(zip(keys, starts, strict=True)):
        assert torch.equal(rows[r], k.signs(s, 129))


def test_every_key_part_changes_the_stream() -> None:
    base = (1, 2, 3, Purpose.SKETCH_SIGNS, 4)
    streams = {tuple(StreamKey.derive(*base).words(0, 4).tolist())}
    for i in range(5):
        parts = list(base)
        parts[i] = parts[i] + 1
        streams.add(tuple(StreamKey.derive(*parts).words(0, 4).tolist()))
    assert len(streams) == 6


def test_key_parts_outside_64_bits_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        StreamKey.derive(-1, 0, 0, Purpose.GAUSSIAN)
    with pytest.raises(ConfigError):
        StreamKey.derive(0, 2**64, 0, Purpose.GAUSSIAN)


def test_draws_below_n_cover_the_range_evenly() -> None:
    key = StreamKey.derive(0, 0, 0, Purpose.ROTATION_SHIFT)
    draws = np.array([key.below(i, 10) for i in range(5000)])
    assert draws.min() == 0 and draws.max() == 9
    assert np.bincount(draws).min() > 400  # 500 expected per value


def test_signs_are_balanced_and_uncorrelated() -> None:
    s = StreamKey.derive(9, 9, 9, Purpose.ROTATION_SIGNS).signs(0, 1 << 16).double()
    assert abs(float(s.mean())) < 0.02  # 4 sigma of a fair coin at 65536 draws
    assert abs(float((s[1:] * s[:-1]).mean())) < 0.02


def _structures(device: str) -> list[torch.Tensor]:
    where = ChunkSeed(123, 4, 5)
    key = where.key(Purpose.GAUSSIAN)
    rot = RandomizedHadamard(3 * 261_376 + 1000, where, device)
    sk = ShiftFoldSketch(1000, 5, where, device)
    first, u = sk._segment_signs(12_345, 1 << 20)
    return [
        key.words(0, 1 << 16, device).cpu(),
        key.signs(5, 10_000, device).cpu(),
        rot.signs().cpu(),
        torch.tensor([rot.shift, *sk.widths, *first]),
        u.cpu(),
    ]


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device on this machine: CPU/GPU bit-identity runs only where one is",
)
def test_cuda_and_cpu_build_bit_identical_projections() -> None:
    for cpu, gpu in zip(_structures("cpu"), _structures("cuda"), strict=True):
        assert cpu.dtype == gpu.dtype and cpu.shape == gpu.shape
        assert cpu.numpy().tobytes() == gpu.numpy().tobytes()  # bit for bit


def test_cpu_projection_structures_match_numpy_reference() -> None:
    """The CPU half of the bit-identity check: what the CUDA test compares against is
    itself the numpy reference."""
    where = ChunkSeed(123, 4, 5)
    words, signs = _structures("cpu")[:2]
    key = where.key(Purpose.GAUSSIAN)
    np.testing.assert_array_equal(words.numpy().view(U32), words_np(key.k0, key.k1, 0, 1 << 16))
    np.testing.assert_array_equal(signs.double().numpy(), signs_np(key.k0, key.k1, 5, 10_000))
