"""A locked member that falls silent is waited for; one whose end closed is not.

A node that locked a member set gives the attempt up when a member of it is lost, and
every node follows it to the next attempt. In a 16-node testnet on 2 cores the first
node to lock gave up on a member stalled for ~16 s, and the next attempt never agreed.
Now a member that is only silent (its connection open) gets SILENT_LOST_GRACE_S, and
one whose connection closed from its end (it exited) VERIFY_LOST_GRACE_S, as before.

Three in-process nodes on real libp2p hosts with real merge sessions. Node 2 stalls at
the moment it announces its lock, as a descheduled process does: its announcements,
heartbeats and ping answers wait until the stall ends. Or it exits there instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import trio

from fflnode import wire
from fflnode.errors import MergeError
from fflnode.merge import protocol
from fflnode.p2p.host import close_host
from fflnode.p2p.membership import PING_PROTOCOL
from tests.p2p_harness import peers
from tests.test_config_effects import ThreeNodeMerge, merge_nodes, merged_files, run_merge

# How long past VERIFY_LOST_GRACE_S the others must have seen node 2 lost before it
# wakes: the old rule had given the attempt up by then.
PAST_OLD_GRACE_S = 3.0
RUN_TIMEOUT_S = 120.0  # bounded waits; the merges take ~20 s past the stall


class StallAtLock:
    """Node 2's pubsub and ping handler: from its first lock announcement until
    `wake`, nothing it sends leaves (each send waits), and pings go unanswered."""

    def __init__(self, pubsub: Any, membership: Any) -> None:
        self.pubsub, self.membership = pubsub, membership
        self.stalled = trio.Event()
        self.woken = trio.Event()

    async def publish(self, topic: str, data: bytes) -> None:
        if not self.stalled.is_set() and self._is_lock(data):
            self.stalled.set()
        if self.stalled.is_set():
            await self.woken.wait()
        await self.pubsub.publish(topic, data)

    async def handle_ping(self, stream: Any) -> None:
        if self.stalled.is_set():
            await self.woken.wait()
        await self.membership.handle_ping(stream)

    @staticmethod
    def _is_lock(data: bytes) -> bool:
        msg = wire.decode(data, "self")
        return msg.kind == "merge.ready" and msg["stage"] == "lock"


async def merge_with_a_member_lost_at_its_lock(tmp_path: Path, exits: bool) -> ThreeNodeMerge:
    async with peers(3) as ps:
        ids = [p.id for p in ps]
        nodes, sessions, premerges = merge_nodes(tmp_path, ps, {"exclude_outliers": False}, {})
        stall = StallAtLock(ps[2].membership.pubsub, ps[2].membership)
        ps[2].membership.pubsub = stall
        ps[2].host.set_stream_handler(PING_PROTOCOL, stall.handle_ping)
        outcomes: dict[Any, Any] = {}
        lost_at: list[float] = []

        def others_locked_and_lost_it() -> bool:
            """Both others locked all three and have not seen node 2 alive for longer
            than VERIFY_LOST_GRACE_S (plus a margin)."""
            now = trio.current_time()
            for i in (0, 1):
                if sessions[i].agreement.locked != tuple(sorted(str(p) for p in ids)):
                    return False
                if ps[i].membership.is_alive(ids[2]):
                    lost_at.clear()
                    return False
            lost_at[:] = lost_at or [now]
            return now - lost_at[0] >= protocol.VERIFY_LOST_GRACE_S + PAST_OLD_GRACE_S

        async def one(i: int) -> None:
            outcomes[ids[i]] = await run_merge(nodes[i], sessions[i])
            outcomes[(ids[i], "at")] = trio.current_time()

        with trio.fail_after(RUN_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 0)
                nursery.start_soon(one, 1)
                async with trio.open_nursery() as node2:
                    node2.start_soon(one, 2)
                    await stall.stalled.wait()
                    if exits:  # it exits as it locks: its connections close from its end
                        outcomes["exited"] = trio.current_time()
                        node2.cancel_scope.cancel()
                        await close_host(ps[2].host)
                    else:
                        ok = await ps[0].membership.wait_until(
                            others_locked_and_lost_it, RUN_TIMEOUT_S / 2
                        )
                        assert ok, "the others never locked, or never lost node 2"
                        stall.woken.set()
        for s in sessions:
            s.close()
    return ThreeNodeMerge(ids, outcomes, premerges, merged_files(ids, nodes), [], [])


async def test_a_locked_member_that_stalls_is_waited_for_and_the_first_attempt_merges(
    tmp_path: Path,
):
    """Node 2 is silent past VERIFY_LOST_GRACE_S with its connections open: the others
    keep the lock, and all three merge at attempt 0, bit-exactly. (With the old rule,
    SILENT_LOST_GRACE_S = VERIFY_LOST_GRACE_S, both others fail attempt 0: checked.)"""
    m = await merge_with_a_member_lost_at_its_lock(tmp_path, exits=False)
    expected = m.mean_of(m.ids)
    for pid in m.ids:
        outcome = m.outcomes[pid]
        assert not isinstance(outcome, Exception), outcome
        assert outcome.attempt == 0 and len(outcome.members) == 3
        assert all(torch.equal(m.merged[pid][k], expected[k]) for k in expected)


async def test_a_locked_member_that_exits_is_given_up_on_without_the_silent_grace(
    tmp_path: Path, monkeypatch
):
    """Node 2 exits as it locks: its connections close from its end, so the others give
    the attempt up after VERIFY_LOST_GRACE_S, long before a silent member's grace (made
    longer than the whole test here)."""
    monkeypatch.setattr(protocol, "SILENT_LOST_GRACE_S", 10 * RUN_TIMEOUT_S)
    m = await merge_with_a_member_lost_at_its_lock(tmp_path, exits=True)
    for pid in m.ids[:2]:
        outcome = m.outcomes[pid]
        assert isinstance(outcome, MergeError), outcome
        assert "locked on members" in str(outcome)
        assert m.outcomes[(pid, "at")] - m.outcomes["exited"] < RUN_TIMEOUT_S / 2


async def test_only_a_peer_that_is_gone_is_unreachable_not_one_that_hung_up():
    """What the two graces rest on (Membership.unreachable), on real connections: a
    peer we hung up on, or that hung up on us, is not unreachable; one whose process is
    gone (its host closed: our redial is refused) is."""
    async with peers(3) as (a, b, c):
        network = a.host.get_network()
        await a.membership.hang_up(b.id)  # we hang up on b
        await c.membership.hang_up(a.id)  # c hangs up on us (it suspected us)
        with trio.fail_after(RUN_TIMEOUT_S / 4):
            while network.connections.get(c.id):  # bounded by fail_after
                await trio.sleep(0.05)  # polling the swarm: it signals no disconnection
        assert not a.membership.unreachable(b.id)
        assert not a.membership.unreachable(c.id)  # alive: our redial will be taken
        ok = await a.membership.wait_until(
            lambda: bool(network.connections.get(c.id)), RUN_TIMEOUT_S / 2
        )
        assert ok, "our redial of a live peer that hung up on us did not connect"
        await close_host(c.host)  # now c is gone: our redial of it is refused
        gone = await a.membership.wait_until(
            lambda: a.membership.unreachable(c.id), RUN_TIMEOUT_S / 2
        )
        assert gone, "a closed host never became unreachable"
        assert not a.membership.unreachable(b.id)
