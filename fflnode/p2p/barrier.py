"""The start barrier: the run's members agree on who starts, over the run topic.

The trio shell of fflnode.agreement. Each node announces `start.ready` (its proposal,
lock or commitment) at every change and once per heartbeat, feeds what it hears into
its Agreement, and returns the committed members: the `nodes` first admitted peers in
canonical order (ascending peer-ID bytes), the same set on every member, however many
surplus peers showed up and in whatever order heartbeats arrived. A committed node
keeps announcing for COMMIT_ANNOUNCE_S so members still converging can adopt it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from libp2p.peer.id import ID

from fflnode.agreement import COMMIT, Agreement, Decision
from fflnode.errors import FflError, short_peer
from fflnode.p2p.membership import HEARTBEAT_S, Membership

log = logging.getLogger(__name__)

# A member still converging hears the commitment within a heartbeat or two; it is
# repeated until every member's heartbeat says it started, for 30 s at most (a node
# paused that long by a loaded machine is behind anyway and catches up from heartbeats).
COMMIT_ANNOUNCE_S = 30.0


class StartRefused(FflError):
    """The run's members agreed without this node, or did not agree in time."""


async def start_barrier(
    membership: Membership,
    nodes: int,
    timeout_s: float,
    nursery: trio.Nursery,
    status: Callable[[str], None] = lambda text: None,
) -> list[ID]:
    """The run's `nodes` members, agreed with every other member; raises StartRefused."""
    me = str(membership.me)
    agreement = Agreement(
        me,
        quorum=nodes,
        size=nodes,
        rank=lambda m: ID.from_base58(m).to_bytes(),
        eligible=lambda m: m == me or _admitted(membership, m),
    )
    membership.on(
        "start.ready", lambda peer, msg: agreement.heard(str(peer), msg["members"], msg["stage"])
    )
    status(f"waiting for {nodes - 1} peers")
    announced: tuple[tuple[str, ...], str] | None = None
    last = -float("inf")
    decision: Decision | None = None
    with trio.move_on_after(timeout_s):
        while True:
            decision = agreement.decide(str(p) for p in membership.alive())
            if decision.excluded:
                raise StartRefused(
                    f"start: the run's {nodes} members agreed without this node (this peer "
                    f"is surplus: {len(decision.members)} others started run "
                    f"{membership.run_id!r}); check run.nodes and which nodes should join"
                )
            now = trio.current_time()
            if (decision.members, decision.stage) != announced or now - last >= HEARTBEAT_S:
                await _announce(membership, decision)
                announced, last = (decision.members, decision.stage), now
            if decision.committed:
                nursery.start_soon(_keep_announcing, membership, decision)
                log.info("run starts with %d members", len(decision.members))
                return [ID.from_base58(m) for m in decision.members]
            with trio.move_on_after(HEARTBEAT_S):
                await membership.wait_changed()
    raise StartRefused(_timeout_message(membership, nodes, timeout_s, decision))


def _admitted(membership: Membership, member: str) -> bool:
    """Whether `member` (a string a peer sent) names a peer this node admitted."""
    try:
        return ID.from_base58(member) in membership.peers
    except ValueError:  # not base58 at all
        return False


async def _announce(membership: Membership, decision: Decision) -> None:
    await membership.publish("start.ready", members=list(decision.members), stage=decision.stage)


async def _keep_announcing(membership: Membership, decision: Decision) -> None:
    """Repeat the commitment until every member's heartbeat shows it past the barrier
    (or COMMIT_ANNOUNCE_S): GossipSub's per-topic rate limit drops a relay's messages
    past a few per node per second, so announcements nobody needs are not sent."""
    others = [ID.from_base58(m) for m in decision.members if m != str(membership.me)]

    def all_started() -> bool:
        views = [membership.peers.get(p) for p in others]
        return all(v is not None and v.phase != "join" for v in views)

    with trio.move_on_after(COMMIT_ANNOUNCE_S):
        while not all_started():
            await trio.sleep(HEARTBEAT_S)  # a period, not synchronisation
            await _announce(membership, Decision(decision.members, COMMIT))


def _timeout_message(
    membership: Membership, nodes: int, timeout_s: float, decision: Decision | None
) -> str:
    seen = len(membership.alive())
    text = (
        f"start: saw {seen} of the {nodes - 1} peers run {membership.run_id!r} expects "
        f"within {timeout_s:.0f} s"
    )
    if decision is not None and seen >= nodes - 1:
        text += f" but they did not agree on the members (ours: {decision.stage})"
    if membership.refused:
        refusals = "; ".join(
            f"{short_peer(str(p))}: {r.text}" for p, r in list(membership.refused.items())[:4]
        )
        text += f"; refused {len(membership.refused)} peer(s) whose run differs ({refusals})"
    else:
        text += "; check node.bootstrap, and that every node has the same run_id"
    return text


__all__ = ["COMMIT_ANNOUNCE_S", "StartRefused", "start_barrier"]
