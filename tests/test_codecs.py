"""Codecs: registry, round trips with their error scale and exact wire bytes,
unbiasedness, error feedback, and validation of hostile encodings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fflnode.codecs import (
    CODECS,
    ChunkContext,
    Encoded,
    ErrorFeedback,
    HoloCodec,
    NoneCodec,
    SketchCodec,
    TopKCodec,
    make_codec,
)
from fflnode.codecs.holo import STEP
from fflnode.codecs.packing import pack, packed_shape, unpack
from fflnode.codecs.topk import index_bits
from fflnode.errors import ConfigError, FormatError


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread for these tests (restored after): with two, every torch op
    here ran ~30x slower whenever another process held a core of this 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gauss(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def nmse(est: torch.Tensor, x: torch.Tensor) -> float:
    return float((est - x).double().square().sum() / x.double().square().sum())


CTX = ChunkContext(seed=5, round=2, chunk=1, numel=20_000)

# ---- registry ------------------------------------------------------------------------------


def test_importing_the_package_registers_every_codec() -> None:
    assert {"none", "holo", "topk", "sketch"} <= set(CODECS)
    assert isinstance(make_codec("holo", bits=1), HoloCodec)
    assert isinstance(make_codec("topk", ratio=0.1), TopKCodec)
    assert isinstance(make_codec("sketch", rows=3), SketchCodec)
    assert isinstance(make_codec("none"), NoneCodec)


@pytest.mark.parametrize(
    "name, params",
    [
        ("holo", {"bits": 0}),
        ("holo", {"bits": 9}),
        ("holo", {"scale": "median"}),
        ("holo", {"colour": 1}),
        ("topk", {"ratio": 0.0}),
        ("topk", {"k": 0}),
        ("sketch", {"rows": 0}),
        ("sketch", {"heavy": 2.0}),
        ("nope", {}),
    ],
)
def test_bad_configs_are_config_errors(name: str, params: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        make_codec(name, **params)


# ---- holo ----------------------------------------------------------------------------------

# NMSE on Gaussian chunks (what a rotated chunk looks like), with slack for chunk size.
HOLO_NMSE = {
    (1, "unbiased"): (0.50, 0.64),  # pi/2 - 1 = 0.571
    (1, "mse"): (0.33, 0.40),  # 1 - 2/pi = 0.363
    (2, "unbiased"): (0.11, 0.16),
    (2, "mse"): (0.10, 0.14),
    (4, "unbiased"): (0.008, 0.015),
    (8, "mse"): (0.0, 2e-4),
}


@pytest.mark.parametrize("bits, scale", sorted(HOLO_NMSE))
def test_holo_round_trip_error_and_exact_wire_bytes(bits: int, scale: str) -> None:
    codec = make_codec("holo", bits=bits, scale=scale)
    x = gauss(CTX.numel, 1)
    enc = codec.encode(x, CTX)
    lo, hi = HOLO_NMSE[(bits, scale)]
    assert lo <= nmse(codec.decode(enc, CTX), x) <= hi
    padded = -(-CTX.numel // 256) * 256
    assert enc.wire_bytes == bits * math.ceil(padded / 8) + 4 * 1  # one tile, one scale
    assert enc.parts["codes"].shape == (bits, padded // 8)


@pytest.mark.parametrize("numel", [1, 255, 257, 13_514, 600_000])
def test_holo_handles_any_chunk_length(numel: int) -> None:
    codec = HoloCodec(2)
    ctx = ChunkContext(1, 1, 1, numel)
    x = gauss(numel, 2)
    est = codec.decode(codec.encode(x, ctx), ctx)
    assert est.shape == (numel,) and est.dtype == torch.float32
    if numel > 1:
        assert nmse(est, x) < 0.2
    spec = codec.part_spec(ctx)
    assert sum(math.prod(s) * np.dtype(d).itemsize for d, s in spec.values()) == (
        codec.encode(x, ctx).wire_bytes
    )


def test_holo_one_bit_costs_one_bit_per_coordinate_on_large_chunks() -> None:
    ctx = ChunkContext(0, 0, 0, 1 << 20)
    enc = HoloCodec(1).encode(gauss(1 << 20, 3), ctx)
    assert 8 * enc.wire_bytes / ctx.numel < 1.001


def test_holo_unbiased_estimates_average_to_the_chunk_over_seeds() -> None:
    x = gauss(4096, 4)
    seeds = 64
    for scale, unbiased in (("unbiased", True), ("mse", False)):
        codec = HoloCodec(1, scale)
        mean = torch.zeros(4096, dtype=torch.float64)
        for s in range(seeds):
            ctx = ChunkContext(s, 0, 0, 4096)
            mean += codec.decode(codec.encode(x, ctx), ctx).double() / seeds
        err = nmse(mean.float(), x)
        if unbiased:  # variance 0.57 / seeds, no bias term
            assert err < 2 * 0.571 / seeds
        else:  # E[estimate] = (2/pi) x: bias (1 - 2/pi)^2 = 0.13 dominates
            assert err > 0.08


def test_holo_zero_chunk_decodes_to_zero() -> None:
    codec = HoloCodec(3)
    ctx = ChunkContext(0, 0, 0, 1000)
    enc = codec.encode(torch.zeros(1000), ctx)
    assert float(np.abs(enc.parts["scales"]).max()) == 0.0
    assert torch.equal(codec.decode(enc, ctx), torch.zeros(1000))


def _uniform_quantizer_mse(step: float, levels: int) -> float:
    """E[(g - Q(g))^2] for g ~ N(0, 1) and the midrise quantizer the holo codec uses."""
    g = np.linspace(-12, 12, 400_001)
    pdf = np.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    code = np.clip(np.floor(g / step + levels / 2), 0, levels - 1)
    q = (code + 0.5 - levels / 2) * step
    return float(np.sum((g - q) ** 2 * pdf) * (g[1] - g[0]))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_holo_quantizer_steps_are_mse_optimal_for_a_gaussian(bits: int) -> None:
    levels, step = 1 << bits, STEP[bits]
    best = _uniform_quantizer_mse(step, levels)
    for factor in (0.97, 1.03):
        assert best <= _uniform_quantizer_mse(step * factor, levels)


# ---- topk ----------------------------------------------------------------------------------


def test_topk_recovers_a_sparse_chunk_exactly_with_exact_bytes() -> None:
    n, k = 20_000, 50
    x = torch.zeros(n)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(5))[:k]
    x[idx] = gauss(k, 6)
    codec = make_codec("topk", k=k)
    enc = codec.encode(x, ChunkContext(0, 0, 0, n))
    assert torch.equal(codec.decode(enc, ChunkContext(0, 0, 0, n)), x)
    bits = index_bits(n)
    assert bits == 15
    assert enc.wire_bytes == k * 4 + bits * math.ceil(k / 8)


def test_topk_keeps_the_largest_magnitudes() -> None:
    x = gauss(CTX.numel, 7)
    codec = TopKCodec(ratio=0.05)
    est = codec.decode(codec.encode(x, CTX), CTX)
    kept = est != 0
    assert int(kept.sum()) == round(0.05 * CTX.numel)
    assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())


def test_error_feedback_bounds_the_cumulative_error_of_topk() -> None:
    n, rounds = 10_000, 12
    codec = TopKCodec(ratio=0.02)
    ef = ErrorFeedback(codec)
    drift = gauss(n, 8)  # a consistent direction plus per-round noise, as in training
    total = torch.zeros(n)
    sent_plain = torch.zeros(n)
    sent_ef = torch.zeros(n)
    for r in range(rounds):
        ctx = ChunkContext(0, r, 0, n)
        delta = drift + gauss(n, 100 + r)
        total += delta
        sent_plain += codec.decode(codec.encode(delta, ctx), ctx)
        sent_ef += ef.encode(delta, ctx)[1]
    assert nmse(sent_ef, total) < 0.7 * nmse(sent_plain, total)
    # what EF has not sent yet is exactly its residual
    torch.testing.assert_close(total - sent_ef, ef.residual[0], atol=1e-3, rtol=1e-4)


# ---- sketch --------------------------------------------------------------------------------


def test_sketch_codec_recovers_spikes_and_sums_linearly() -> None:
    n = 50_000
    ctx = ChunkContext(3, 1, 0, n)
    codec = SketchCodec(ratio=0.1, heavy=0.001)
    spikes = torch.tensor([10, 20_000, 49_999])
    peers = []
    for p in range(3):
        x = 0.01 * gauss(n, 10 + p)
        x[spikes] += 2.0
        peers.append(x)
    encs = [codec.encode(x, ctx) for x in peers]
    assert encs[0].wire_bytes == 4 * codec.sketcher(ctx).size
    total = codec.sum(encs, ctx)
    want = codec.encode(peers[0] + peers[1] + peers[2], ctx).parts["sketch"]
    np.testing.assert_allclose(total.parts["sketch"], want, atol=1e-4)
    est = codec.decode(total, ctx)
    assert torch.equal(torch.nonzero(est).flatten(), spikes)
    torch.testing.assert_close(est[spikes], torch.full((3,), 6.0), atol=0.2, rtol=0)


def test_sketch_codec_under_error_feedback_stays_bounded_on_dense_updates() -> None:
    # Regression: recovering noise-level estimates fed the noise back and blew up.
    n = 13_514
    ef = ErrorFeedback(SketchCodec())
    for r in range(6):
        ctx = ChunkContext(0, r, 0, n)
        x = gauss(n, 200 + r)
        est = ef.encode(x, ctx)[1]
        assert nmse(est, x) <= 1.5
    assert float(ef.residual[0].norm()) < 6 * math.sqrt(n)


def test_none_codec_and_error_feedback_state_still_work() -> None:
    codec = make_codec("none")
    x = gauss(100, 9)
    ctx = ChunkContext(0, 0, 0, 100)
    assert torch.equal(codec.decode(codec.encode(x, ctx), ctx), x)
    ef = ErrorFeedback(HoloCodec(1, "mse"))
    ef.encode(x, ctx)
    again = ErrorFeedback(HoloCodec(1, "mse"))
    again.load_state_dict(ef.state_dict())
    assert torch.equal(again.residual[0], ef.residual[0])


# ---- packing and validation ----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 24), values=st.lists(st.integers(0, 2**24 - 1), max_size=70))
def test_bit_planes_round_trip(bits: int, values: list[int]) -> None:
    v = np.array([x % (1 << bits) for x in values], dtype=np.int64)
    planes = pack(v, bits)
    assert planes.shape == packed_shape(bits, len(v)) and planes.dtype == np.uint8
    np.testing.assert_array_equal(unpack(planes, bits, len(v)).astype(np.int64), v)


SMALL = ChunkContext(seed=1, round=0, chunk=0, numel=1000)
CODEC_CASES = [HoloCodec(1), HoloCodec(3, "mse"), TopKCodec(ratio=0.05), SketchCodec(ratio=0.2)]


def _valid(codec) -> Encoded:
    return codec.encode(gauss(SMALL.numel, 11), SMALL)


def _copy(enc: Encoded) -> Encoded:
    return Encoded(enc.codec, {k: v.copy() for k, v in enc.parts.items()}, dict(enc.meta))


def _mutations(codec) -> list[tuple[str, Encoded]]:
    """Named hostile variants of a valid encoding."""
    good = _valid(codec)
    out = []
    e = _copy(good)
    e.codec = "other"
    out.append(("codec name", e))
    name, arr = next(iter(good.parts.items()))
    e = _copy(good)
    del e.parts[name]
    out.append(("missing part", e))
    e = _copy(good)
    e.parts["extra"] = np.zeros(3, np.float32)
    out.append(("extra part", e))
    for part, a in good.parts.items():
        e = _copy(good)
        e.parts[part] = a.astype(np.float64 if a.dtype == np.float32 else np.uint16)
        out.append((f"dtype of {part}", e))
        e = _copy(good)
        e.parts[part] = a.reshape(-1)[:-1] if a.size > 1 else np.concatenate([a.reshape(-1)] * 2)
        out.append((f"shape of {part}", e))
        if a.dtype == np.float32:
            for bad in (np.nan, np.inf, -np.inf):
                e = _copy(good)
                e.parts[part].reshape(-1)[0] = bad
                out.append((f"{bad} in {part}", e))
        if a.dtype == np.uint8:  # packed planes: set a padding bit (1000 % 8 == 0: none)
            count = {"codes": 1024, "indices": 50}[part]
            if count % 8:
                e = _copy(good)
                e.parts[part][:, -1] |= np.uint8(0x80)
                out.append((f"padding bits of {part}", e))
    e = _copy(good)
    e.meta["bits"] = 9
    out.append(("meta", e))
    if isinstance(codec, HoloCodec):
        e = _copy(good)
        e.parts["scales"][0] = -1.0
        out.append(("negative scale", e))
        e = _copy(good)
        e.parts["codes"] = np.concatenate([e.parts["codes"], e.parts["codes"][:1]])
        out.append(("bits out of range (one plane too many)", e))
    if isinstance(codec, TopKCodec):
        k, bits = codec.count(SMALL.numel), index_bits(SMALL.numel)
        for what, idx in (
            ("index out of range", np.r_[np.arange(k - 1), 1023]),
            ("unsorted indices", np.arange(k)[::-1]),
            ("repeated index", np.r_[0, np.arange(k - 1)]),
        ):
            e = _copy(good)
            e.parts["indices"] = pack(idx, bits)
            out.append((what, e))
    return out


@pytest.mark.parametrize("codec", CODEC_CASES, ids=lambda c: f"{c.name}")
def test_validate_rejects_every_hostile_variant(codec) -> None:
    codec.validate(_valid(codec), SMALL)
    for what, enc in _mutations(codec):
        with pytest.raises(FormatError):
            codec.validate(enc, SMALL)
            pytest.fail(f"accepted: {what}")
        with pytest.raises(FormatError):
            codec.decode(enc, SMALL)


@pytest.mark.parametrize("codec", CODEC_CASES, ids=lambda c: f"{c.name}")
def test_validate_rejects_hostile_contexts(codec) -> None:
    enc = _valid(codec)
    for ctx in (
        ChunkContext(1, 0, 0, 0),
        ChunkContext(1, 0, 0, 2**40),
        ChunkContext(-1, 0, 0, 1000),
    ):
        with pytest.raises(FormatError):
            codec.validate(enc, ctx)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data(), which=st.integers(0, len(CODEC_CASES) - 1))
def test_random_part_contents_are_rejected_or_decode_to_finite_estimates(data, which) -> None:
    codec = CODEC_CASES[which]
    spec = codec.part_spec(SMALL)
    parts = {}
    for name, (dtype, shape) in spec.items():
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        raw = data.draw(st.binary(min_size=nbytes, max_size=nbytes))
        parts[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    enc = Encoded(codec.name, parts)
    try:
        codec.validate(enc, SMALL)
    except FormatError:
        return
    with np.errstate(over="ignore"):
        est = codec.decode(enc, SMALL)
    assert est.shape == (SMALL.numel,) and est.dtype == torch.float32
    # finite unless the sender's (valid, finite) float32 values overflow when combined
    assert bool(torch.isfinite(est).all()) or any(
        np.abs(p).max() > 1e30 for p in parts.values() if p.dtype == np.float32
    )


@pytest.mark.parametrize("codec", CODEC_CASES, ids=lambda c: f"{c.name}")
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_refuses_non_finite_chunks(codec, bad: float) -> None:
    x = gauss(SMALL.numel, 12)
    x[123] = bad
    with pytest.raises(FormatError):
        codec.encode(x, SMALL)
