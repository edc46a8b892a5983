"""A node whose own event loop stalled does not blame its peers for the silence.

On a loaded machine (16 daemons on 2 cores) a node's loop is held up for seconds; every
peer's heartbeat waits unread meanwhile, and without the stall accounting every peer
looked dead at once when the loop woke ("1 of the run's 16 members reachable"). Here
the stall is real: the test blocks the one trio thread the peers share, longer than
any peer's member timeout, then asks who is alive before anything else runs.
"""

from __future__ import annotations

import time

import trio

from fflnode.p2p import membership as membership_module
from fflnode.p2p.membership import MAX_EXCUSED_S, STALL_GRACE_S
from tests.p2p_harness import peers

# Past every peer's member timeout (7.5 s for punctual heartbeats, at most 19 s), within
# MAX_EXCUSED_S; the watchdog is late by about this much when the stall ends.
STALL_MARGIN_S = 1.5
RECOVER_TIMEOUT_S = 30.0  # bounded wait for heartbeats after the stall


def stall_for(p, others) -> float:  # type: ignore[no-untyped-def]
    """Seconds that outlast every peer's member timeout as `p` sees it now."""
    book = p.membership.peers
    longest = max(p.membership.member_timeout_s(book[o.id]) for o in others)
    assert longest + STALL_MARGIN_S < MAX_EXCUSED_S
    return longest + STALL_MARGIN_S


async def test_our_own_stall_is_not_counted_against_peers_and_suspects_nobody():
    async with peers(3) as (a, b, c):
        stall = stall_for(a, [b, c])
        before = a.membership.stalled_s()
        time.sleep(stall)  # the loop itself stalls: no heartbeat is read meanwhile
        # Nothing has run since: every heartbeat is as old as the stall.
        assert a.membership.stalled_s() - before > stall - 1.0 - STALL_GRACE_S
        assert set(a.membership.alive()) == {b.id, c.id}
        assert a.membership.is_alive(b.id) and c.membership.is_alive(a.id)
        t = trio.current_time()
        for p, q in ((a, b), (a, c), (b, c), (c, a)):
            heard = await p.membership.wait_until(
                lambda p=p, q=q: p.membership.heard_since(q.id, t), RECOVER_TIMEOUT_S
            )
            assert heard, "heartbeats did not resume after the stall"
        assert not a.membership.suspects and not b.membership.suspects
        assert not c.membership.suspects


async def test_without_the_excuse_the_same_stall_makes_every_peer_look_dead(monkeypatch):
    """The control: with nothing excused (MAX_EXCUSED_S = 0) the stall above is a
    silence past the member timeout, so the first test does test the accounting."""
    monkeypatch.setattr(membership_module, "MAX_EXCUSED_S", 0.0)
    async with peers(2) as (a, b):
        time.sleep(stall_for(a, [b]))
        assert a.membership.alive() == []
        assert not a.membership.is_alive(b.id)
