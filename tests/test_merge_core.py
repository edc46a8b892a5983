"""GradsSharding's sans-IO core: shard plans, rendezvous ownership, canonical reduction."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fflnode.errors import MergeError
from fflnode.merge.plan import owner_of, plan, shard_ranges
from fflnode.merge.reduce import CanonicalReducer
from fflnode.tensors import canonical_mean, flatten


def peers(n: int) -> list[bytes]:
    rng = np.random.default_rng(n)
    return sorted(bytes(rng.integers(0, 256, 38, dtype=np.uint8)) for _ in range(n))


def test_shards_tile_the_vector():
    for numel, m in [(10, 3), (7, 7), (1000, 16), (5, 8), (0, 2)]:
        ranges = shard_ranges(numel, m)
        assert ranges[0][0] == 0 and ranges[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        sizes = [hi - lo for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_rendezvous_ownership_is_balanced():
    members = peers(10)
    counts = Counter(owner_of("run", j, members) for j in range(2000))
    assert set(counts) == set(members)
    # 200 expected per member; binomial sd ~13.4, so +-60 is a >4-sigma band.
    assert all(140 <= c <= 260 for c in counts.values()), counts


def test_only_the_leavers_shards_move_when_a_member_leaves():
    members = peers(8)
    before = plan("run", 10_000, 64, members)
    leaver = members[3]
    # The run's members anchor the plan (fflnode.merge.plan): without an anchor the
    # load cap grows from 8 to 10 shards and survivors' shards would move to use it.
    after = plan("run", 10_000, 64, [m for m in members if m != leaver], anchor=members)
    moved = [b.index for b, a in zip(before, after, strict=True) if b.owner != a.owner]
    assert moved == [b.index for b in before if b.owner == leaver]
    assert len(moved) > 0


def test_plan_is_identical_whatever_order_members_are_listed_in():
    members = peers(5)
    assert plan("r", 999, 7, members) == plan("r", 999, 7, list(reversed(members)))


def order_sensitive_contributions(n: int, numel: int) -> list[np.ndarray]:
    """Values whose float64 sum depends on the order of addition."""
    rng = np.random.default_rng(7)
    # Per element, members hold a huge value, its negation and small ones: in float64,
    # 3e38 + 1 loses the 1, so (3e38 + 1) - 3e38 = 0 while (3e38 - 3e38) + 1 = 1.
    pattern = np.array([3e38, 1.0, -3e38, 0.5, 2.0**-40, -1.5], dtype=np.float32)
    out = []
    for i in range(n):
        x = rng.standard_normal(numel).astype(np.float32)
        x[:3] = np.roll(pattern, i)[:3]
        out.append(x)
    return out


def test_the_order_sensitive_data_really_is_order_sensitive():
    xs = order_sensitive_contributions(4, 8)
    sums = {
        tuple(sum((x[0:3].astype(np.float64) for x in perm), np.zeros(3)))
        for perm in itertools.permutations(xs)
    }
    assert len(sums) > 1  # otherwise the permutation test below could not fail


def reduce_in_order(members, xs, arrival, window, pieces):
    r = CanonicalReducer(members, pieces, window)
    for member_index, piece in arrival:
        lo, hi = pieces[piece]
        r.add(members[member_index], piece, xs[member_index][lo:hi])
    return r.result()


def test_reduction_is_bit_identical_under_every_arrival_order():
    members = peers(4)
    xs = order_sensitive_contributions(4, 6)
    pieces = [(0, 3), (3, 6)]
    reference = canonical_mean(
        [(m, {"w": torch.from_numpy(x)}) for m, x in zip(members, xs, strict=True)]
    )["w"].numpy()
    arrivals = list(itertools.product(range(4), range(2)))
    # 8! = 40320 orders exist; 2000 drawn uniformly (seeded) plus the two extremes.
    rng = np.random.default_rng(11)
    orders = [arrivals, arrivals[::-1]] + [
        [arrivals[i] for i in rng.permutation(len(arrivals))] for _ in range(2000)
    ]
    for order in orders:
        out = reduce_in_order(members, xs, order, window=4, pieces=pieces)
        assert out.tobytes() == reference.tobytes()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_reduction_matches_the_definition_for_random_members(data):
    n = data.draw(st.integers(1, 6))
    members = peers(n)
    numel = data.draw(st.integers(1, 40))
    k = data.draw(st.integers(1, min(numel, 5)))
    cuts = (
        sorted(data.draw(st.sets(st.integers(1, numel - 1), max_size=k - 1))) if numel > 1 else []
    )
    bounds = [0, *cuts, numel]
    pieces = list(zip(bounds, bounds[1:], strict=False))
    xs = [
        np.asarray(
            data.draw(
                st.lists(
                    st.floats(width=32, allow_nan=False, allow_infinity=False),
                    min_size=numel,
                    max_size=numel,
                )
            ),
            dtype=np.float32,
        )
        for _ in range(n)
    ]
    arrival = data.draw(st.permutations(list(itertools.product(range(n), range(len(pieces))))))
    out = reduce_in_order(members, xs, arrival, window=n, pieces=pieces)
    acc = np.zeros(numel, dtype=np.float64)
    for x in xs:  # members are sorted, so this is the canonical order
        acc += x.astype(np.float64)
    assert out.tobytes() == (acc / n).astype(np.float32).tobytes()


def test_reducer_refuses_what_it_must_not_accept():
    members = peers(3)
    x = np.zeros(4, np.float32)
    r = CanonicalReducer(members, [(0, 4)], window=1)
    with pytest.raises(MergeError, match="window"):
        r.add(members[2], 0, x)  # two turns early with a window of 1
    r.add(members[0], 0, x)
    with pytest.raises(MergeError, match="second"):
        r.add(members[0], 0, x)
    with pytest.raises(MergeError, match="not a merge member"):
        r.add(b"stranger", 0, x)
    with pytest.raises(MergeError, match="float32"):
        r.add(members[1], 0, np.zeros(3, np.float32))
    with pytest.raises(MergeError, match="1 of 3|2 of 3"):
        r.result()  # fewer contributions than agreed fails loudly


def test_flatten_uses_canonical_name_order():
    t = {"b": torch.ones(2), "a": torch.zeros(3), "B": torch.full((1,), 2.0)}
    assert flatten(t).tolist() == [2.0, 0.0, 0.0, 0.0, 1.0, 1.0]
