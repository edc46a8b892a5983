"""A member that missed every copy of a peer's hash still verifies: the peer keeps
announcing it after its own verification, until every member is done.

In a 16-node testnet on 2 cores all 16 nodes wrote bit-identical merged files, yet none
verified: pubsub queues to slow peers overflowed and dropped the oldest messages, and a
node stopped announcing its hash as soon as it had everyone else's. A member that had
missed all of its copies waited for it until merge.timeout_s.

Three in-process nodes on real libp2p hosts with real merge sessions, each finishing as
the daemon does (phase "done", then `wait_all_done`). Node 1 loses announcements of
node 0's hash: until node 0 has verified, or all of them (then node 1 asks node 0 for
it over /fflnode/merge-hash/1.0.0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from fflnode.merge import protocol
from fflnode.merge.protocol import MergeOutcome
from tests.p2p_harness import peers
from tests.test_config_effects import merge_nodes, run_merge

MERGE_TIMEOUT_S = 60.0  # merge.timeout_s here: the merge itself takes seconds
RUN_TIMEOUT_S = 2 * MERGE_TIMEOUT_S


async def merge_losing_hashes(tmp_path: Path, forever: bool) -> dict[Any, Any]:
    """Node 1's pubsub loses node 0's hash announcements (`forever`, or until node 0 has
    verified); returns each node's outcome."""
    async with peers(3) as ps:
        ids = [p.id for p in ps]
        merge_cfg = {"exclude_outliers": False, "timeout_s": MERGE_TIMEOUT_S}
        nodes, sessions, _ = merge_nodes(tmp_path, ps, merge_cfg, {})
        node0_verified = trio.Event()
        handlers = ps[1].membership._handlers["merge.hash"]

        def lossy(handler: Any) -> Any:
            def on_hash(peer: Any, msg: Any) -> None:
                if peer == ids[0] and (forever or not node0_verified.is_set()):
                    return  # lost in the network, as pubsub drops
                handler(peer, msg)

            return on_hash

        handlers[:] = [lossy(h) for h in handlers]
        outcomes: dict[Any, Any] = {}

        async def one(i: int) -> None:
            outcome = await run_merge(nodes[i], sessions[i])
            outcomes[ids[i]] = outcome
            if i == 0:
                node0_verified.set()
            if isinstance(outcome, MergeOutcome):  # as the daemon finishes (fflnode.node)
                ps[i].membership.phase = "done"
                await ps[i].membership.beat_now()
                await sessions[i].wait_all_done(outcome.members)

        with trio.fail_after(RUN_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(one, i)
        for s in sessions:
            s.close()
    return {i: outcomes[pid] for i, pid in enumerate(ids)}


def assert_all_verified(outcomes: dict[Any, Any]) -> None:
    for outcome in outcomes.values():
        assert isinstance(outcome, MergeOutcome), outcome
    assert len({o.hash for o in outcomes.values()}) == 1


async def test_a_member_that_missed_a_peers_hash_gets_it_after_the_peer_verified(
    tmp_path: Path, monkeypatch
):
    """The announcements after node 0's verification reach node 1 (the direct ask is
    put off past the test, so this is pubsub alone)."""
    monkeypatch.setattr(protocol, "HASH_PULL_AFTER_S", 10 * RUN_TIMEOUT_S)
    assert_all_verified(await merge_losing_hashes(tmp_path, forever=False))


async def test_a_member_that_never_hears_a_peers_hash_asks_the_peer_for_it(tmp_path: Path):
    """No announcement of node 0's hash ever reaches node 1: it asks node 0 directly."""
    assert_all_verified(await merge_losing_hashes(tmp_path, forever=True))
