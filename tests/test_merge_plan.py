"""The balanced shard plan (fflnode.merge.plan.assign): its promises, as properties."""

from __future__ import annotations

import math
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from fflnode.merge.plan import anchor_owners, assign, plan

PEER = st.binary(min_size=2, max_size=38)


@st.composite
def runs(draw: st.DrawFn) -> tuple[str, int, list[bytes], list[bytes]]:
    """(run id, M, anchor = the run's members, a non-empty subset still in the merge)."""
    anchor = draw(st.lists(PEER, min_size=1, max_size=12, unique=True))
    m = draw(st.integers(1, 48))
    members = draw(st.lists(st.sampled_from(anchor), min_size=1, unique=True))
    run = draw(st.text(max_size=12))
    return run, m, anchor, members


def loads(owners: list[bytes]) -> Counter[bytes]:
    return Counter(owners)


@settings(max_examples=300, deadline=None)
@given(runs())
def test_every_shard_has_exactly_one_member_owner_and_no_member_exceeds_ceil_m_over_n(r):
    run, m, anchor, members = r
    owners = assign(run, m, members, anchor)
    assert len(owners) == m  # one owner per shard, each shard once
    assert set(owners) <= set(members)
    assert max(loads(owners).values()) <= math.ceil(m / len(members))


@settings(max_examples=200, deadline=None)
@given(runs(), st.randoms(use_true_random=False))
def test_the_plan_is_the_same_whatever_order_the_lists_come_in(r, rnd: random.Random):
    run, m, anchor, members = r
    shuffled_anchor, shuffled_members = anchor[:], members[:]
    rnd.shuffle(shuffled_anchor)
    rnd.shuffle(shuffled_members)
    assert assign(run, m, members, anchor) == assign(run, m, shuffled_members, shuffled_anchor)
    assert plan(run, 1000, m, members, anchor) == plan(
        run, 1000, m, shuffled_members, shuffled_anchor
    )


@settings(max_examples=300, deadline=None)
@given(runs(), st.data())
def test_when_a_member_leaves_only_its_shards_move_and_they_spread_evenly(r, data):
    run, m, anchor, _ = r
    if len(anchor) < 2:
        return
    before = assign(run, m, anchor, anchor)
    x = data.draw(st.sampled_from(anchor))
    survivors = [p for p in anchor if p != x]
    after = assign(run, m, survivors, anchor)
    moved = [j for j in range(m) if before[j] != after[j]]
    assert moved == [j for j in range(m) if before[j] == x]
    gained = Counter(after[j] for j in moved)
    base = loads([p for p in before if p != x])
    final = loads(after)
    # Evenly: each orphan went to a least-loaded survivor, so the spread of loads never
    # grows beyond one shard (or beyond what it already was among the survivors).
    spread_before = max(base[p] for p in survivors) - min(base[p] for p in survivors)
    assert max(final.values()) - min(final[p] for p in survivors) <= max(1, spread_before)
    if m % len(anchor) == 0:  # equal anchor loads: k orphans over N-1 survivors
        assert max(gained.values(), default=0) <= math.ceil((m // len(anchor)) / len(survivors))


@settings(max_examples=300, deadline=None)
@given(runs(), st.data())
def test_a_surviving_anchor_owner_never_loses_a_shard_however_many_left(r, data):
    run, m, anchor, members = r
    if len(members) < 2:
        return
    x = data.draw(st.sampled_from(members))
    rest = [p for p in members if p != x]
    base = anchor_owners(run, m, anchor)
    now, later = assign(run, m, members, anchor), assign(run, m, rest, anchor)
    for j, p in enumerate(base):
        if p in rest:
            assert now[j] == later[j] == p


def test_with_m_equal_to_n_every_member_owns_exactly_one_shard():
    # Plain rendezvous gave one node 2-3 of 4 shards (DESIGN.md, December 2026).
    rnd = random.Random(5)
    for trial in range(200):
        members = [rnd.randbytes(38) for _ in range(rnd.randint(1, 16))]
        owners = assign(f"run-{trial}", len(members), members)
        assert sorted(owners) == sorted(members)


def test_an_anchor_without_some_members_is_extended_by_them():
    members = [b"a", b"b", b"c"]
    assert assign("r", 6, members, anchor=[b"a"]) == assign("r", 6, members, anchor=members)
