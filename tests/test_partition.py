"""Partitions: peers that gave up on each other meet again, and a node cut off from the
majority of the run waits for it instead of training on alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio

from fflnode.p2p import membership as membership_module
from fflnode.p2p.membership import (
    HEARTBEAT_S,
    MAX_OVERDUE_S,
    OVERDUE_S,
    PeerView,
)
from fflnode.rounds import QuorumLost, RoundRunner
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


async def test_a_slow_peer_that_missed_a_ping_is_suspected_but_keeps_its_connection():
    """Load, not death: a ping that timed out makes a suspect, and the suspect's next
    heartbeat brings it back over the same connection. Hanging up at once made every
    such peer redial, which loaded 16 daemons on 2 cores into a cascade of suspicion."""
    async with peers(2) as (a, b):
        conn = a.host.get_network().connections[b.id]
        pinged = trio.Event()

        async def timed_out(peer):  # what a ping to a peer stuck behind load returns
            pinged.set()
            return False

        a.membership.ping = timed_out
        view = a.membership.peers[b.id]
        view.last_seen -= view.overdue_s() + HEARTBEAT_S  # its beat is late
        with trio.fail_after(RECONNECT_S):
            while b.id not in a.membership.suspects:
                await a.membership.wait_changed()
            assert pinged.is_set() and not a.membership.is_alive(b.id)
            while not a.membership.is_alive(b.id):
                await a.membership.wait_changed()
        assert a.host.get_network().connections.get(b.id) == conn, "the suspect was hung up on"


async def test_a_suspect_that_stays_silent_is_hung_up_on(monkeypatch):
    """A frozen peer (here: one whose heartbeats we no longer hear and whose pings
    fail) is disconnected SUSPECT_HANGUP_S after it became a suspect."""
    monkeypatch.setattr(membership_module, "SUSPECT_HANGUP_S", 0.5)
    async with peers(2) as (a, b):

        async def timed_out(peer):
            return False

        hung_up = trio.Event()
        disconnect = a.host.disconnect

        async def recorded(peer):
            if peer == b.id:
                hung_up.set()
            await disconnect(peer)

        a.host.disconnect = recorded
        a.membership.ping = timed_out
        a.membership._heartbeat = lambda sender, msg, nursery: None  # b's beats go unheard
        view = a.membership.peers[b.id]
        view.last_seen -= view.overdue_s() + HEARTBEAT_S
        with trio.fail_after(RECONNECT_S):
            await hung_up.wait()
        assert b.id in a.membership.suspects


def test_how_late_a_heartbeat_may_be_follows_the_peers_jitter_within_bounds():
    """Punctual heartbeats: pinged after OVERDUE_S. Heartbeats 1-7 s apart, as from 16
    daemons starting on 2 cores: pinged only past mean + 4 sigma of those gaps. Never
    past MAX_OVERDUE_S, and one long silence (a freeze) does not raise it past that."""
    steady, jittery, frozen = (PeerView(None, 0.0) for _ in range(3))  # type: ignore[arg-type]
    t = 0.0
    for _ in range(50):
        t += HEARTBEAT_S
        steady.heartbeat_at(t)
    assert steady.overdue_s() == OVERDUE_S
    t = 0.0
    for gap in [1.0, 7.0, 2.0, 5.0, 1.0, 6.0, 3.0] * 7:
        t += gap
        jittery.heartbeat_at(t)
    mean, sigma = jittery.gap_mean, jittery.gap_var**0.5
    assert 2.0 < mean < 5.0 and sigma > 1.0
    assert jittery.overdue_s() == pytest.approx(min(MAX_OVERDUE_S, mean + 4 * sigma))
    assert OVERDUE_S + 4.0 < jittery.overdue_s() <= MAX_OVERDUE_S
    frozen.heartbeat_at(0.0)
    frozen.heartbeat_at(3600.0)  # an hour stopped: counted as MAX_OVERDUE_S at most
    assert frozen.overdue_s() <= MAX_OVERDUE_S


class Members:
    """What RoundRunner reads of Membership: who we are, who is alive, and waiting."""

    def __init__(self, me: str, alive: set[str]) -> None:
        self.me, self.alive = me, alive
        self.heard: dict[str, float] = {}  # peer -> when it was last heard (trio time)
        self.changed = trio.Event()

    def is_alive(self, peer: str) -> bool:
        return peer in self.alive

    def heard_since(self, peer: str, t: float) -> bool:
        return self.heard.get(peer, -math.inf) >= t

    def back(self, peer: str) -> None:
        self.alive.add(peer)
        self.heard[peer] = trio.current_time()
        self.changed.set()

    async def wait_until(self, predicate, timeout_s: float) -> bool:
        with trio.move_on_after(timeout_s):
            while not predicate():
                await self.changed.wait()
                self.changed = trio.Event()
        return predicate()


class Status:
    def __init__(self) -> None:
        self.said: list[str] = []

    def status(self, text: str) -> None:
        self.said.append(text)


def runner(members: Members, status: Status, quorum: int = 3) -> RoundRunner:
    return RoundRunner(
        trainer=None, exchange=None, membership=members, notifier=status, data_dir=Path("."),
        run_id="r", members=["me", "a", "b", "c"], rounds=10, eval_every=1,
        checkpoint_every=1, records=[], quorum=quorum, quorum_wait_s=QUORUM_WAIT_S,
    )  # fmt: skip


QUORUM_WAIT_S = 120.0


async def test_a_node_cut_off_from_the_quorum_starts_no_round_until_it_is_back(autojump_clock):
    """Cut off (one of four, quorum three), training on alone would diverge and run
    ahead of the majority: the node waits, and goes on once a quorum is reachable."""
    members, status = Members("me", {"a"}), Status()
    run = runner(members, status)
    assert run.reachable() == 2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run._await_quorum, 5)
        await trio.sleep(60.0)  # virtual time: still waiting
        assert status.said == ["waiting for a quorum: 2/3 members reachable"]
        members.back("c")
    assert trio.current_time() < QUORUM_WAIT_S and run.reachable() == 3
    await run._await_quorum(6)  # a quorum: no wait, nothing said
    assert len(status.said) == 1


async def test_a_node_cut_off_for_too_long_gives_up_on_the_run(autojump_clock):
    members, status = Members("me", set()), Status()
    with pytest.raises(QuorumLost, match=r"round 5: only 1 of the run's 4 members reachable"):
        await runner(members, status)._await_quorum(5)
    assert trio.current_time() == pytest.approx(QUORUM_WAIT_S)


async def test_after_a_round_that_received_nothing_only_members_heard_since_count(
    autojump_clock,
):
    """A pulled cable shows first as a round in which no contribution arrived, while
    liveness (its deadlines adapt to load) may still call every peer alive: the next
    round waits for a quorum heard from since, and goes on once they speak again."""
    members, status = Members("me", {"a", "b", "c"}), Status()
    run = runner(members, status)
    assert run.reachable() == 4
    await trio.sleep(1.0)
    run._silent_since = trio.current_time()  # what run() sets after such a round
    assert run.reachable() == 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run._await_quorum, 5)
        await trio.sleep(30.0)  # virtual time: still waiting, though all are "alive"
        assert status.said == ["waiting for a quorum: 1/3 members reachable"]
        members.back("a")
        members.back("b")
    assert run._silent_since is None and run.reachable() == 4  # the filter is lifted
    assert trio.current_time() < 1.0 + QUORUM_WAIT_S
