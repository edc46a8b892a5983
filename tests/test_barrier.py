"""The start barrier on real hosts: with more peers than the run needs, every member
starts with the same set, and the surplus peers are told they are out (issue 10)."""

from __future__ import annotations

import trio
from libp2p.peer.id import ID

from fflnode.p2p.barrier import StartRefused, start_barrier
from tests.p2p_harness import peers

BARRIER_TIMEOUT_S = 60.0  # seconds of real time on a loaded machine; ~3 s when quiet


async def test_surplus_peers_never_split_the_members_and_learn_they_are_out():
    nodes, present = 3, 5
    async with peers(present) as ps:
        outcome: dict[ID, list[ID] | str] = {}

        async def one(p) -> None:
            try:
                outcome[p.id] = await start_barrier(p.membership, nodes, BARRIER_TIMEOUT_S, nursery)
            except StartRefused as e:
                outcome[p.id] = str(e)

        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as barrier:
                for p in ps:
                    barrier.start_soon(one, p)
            nursery.cancel_scope.cancel()
    canonical = sorted((p.id for p in ps), key=lambda i: i.to_bytes())[:nodes]
    started = {k: v for k, v in outcome.items() if isinstance(v, list)}
    refused = {k: v for k, v in outcome.items() if isinstance(v, str)}
    assert set(started) == set(canonical)
    assert all(sorted(v, key=lambda i: i.to_bytes()) == canonical for v in started.values())
    assert len(refused) == present - nodes
    assert all("agreed without this node" in v for v in refused.values())
