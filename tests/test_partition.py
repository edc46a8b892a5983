"""Membership across a healed partition: peers that gave up on each other meet again."""

from __future__ import annotations

import trio

from tests.p2p_harness import peers

# The redial comes at the next liveness check (1 s) and its heartbeats a second later;
# 20 s covers a loaded 2-core machine.
RECONNECT_S = 20.0


async def test_peers_that_gave_up_on_each_other_reconnect_from_their_last_heartbeat():
    """A pulled cable: each side suspected the other and dropped the connection. No
    heartbeat can arrive without a connection, so only a redial at the addresses the
    last heartbeat named brings them back."""
    async with peers(2) as (a, b):
        for me, other in ((a, b), (b, a)):
            me.membership.suspect(other.id, "test: cable pulled")
            await me.host.disconnect(other.id)
        assert not a.membership.is_alive(b.id) and not b.membership.is_alive(a.id)
        with trio.fail_after(RECONNECT_S):
            while not (a.membership.is_alive(b.id) and b.membership.is_alive(a.id)):
                await a.membership.wait_changed()
        assert not a.membership.suspects and not b.membership.suspects
