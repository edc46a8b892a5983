"""A state epoch, sans-IO: held bitmaps, pull plans, canonical composition, the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fflnode import wire
from fflnode.errors import FormatError, MergeError, WireError
from fflnode.ssm import epoch as ep
from fflnode.ssm.federation import MAX_RECEIVED_STATES
from fflnode.ssm.ssd import SSDLayer
from fflnode.ssm.states import LayerState, relative_error

PEER = "12D3KooWPeerUnderTestxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
RUN = "test-run"
SPEC = ((2, 3, 4),)


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, wire.MAX_STATE_CONTEXTS - 1), max_size=300))
def test_held_bitmaps_round_trip_through_the_wire(contexts):
    n, held = ep.held_bitmap(contexts)
    fields = dict(run=RUN, epoch=2, attempt=0, members=["a", "b"], stage="propose")
    msg = wire.decode(wire.encode("states.ready", contexts=n, held=held, **fields), PEER)
    assert ep.parse_held(msg["contexts"], msg["held"]) == frozenset(contexts)


def test_the_wire_refuses_bitmaps_that_do_not_fit_their_count():
    fields = dict(run=RUN, epoch=0, attempt=0, members=["a"], stage="lock")
    for n, held in ((9, b"\x01"), (8, b"\x01\x00"), (3, b"\x08"), (wire.MAX_STATE_CONTEXTS + 8,
                    b"\x00" * (wire.MAX_STATE_CONTEXTS // 8 + 1))):  # fmt: skip
        with pytest.raises(WireError) as info:
            wire.decode(wire.encode("states.ready", contexts=n, held=held, **fields), PEER)
        assert info.value.reason == "schema"
    good = dict(run=RUN, epoch=1, attempt=2, hash="a" * 64, digest="b" * 64, done=True)
    assert wire.decode(wire.encode("states.hash", **good), PEER).fields == good
    for bad in ({"hash": "A" * 64}, {"epoch": -1}, {"attempt": wire.MAX_MERGE_ATTEMPT}):
        with pytest.raises(WireError):
            wire.decode(wire.encode("states.hash", **{**good, **bad}), PEER)


def test_context_ids_are_checked():
    for bad in ([-1], [wire.MAX_STATE_CONTEXTS], [1.5], [True]):
        with pytest.raises(FormatError):
            ep.check_contexts(bad, "test")
    assert ep.check_contexts([5, 1, 3], "test") == [1, 3, 5]


def test_each_member_pulls_every_other_members_contexts_in_canonical_order():
    holdings = {b"\x03": frozenset({1, 2}), b"\x01": frozenset({2, 9}), b"\x02": frozenset()}
    assert ep.receive_plan(b"\x03", holdings) == {b"\x01": [2, 9]}
    assert ep.holders(holdings) == {1: [b"\x03"], 2: [b"\x01", b"\x03"], 9: [b"\x01"]}
    many = {bytes([i]): frozenset(range(1000)) for i in range(6)}
    with pytest.raises(MergeError, match=str(MAX_RECEIVED_STATES)):
        ep.receive_plan(b"\x00", many)


def test_composition_over_each_contexts_holders_is_the_centralized_reading():
    """Three members; context 0 read in shares by all, context 1 by two, context 2 by one."""
    torch.manual_seed(0)
    layer = SSDLayer(d_model=8, d_state=4, headdim=8, chunk_size=4).eval()
    peers = [b"\x02b", b"\x00a", b"\x01c"]
    reads = {0: peers, 1: peers[:2], 2: peers[2:]}
    segments = {(c, p): torch.randn(1, 3 + c + k, 8) for c in reads for k, p in enumerate(peers)}
    with torch.no_grad():
        per_context = {c: {p: (layer(segments[c, p])[1],) for p in who} for c, who in reads.items()}
        central = {
            c: layer(torch.cat([segments[c, p] for p in sorted(who)], dim=1))[1]
            for c, who in reads.items()
        }
    merged = ep.compose(per_context)
    for c in reads:
        assert relative_error(merged[c][0], central[c]) < 1e-6


def test_the_file_round_trips_and_its_hash_is_stable():
    def states(seed):
        g = torch.Generator().manual_seed(seed)
        return (LayerState(torch.randn(2, 3, 4, generator=g), -torch.rand(2, generator=g)),)

    merged = {9: states(1), 2: states(2)}
    tensors = ep.file_tensors(merged)
    assert tensors["contexts"].tolist() == [2, 9]
    back = ep.read_tensors(tensors, SPEC, "test")
    assert all(torch.equal(back[c][0].h, merged[c][0].h) for c in merged)
    backwards = dict(reversed(merged.items()))
    assert ep.states_hash(tensors) == ep.states_hash(ep.file_tensors(backwards))
    assert ep.members_digest([b"\x02", b"\x01"]) == ep.members_digest([b"\x01", b"\x02"])


@pytest.mark.parametrize(
    "change",
    ["extra tensor", "contexts unsorted", "contexts float", "h short", "nan", "wrong shape"],
)
def test_a_bad_file_is_a_format_error(change):
    g = torch.Generator().manual_seed(0)
    tensors = ep.file_tensors(
        {c: (LayerState(torch.randn(2, 3, 4, generator=g), -torch.rand(2, generator=g)),)
         for c in (1, 2, 3)}
    )  # fmt: skip
    if change == "extra tensor":
        tensors["layers.1.h"] = tensors["layers.0.h"]
    elif change == "contexts unsorted":
        tensors["contexts"] = torch.tensor([3, 1, 2])
    elif change == "contexts float":
        tensors["contexts"] = tensors["contexts"].double()
    elif change == "h short":
        tensors["layers.0.h"] = tensors["layers.0.h"][:2]
    elif change == "nan":
        tensors["layers.0.h"][1, 0, 0, 0] = float("nan")
    else:
        tensors["layers.0.h"] = tensors["layers.0.h"].reshape(3, 2, 4, 3)
    with pytest.raises(FormatError):
        ep.read_tensors(tensors, SPEC, "test")


def test_the_bitmap_is_little_endian_bits():
    n, held = ep.held_bitmap([0, 9])
    assert (n, held) == (10, bytes([0b1, 0b10]))
    assert np.array_equal(sorted(ep.parse_held(n, held)), [0, 9])
