"""A node that suspected (and disconnected from) every peer redials them: heartbeats
travel over pubsub, so without a connection nobody ever hears the other again."""

from __future__ import annotations

from tests.p2p_harness import peers

REJOIN_TIMEOUT_S = 30.0  # the first redial comes after DIAL_BACKOFF_S[0] = 2 s


async def test_a_node_cut_off_from_every_peer_by_suspicion_reconnects_and_sees_them_again():
    async with peers(2) as (a, b):
        # What a loaded machine does: each side's watchdog suspects the other and hangs up.
        a.membership.suspect(b.id, "test: missed heartbeats")
        b.membership.suspect(a.id, "test: missed heartbeats")
        await a.host.disconnect(b.id)
        assert not a.host.get_network().connections.get(b.id)
        ok = await a.membership.wait_until(
            lambda: b.id in a.membership.alive() and a.id in b.membership.alive(),
            REJOIN_TIMEOUT_S,
        )
        assert ok, "the two peers never heard each other again after the disconnect"
