"""The member-set agreement (fflnode.agreement), driven directly: no network, no trio.

A simulated run delivers announcements in an order hypothesis chooses, while each node's
view of who is alive changes (peers appear late, surplus peers join, views differ). The
safety property: no two nodes ever commit different sets. Liveness: once views agree
and announcements flow, everyone commits, and surplus nodes learn they are out.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fflnode.agreement import COMMIT, LOCK, PROPOSE, Agreement


def simulate(data, peers: list[str], size: int | None, quorum: int) -> dict[str, tuple]:
    nodes = {p: Agreement(p, quorum=quorum, size=size) for p in peers}
    views = {p: set() for p in peers}  # who each node currently sees alive
    inflight: list[tuple[str, str, tuple, str]] = []  # (to, from, members, stage)
    committed: dict[str, tuple] = {}
    excluded: set[str] = set()
    for _ in range(data.draw(st.integers(20, 200))):
        action = data.draw(st.sampled_from(["see", "decide", "deliver", "deliver"]))
        if action == "see":
            a, b = data.draw(st.sampled_from(peers)), data.draw(st.sampled_from(peers))
            if a != b:
                views[a].add(b)
        elif action == "decide":
            p = data.draw(st.sampled_from(peers))
            if p in committed or p in excluded:
                continue
            d = nodes[p].decide(views[p])
            if d.excluded:
                excluded.add(p)
                continue
            if d.committed:
                committed[p] = d.members
            inflight += [(q, p, d.members, d.stage) for q in peers if q != p]
        elif inflight:
            i = data.draw(st.integers(0, len(inflight) - 1))
            to, frm, members, stage = inflight.pop(i)
            nodes[to].heard(frm, members, stage)
    # then: full views, everything delivered, a few rounds of decisions
    for p in peers:
        views[p] = set(peers) - {p}
    for _ in range(4):
        for p in peers:
            if p in committed:  # a committed node keeps announcing its commitment
                inflight += [(q, p, committed[p], COMMIT) for q in peers if q != p]
            if p in committed or p in excluded:
                continue
            d = nodes[p].decide(views[p])
            if d.excluded:
                excluded.add(p)
            elif d.committed:
                committed[p] = d.members
            inflight += [(q, p, d.members, d.stage) for q in peers if q != p]
        for to, frm, members, stage in inflight:
            nodes[to].heard(frm, members, stage)
        inflight.clear()
    return {"committed": committed, "excluded": excluded}


@settings(max_examples=300, deadline=None)
@given(st.data(), st.integers(2, 6))
def test_no_two_nodes_commit_different_sets_and_all_commit_once_views_agree(data, n):
    peers = [f"p{i}" for i in range(n)]
    out = simulate(data, peers, size=None, quorum=n // 2 + 1)
    sets = set(out["committed"].values())
    assert len(sets) == 1, sets  # safety in every interleaving, and a set is agreed
    (members,) = sets
    assert set(out["committed"]) == set(members)  # liveness once views converge...
    assert out["excluded"] == set(peers) - set(members)  # ...and the rest know they are out


@settings(max_examples=300, deadline=None)
@given(st.data(), st.integers(2, 5))
def test_surplus_peers_are_left_out_by_one_rule_everywhere(data, size):
    # Fewer surplus peers than members: any two sets of `size` share a member. (With as
    # many surplus peers as members, two disjoint groups could each start a run; they
    # never mix, since each node's exchange and merge list only its own members.)
    surplus = data.draw(st.integers(1, size - 1))
    peers = [f"p{i}" for i in range(size + surplus)]
    out = simulate(data, peers, size=size, quorum=size)
    sets = set(out["committed"].values())
    assert len(sets) == 1, sets
    (members,) = sets
    assert len(members) == size
    assert set(out["committed"]) == set(members)  # every member started...
    assert out["excluded"] == set(peers) - set(members)  # ...and every other knows it is out


def test_a_proposal_naming_an_ineligible_peer_is_ignored():
    a = Agreement("a", quorum=2, eligible=lambda m: m in {"a", "b"})
    a.heard("b", ["a", "b", "mallory"], COMMIT)
    a.heard("mallory", ["a", "mallory"], COMMIT)
    assert a.proposals == {}
    a.heard("b", ["a", "b"], PROPOSE)
    assert a.decide({"b"}).stage == LOCK
    a.heard("b", ["a", "b"], LOCK)
    assert a.decide({"b"}).committed


def test_a_lock_is_final_even_when_the_view_changes():
    a = Agreement("a", quorum=2)
    a.heard("b", ["a", "b"], PROPOSE)
    assert a.decide({"b"}).stage == LOCK
    d = a.decide({"b", "c"})  # c appears: the view would now be {a, b, c}
    assert (d.members, d.stage) == (("a", "b"), LOCK)


def test_a_late_older_announcement_does_not_undo_a_lock():
    a = Agreement("a", quorum=2)
    a.heard("b", ["a", "b"], LOCK)
    a.heard("b", ["a", "b"], PROPOSE)  # delivered late
    a.heard("b", ["a", "b", "c"], PROPOSE)  # a peer leaving its lock: ignored
    assert a.proposals["b"].stage == LOCK and a.proposals["b"].members == ("a", "b")


def test_a_view_must_settle_before_it_is_locked():
    a = Agreement("a", quorum=2, settle_s=2.0)
    a.heard("b", ["a", "b"], PROPOSE)
    assert a.decide({"b"}, now=10.0).stage == PROPOSE  # seen for 0 s
    assert a.decide({"b"}, now=11.5).stage == PROPOSE  # 1.5 s
    assert a.decide({"b", "c"}, now=11.9).stage == PROPOSE  # c flickers in: starts over
    assert a.decide({"b"}, now=12.0).stage == PROPOSE
    assert a.decide({"b"}, now=14.0).stage == LOCK  # stable for 2 s
