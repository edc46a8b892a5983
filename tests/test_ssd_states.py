"""State algebra: canonical merges, averaging, and the strict wire form of layer states."""

from __future__ import annotations

import copy
import math

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fflnode.errors import FormatError, MergeError
from fflnode.ssm.ssd import SSDLayer
from fflnode.ssm.states import (
    MAX_ABS_STATE,
    MAX_MERGE_MEMBERS,
    STATE_FORMAT,
    LayerState,
    compose,
    from_arrays,
    from_wire,
    merge_average,
    merge_canonical,
    merge_model,
    relative_error,
    to_arrays,
    to_wire,
    wire_nbytes,
)

torch.set_num_threads(1)

SPEC = ((2, 3, 4), (2, 3, 4))  # two layers of (heads, head_dim, d_state)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_state(shape: tuple[int, int, int], seed: int) -> LayerState:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g)
    log_decay = -torch.rand(shape[0], generator=g) * 2
    return LayerState(h, log_decay)


def peer_ids(n: int, seed: int) -> list[bytes]:
    rng = np.random.Generator(np.random.PCG64(seed))
    return [bytes(rng.integers(0, 256, 34, dtype=np.uint8)) for _ in range(n)]


def test_canonical_merge_equals_the_state_of_segments_concatenated_in_peer_id_order() -> None:
    torch.manual_seed(0)
    layer = SSDLayer(d_model=16, d_state=8, headdim=8, chunk_size=8).eval()
    peers = peer_ids(4, seed=1)
    segments = {p: torch.randn(1, 7 + 3 * i, 16) for i, p in enumerate(peers)}
    with torch.no_grad():
        states = {p: layer(seg)[1] for p, seg in segments.items()}
        _, whole = layer(torch.cat([segments[p] for p in sorted(peers)], dim=1))
    merged = merge_canonical(states)
    assert relative_error(merged, whole) < 1e-6
    torch.testing.assert_close(merged.log_decay, whole.log_decay, rtol=1e-6, atol=1e-6)


@FAST
@given(order=st.permutations(list(range(6))), seed=st.integers(0, 2**16))
def test_merge_is_bit_identical_under_any_arrival_order(order: list[int], seed: int) -> None:
    peers = peer_ids(6, seed)
    states = {p: random_state((2, 3, 4), seed + i) for i, p in enumerate(peers)}
    arrived = {peers[i]: states[peers[i]] for i in order}
    for merge in (merge_canonical, merge_average):
        a, b = merge(states), merge(arrived)
        assert torch.equal(a.h, b.h) and torch.equal(a.log_decay, b.log_decay)


def test_merge_of_two_is_compose_in_peer_id_order() -> None:
    lo, hi = b"\x01peer", b"\x02peer"
    s_lo, s_hi = random_state((2, 3, 4), 1), random_state((2, 3, 4), 2)
    merged = merge_canonical({hi: s_hi, lo: s_lo})
    expected = compose(s_lo, s_hi)
    torch.testing.assert_close(merged.h, expected.h, rtol=0, atol=0)


def test_compose_with_the_empty_segment_is_the_identity() -> None:
    s = random_state((2, 3, 4), 3)
    empty = LayerState.zeros((2, 3, 4))
    for c in (compose(empty, s), compose(s, empty)):
        torch.testing.assert_close(c.h, s.h)
        torch.testing.assert_close(c.log_decay, s.log_decay)


def test_average_merge_without_decay_is_the_exact_merge_divided_by_n() -> None:
    peers = peer_ids(5, seed=4)
    states = {
        p: LayerState(random_state((2, 3, 4), i).h, torch.zeros(2)) for i, p in enumerate(peers)
    }
    exact, avg = merge_canonical(states), merge_average(states)
    torch.testing.assert_close(avg.h * 5, exact.h, rtol=1e-6, atol=1e-6)


def test_merge_model_averages_only_from_the_requested_layer() -> None:
    peers = peer_ids(3, seed=5)
    model_states = {
        p: (random_state((2, 3, 4), i), random_state((2, 3, 4), 10 + i))
        for i, p in enumerate(peers)
    }
    merged = merge_model(model_states, average_from_layer=1)
    layer0 = merge_canonical({p: s[0] for p, s in model_states.items()})
    layer1 = merge_average({p: s[1] for p, s in model_states.items()})
    assert torch.equal(merged[0].h, layer0.h) and torch.equal(merged[1].h, layer1.h)


def test_merge_refuses_no_members_too_many_and_non_bytes_keys() -> None:
    s = random_state((2, 3, 4), 0)
    with pytest.raises(MergeError):
        merge_canonical({})
    with pytest.raises(MergeError):
        merge_canonical({"peer-as-str": s})  # type: ignore[dict-item]
    many = {i.to_bytes(4, "big"): s for i in range(MAX_MERGE_MEMBERS + 1)}
    with pytest.raises(MergeError):
        merge_canonical(many)
    with pytest.raises(MergeError):
        merge_model({b"a": (s,), b"b": (s, s)})


# --- wire form ---------------------------------------------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@st.composite
def model_states(
    draw: st.DrawFn,
) -> tuple[tuple[tuple[int, int, int], ...], tuple[LayerState, ...]]:
    depth = draw(st.integers(1, 3))
    spec = tuple(
        (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        for _ in range(depth)
    )
    states = []
    for shape in spec:
        h = draw(st.lists(finite, min_size=math.prod(shape), max_size=math.prod(shape)))
        L = draw(st.lists(st.floats(-50, 0, width=32), min_size=shape[0], max_size=shape[0]))
        states.append(
            LayerState(
                torch.tensor(h, dtype=torch.float32).reshape(shape),
                torch.tensor(L, dtype=torch.float32),
            )
        )
    return spec, tuple(states)


@FAST
@given(model_states())
def test_wire_round_trip_through_msgpack_is_exact(
    case: tuple[tuple[tuple[int, int, int], ...], tuple[LayerState, ...]],
) -> None:
    spec, states = case
    message = msgpack.unpackb(msgpack.packb(to_wire(states)), raw=False)
    back = from_wire(message, spec)
    assert len(back) == len(states)
    for a, b in zip(back, states, strict=True):
        assert torch.equal(a.h, b.h) and torch.equal(a.log_decay, b.log_decay)
        assert a.h.dtype == torch.float32
    assert sum(
        len(layer["h"]["data"]) + len(layer["log_decay"]["data"]) for layer in message["layers"]
    ) == wire_nbytes(spec)


@FAST
@given(model_states())
def test_array_round_trip_is_exact(
    case: tuple[tuple[tuple[int, int, int], ...], tuple[LayerState, ...]],
) -> None:
    spec, states = case
    back = from_arrays(to_arrays(states), spec)
    for a, b in zip(back, states, strict=True):
        assert torch.equal(a.h, b.h) and torch.equal(a.log_decay, b.log_decay)


def good_message() -> dict[str, object]:
    return to_wire(tuple(random_state(shape, i) for i, shape in enumerate(SPEC)))


def _set(path: tuple[object, ...], value: object) -> dict[str, object]:
    msg = copy.deepcopy(good_message())
    target: object = msg
    for key in path[:-1]:
        target = target[key]  # type: ignore[index]
    target[path[-1]] = value  # type: ignore[index]
    return msg


def _delete(path: tuple[object, ...]) -> dict[str, object]:
    msg = copy.deepcopy(good_message())
    target: object = msg
    for key in path[:-1]:
        target = target[key]  # type: ignore[index]
    del target[path[-1]]  # type: ignore[attr-defined]
    return msg


def _floats(values: list[float], shape: tuple[int, ...]) -> bytes:
    arr = np.zeros(math.prod(shape), dtype="<f4")
    arr[: len(values)] = values
    return arr.tobytes()


HOSTILE: dict[str, object] = {
    "not a dict": [1, 2, 3],
    "wrong format": _set(("format",), "fflnode.ssd-state/999"),
    "extra top key": {**good_message(), "sender": "trust-me"},
    "missing layers": _delete(("layers",)),
    "layers not a list": _set(("layers",), {"0": 1}),
    "too few layers": _set(("layers",), good_message()["layers"][:1]),  # type: ignore[index]
    "too many layers": _set(("layers",), good_message()["layers"] * 2),  # type: ignore[operator]
    "layer not a dict": _set(("layers", 0), b"junk"),
    "layer extra key": _set(("layers", 0, "conv"), {}),
    "record missing data": _delete(("layers", 0, "h", "data")),
    "dtype float64": _set(("layers", 0, "h", "dtype"), "float64"),
    "dtype bfloat16": _set(("layers", 1, "log_decay", "dtype"), "bfloat16"),
    "shape mismatch": _set(("layers", 0, "h", "shape"), [2, 4, 3]),
    "shape as string": _set(("layers", 0, "h", "shape"), "2,3,4"),
    "shape with bool": _set(("layers", 0, "log_decay", "shape"), [True, True]),
    "huge claimed shape": _set(("layers", 0, "h", "shape"), [2**40, 2**40, 2**40]),
    "short data": _set(("layers", 0, "h", "data"), b"\x00" * 95),
    "long data": _set(("layers", 0, "h", "data"), b"\x00" * 97),
    "data as str": _set(("layers", 0, "h", "data"), "\x00" * 96),
    "data as list": _set(("layers", 0, "h", "data"), [0.0] * 24),
    "nan in h": _set(("layers", 1, "h", "data"), _floats([float("nan")], (2, 3, 4))),
    "inf in h": _set(("layers", 0, "h", "data"), _floats([0.0, float("-inf")], (2, 3, 4))),
    "huge h": _set(("layers", 0, "h", "data"), _floats([MAX_ABS_STATE * 10], (2, 3, 4))),
    "nan log_decay": _set(("layers", 0, "log_decay", "data"), _floats([float("nan")], (2,))),
    "positive log_decay": _set(("layers", 0, "log_decay", "data"), _floats([0.0, 3.0], (2,))),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_messages_are_rejected_with_format_error(name: str) -> None:
    with pytest.raises(FormatError):
        from_wire(HOSTILE[name], SPEC, source="peer 12D3KooWtest")


def test_a_good_message_passes_the_same_checks() -> None:
    states = from_wire(good_message(), SPEC)
    assert [tuple(s.h.shape) for s in states] == list(SPEC)
    assert good_message()["format"] == STATE_FORMAT


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=64),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@FAST
@given(value=msgpack_values)
def test_arbitrary_decoded_messages_raise_only_format_error(value: object) -> None:
    with pytest.raises(FormatError):
        from_wire(value, SPEC)


@FAST
@given(
    layer=st.integers(0, 1),
    field=st.sampled_from(["h", "log_decay", "dtype", "shape", "data", "format", "layers"]),
    value=msgpack_values,
)
def test_any_single_field_replaced_by_junk_is_rejected_or_equal(
    layer: int, field: str, value: object
) -> None:
    msg = copy.deepcopy(good_message())
    if field in ("format", "layers"):
        original, msg[field] = msg[field], value
    elif field in ("h", "log_decay"):
        original = msg["layers"][layer][field]  # type: ignore[index]
        msg["layers"][layer][field] = value  # type: ignore[index]
    else:
        original = msg["layers"][layer]["h"][field]  # type: ignore[index]
        msg["layers"][layer]["h"][field] = value  # type: ignore[index]
    try:
        from_wire(msg, SPEC)
    except FormatError:
        return
    assert value == original  # accepted only when the "junk" is the genuine field


@pytest.mark.parametrize(
    "bad",
    [
        {"h": np.zeros((2, 3, 4), np.float64), "log_decay": np.zeros(2, np.float32)},
        {"h": np.zeros((2, 4, 3), np.float32), "log_decay": np.zeros(2, np.float32)},
        {"h": np.full((2, 3, 4), np.nan, np.float32), "log_decay": np.zeros(2, np.float32)},
        {"h": np.zeros((2, 3, 4), np.float32), "log_decay": np.ones(2, np.float32)},
        {"h": np.zeros((2, 3, 4), np.float32)},
        {"h": [[0.0]], "log_decay": np.zeros(2, np.float32)},
    ],
)
def test_hostile_arrays_are_rejected_with_format_error(bad: dict[str, object]) -> None:
    good = to_arrays((random_state(SPEC[0], 0),))[0]
    with pytest.raises(FormatError):
        from_arrays([good, bad], SPEC)


def test_to_wire_refuses_batched_states() -> None:
    with pytest.raises(FormatError):
        to_wire((LayerState(torch.zeros(2, 2, 3, 4), torch.zeros(2, 2)),))
