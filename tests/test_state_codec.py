"""State codecs: raw is exact, holo is close and deterministic, hostile bodies are FormatError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fflnode import wire
from fflnode.errors import ConfigError, FormatError
from fflnode.ssm.state_codec import HoloStateCodec, RawCodec, make_state_codec
from fflnode.ssm.states import LayerState, relative_error

SPEC = ((2, 8, 16), (2, 8, 16))  # two layers of (heads, head_dim, d_state)


def states(seed: int) -> tuple[LayerState, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(
        LayerState(torch.randn(*s, generator=g), -torch.rand(s[0], generator=g)) for s in SPEC
    )


def body(codec, contexts, epoch=3) -> dict[str, np.ndarray]:
    """A batch body as a server builds it: each context's arrays, concatenated."""
    per = [codec.encode(states(c), c, epoch) for c in contexts]
    return {name: np.concatenate([p[k][1] for p in per]) for k, (name, _) in enumerate(per[0])}


@pytest.mark.parametrize("codec", [RawCodec(), HoloStateCodec(8, seed=5)])
def test_a_batch_body_has_exactly_the_spec_parts(codec):
    arrays = body(codec, [4, 5, 6])
    spec = codec.parts_spec(SPEC, 3)
    assert [p.name for p in spec] == list(arrays)
    for p in spec:
        assert arrays[p.name].dtype == wire.DTYPES[p.dtype] and arrays[p.name].shape == p.shape
    assert codec.body_nbytes(SPEC, 3) == sum(a.nbytes for a in arrays.values())


def test_raw_is_exact_and_holo_is_close_at_8_bits_and_shrinks_the_body():
    raw, holo = RawCodec(), HoloStateCodec(8, seed=5)
    got_raw = raw.decode(body(raw, [4, 5]), SPEC, [4, 5], 3, "test")
    got_holo = holo.decode(body(holo, [4, 5]), SPEC, [4, 5], 3, "test")
    for c, r, h in zip([4, 5], got_raw, got_holo, strict=True):
        for layer, want in enumerate(states(c)):
            assert torch.equal(r[layer].h, want.h)
            assert torch.equal(r[layer].log_decay, want.log_decay)
            assert relative_error(h[layer], want) < 0.02  # 8 bits: ~1 %
            assert torch.equal(h[layer].log_decay, want.log_decay)  # log-decays travel exact
    assert holo.body_nbytes(SPEC, 1) * 3.5 < raw.body_nbytes(SPEC, 1)


def test_holo_decodes_the_same_bits_everywhere_and_rotates_per_epoch():
    holo = HoloStateCodec(4, seed=5)
    a = holo.decode(body(holo, [7]), SPEC, [7], 3, "a")[0]
    b = holo.decode(body(holo, [7]), SPEC, [7], 3, "b")[0]
    assert all(torch.equal(x.h, y.h) for x, y in zip(a, b, strict=True))
    own_parts, own = holo.roundtrip(states(7), 7, 3, SPEC)  # what the sender composes
    assert all(torch.equal(x.h, y.h) for x, y in zip(own, a, strict=True))
    other = holo.encode(states(7), 7, 4)  # another epoch: another rotation
    assert not np.array_equal(other[0][1], own_parts[0][1])
    assert np.array_equal(holo.encode(states(7), 8, 3)[0][1], own_parts[0][1])  # one per epoch


def hostile(codec):
    good = body(codec, [0, 1])
    cases = {}
    for name, arr in good.items():
        cases[f"{name} missing"] = {k: v for k, v in good.items() if k != name}
        cases[f"{name} one short"] = {**good, name: arr[:-1]}
        cases[f"{name} float64"] = {**good, name: arr.astype(np.float64)}
    if isinstance(codec, RawCodec):
        h = good["h"].copy()
        h[0, 0, 0, 0] = np.nan
        cases["nan h"] = {**good, "h": h}
        big = good["h"].copy()
        big[1, 1, 1, 1] = 1e31
        cases["huge h"] = {**good, "h": big}
    else:
        scales = good["scales"].copy()
        scales[0, 0] = -1.0
        cases["negative scale"] = {**good, "scales": scales}
        scales = good["scales"].copy()
        scales[1, 0] = np.inf
        cases["infinite scale"] = {**good, "scales": scales}
        scales = good["scales"].copy()
        scales[1, 0] = 3e38
        cases["overflowing scale"] = {**good, "scales": scales}
    log_decay = good["log_decay"].copy()
    log_decay[2, 1] = 0.25
    cases["rising log_decay"] = {**good, "log_decay": log_decay}
    return cases


@pytest.mark.parametrize("codec", [RawCodec(), HoloStateCodec(2, seed=5)], ids=["none", "holo"])
def test_hostile_batch_bodies_raise_format_error_only(codec):
    for case, arrays in hostile(codec).items():
        with pytest.raises(FormatError):
            codec.decode(arrays, SPEC, [0, 1], 3, f"case {case}")


def test_unknown_codec_and_unequal_layers_are_config_errors():
    with pytest.raises(ConfigError):
        make_state_codec("zstd", 8, 0)
    with pytest.raises(ConfigError):
        RawCodec().parts_spec(((2, 8, 16), (2, 8, 8)), 1)
