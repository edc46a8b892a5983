"""A peer banned by one node cannot get an honest forwarder graylisted there.

Found by tools/fuzz_daemon.py (mode "ban"): two daemons banned a flooder at different
moments; the one that had not banned it yet relayed its well-formed announcements, the
other rejected them at its topic validator, and GossipSub charged each rejection to the
honest relay. Below -50 the relay's own heartbeats were dropped unread, each daemon
called the other dead, trained alone, and the merge timed out (exit 3). Messages from a
refused origin are now ignored before validation, so nothing is charged to the relay.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from fflnode import wire
from fflnode.p2p.bulk import Traffic
from fflnode.p2p.gate import Gate
from fflnode.p2p.host import build_host, build_pubsub, close_host, running_host
from fflnode.p2p.membership import Membership, announce_topic

RUN = "ignore-run"
LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
MESH_TIMEOUT_S = 20.0  # the three hosts connect and see each other's heartbeats
RELAYED = 30  # well-formed announcements the banned peer sends through the relay
# Heartbeats of the relay the other node must still receive once the banned peer's
# messages reached it: 3 beats (HEARTBEAT_S apart) prove the relay is not ignored.
BEATS_AFTER = 3
RELAY_TIMEOUT_S = 20.0


@pytest.mark.slow
async def test_messages_from_a_peer_one_node_banned_cost_the_honest_relay_nothing():
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)

        async def start(gate: Gate | None):
            host = build_host(create_new_key_pair(), gate=gate)
            pubsub, router = build_pubsub(host, 3, mesh_diversity_ips=1, ip_colocation_threshold=64)
            await stack.enter_async_context(running_host(host, LISTEN))
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(router))
            stack.push_async_callback(close_host, host)
            await pubsub.wait_until_ready()
            return host, pubsub, router

        honest = []
        for _ in range(2):  # as fflnode.node wires a node: the gate screens the topic
            gate = Gate(blacklist_after=5)
            host, pubsub, router = await start(gate)
            traffic = Traffic(on_reject=gate.offence)
            membership = Membership(host, pubsub, RUN, traffic, None, gate.validate_announcement)
            pubsub.set_topic_validator(membership.topic, membership.validate, False)
            await nursery.start(gate.run)
            await nursery.start(membership.run)
            honest.append((host, pubsub, router, gate, membership))
        hostile, hostile_pubsub, _ = await start(None)
        await hostile_pubsub.subscribe(announce_topic(RUN))
        (relay, _, _, _, relay_m), (judge, _, judge_router, judge_gate, judge_m) = honest

        with trio.fail_after(MESH_TIMEOUT_S):
            await judge.connect(info_from_p2p_addr(relay.get_addrs()[0]))
            for h in (relay, judge):
                await hostile.connect(info_from_p2p_addr(h.get_addrs()[0]))
            assert await judge_m.wait_until(lambda: judge_m.is_alive(relay.get_id()), 15)
            assert await relay_m.wait_until(lambda: relay_m.is_alive(judge.get_id()), 15)

        # The judge bans the hostile peer; the relay has nothing against it.
        bad = hostile.get_id()
        for _ in range(judge_gate.blacklist_after):
            judge_gate.offence(str(bad), "schema")
        with trio.fail_after(MESH_TIMEOUT_S):
            while not (bad in judge_gate.banned and judge_gate.banned[bad].disconnected):
                await judge_gate.wait_changed()

        # Well-formed announcements (a non-member's merge hash): the relay accepts and
        # forwards them, the judge refuses their origin.
        topic = announce_topic(RUN)
        for i in range(RELAYED):
            await hostile_pubsub.publish(
                topic, wire.encode("merge.hash", run=RUN, hash=f"{i:064x}", digest="0" * 64)
            )
        relay_id = relay.get_id()
        mark = None
        with trio.move_on_after(RELAY_TIMEOUT_S):
            while f"pubsub:{bad}" not in judge_gate._warned:  # the judge saw one relayed
                await trio.sleep(0.05)  # polling a flag the relayed message sets
            mark = judge_m.peers[relay_id].seq
            while judge_m.peers[relay_id].seq < mark + BEATS_AFTER * 1000:
                await judge_m.wait_changed()  # heartbeat seq counts milliseconds

        assert mark is not None, "no relayed message reached the judge"
        score = judge_router.scorer.score(relay_id, [topic])
        invalid = judge_router.scorer.invalid_messages[relay_id][topic]
        assert judge_m.peers[relay_id].seq >= mark + BEATS_AFTER * 1000, (
            f"the judge stopped hearing the relay's heartbeats: relay score {score}, "
            f"{invalid} invalid messages charged to it"
        )
        assert judge_m.is_alive(relay_id)
        assert invalid == 0 and score >= 0
