"""A member still training when the others enter the merge is waited for, boundedly.

16 daemons on 2 cores finished their rounds up to 2 min apart; the first to finish left
out every member it had not heard propose within SILENT_MEMBER_GRACE_S (30 s), so the
views never agreed. A member whose heartbeats say it is still training (phase "train",
round no later than ours) is now kept in the proposal for up to STRAGGLER_WAIT_S; an
insider that claims to train forever delays the merge by that much, not past it.

Three in-process nodes on real libp2p hosts, with real merge sessions; the graces are
shortened so the test takes seconds, and the straggler's start waits on what the others
announce, not on a sleep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import trio

from fflnode.merge import protocol
from tests.p2p_harness import peers
from tests.test_config_effects import ThreeNodeMerge, merge_nodes, merged_files, run_merge

GRACE_S = 1.0  # SILENT_MEMBER_GRACE_S here: a silent member is left out after 1 s
WAIT_S = 6.0  # STRAGGLER_WAIT_S here, for the insider that never merges
RUN_TIMEOUT_S = 90.0  # the merges below take a few seconds past their graces


async def merge_with_a_straggler(tmp_path: Path, straggler_merges: bool) -> ThreeNodeMerge:
    """Nodes 0 and 1 enter the merge; node 2 heartbeats phase "train" and enters only
    once both have proposed for longer than GRACE_S (or never)."""
    async with peers(3) as ps:
        ids = [p.id for p in ps]
        for p in ps:
            p.membership.phase = "train"
        nodes, sessions, premerges = merge_nodes(tmp_path, ps, {"exclude_outliers": False}, {})
        # The early nodes must know the straggler trains before their grace can end.
        knows = await ps[0].membership.wait_until(
            lambda: all(ps[i].membership.peers[ids[2]].phase == "train" for i in (0, 1)),
            RUN_TIMEOUT_S / 2,
        )
        assert knows, "the straggler's phase never reached the others"
        outcomes: dict[Any, Any] = {}
        started = trio.current_time()

        async def one(i: int) -> None:
            ps[i].membership.phase = "merge"
            outcomes[ids[i]] = await run_merge(nodes[i], sessions[i])
            outcomes[(ids[i], "at")] = trio.current_time() - started

        def others_kept_it_past_the_grace() -> bool:
            """Both early nodes still hear the other propose all three, past the grace."""
            if trio.current_time() - started < GRACE_S + 2 * protocol.HEARTBEAT_S:
                return False
            for i in (0, 1):
                heard = sessions[i].agreement.proposals.get(str(ids[1 - i]))
                if heard is None or str(ids[2]) not in heard.members:
                    return False
            return True

        with trio.fail_after(RUN_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 0)
                nursery.start_soon(one, 1)
                if straggler_merges:
                    ok = await ps[0].membership.wait_until(
                        others_kept_it_past_the_grace, RUN_TIMEOUT_S / 2
                    )
                    assert ok, "the early nodes dropped the member still training"
                    nursery.start_soon(one, 2)
        for s in sessions:
            s.close()
    return ThreeNodeMerge(ids, outcomes, premerges, merged_files(ids, nodes), [], [])


async def test_a_member_still_training_is_waited_for_and_merges_with_the_others(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(protocol, "SILENT_MEMBER_GRACE_S", GRACE_S)
    m = await merge_with_a_straggler(tmp_path, straggler_merges=True)
    expected = m.mean_of(m.ids)
    for pid in m.ids:
        outcome = m.outcomes[pid]
        assert not isinstance(outcome, Exception), outcome
        assert len(outcome.members) == 3
        assert all(torch.equal(m.merged[pid][k], expected[k]) for k in expected)


async def test_a_member_that_claims_to_train_forever_delays_the_merge_only_boundedly(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(protocol, "SILENT_MEMBER_GRACE_S", GRACE_S)
    monkeypatch.setattr(protocol, "STRAGGLER_WAIT_S", WAIT_S)
    m = await merge_with_a_straggler(tmp_path, straggler_merges=False)
    early = m.ids[:2]
    expected = m.mean_of(early)
    for pid in early:
        outcome = m.outcomes[pid]
        assert not isinstance(outcome, Exception), outcome
        assert sorted(outcome.members) == sorted(str(p) for p in early)
        assert all(torch.equal(m.merged[pid][k], expected[k]) for k in expected)
        # it was waited for (the fix), and no longer than the bound (plus agreeing)
        assert WAIT_S <= m.outcomes[(pid, "at")] < RUN_TIMEOUT_S
