"""F-SSD over libp2p: serve, announce and pull SSM states (the shell around federation.py).

Theory of operation. A `StateFederation` gives one node's StateBook a network presence:

* Serving. `/fflnode/state/1.0.0` is the bulk request/response of fflnode.p2p.bulk (the
  framing, deadlines and rejection accounting the gradient exchange and the merge use):
  each `get` names a context and its version; the answer is the held body, built once by
  StateBook.put_own, or an `error` with a stable code: "gone" (superseded or evicted),
  "unknown" (not held here, even after waiting STATE_WAIT_S for it), "bad-request",
  "not-member" (only peers the run's membership has heard from are served).
* Announcing. `announce` publishes `state.ready` for a range of contexts on the run's
  state topic, and the node re-publishes its latest REANNOUNCE_LAST announcements every
  heartbeat: a peer whose subscription reached us late, or whose mesh formed late, still
  hears it. Announcements received are recorded in federation.Announcements.
* Pulling. `pull` fetches contexts from one peer over one stream, STATE_WINDOW requests
  ahead, each answer validated against the LOCAL model's state spec as it arrives
  (federation.PeerPull); the peer's states enter the book only when all of them
  validated. `pull_all` does that for several peers at once and reports each failure by
  peer. `merged` merges the named peers' states (and ours) in canonical order; a named
  peer whose states are missing is a MergeError, never a silently smaller merge.

Every rejected message is counted in the node's Traffic (bulk.pull counts WireErrors from
bodies; announcements are counted here). Trio only moves bytes and waits: validation of a
body's digest runs in a worker thread (streams.recv_bulk), and so do merges.
Must never: insert part of a peer's answer, serve a peer the membership does not know,
or wait without a deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from fflnode import wire
from fflnode.errors import PeerUnavailable, WireError, short_peer
from fflnode.p2p import bulk
from fflnode.p2p.membership import HEARTBEAT_S, Membership, decode_announcement
from fflnode.ssm import federation
from fflnode.ssm.federation import STATE_CODEC, STATE_PROTOCOL, STATE_WHAT, Lookup, StateBook
from fflnode.ssm.states import LayerState

log = logging.getLogger(__name__)

# How long a server holds a request for a context it does not hold yet: a requester may
# ask before our announcement reached it (pubsub lags up to a heartbeat on a loaded
# machine); 10 s covers that, and a context this node never reads costs a requester
# 10 s at most before its "unknown" answer.
STATE_WAIT_S = 10.0
# Requests in flight on one state stream: a 1-layer MQAR state is 32 KiB, so 8 ahead keep
# the loopback pipe busy between acks while buffering at most 256 KiB per peer.
STATE_WINDOW = 8
# Latest announcements re-published every heartbeat (each one a ~40-byte message): with
# the membership heartbeat that is <= 3 messages/s per node, inside host.py's budget of
# GOSSIP_MSGS_PER_NODE_PER_S = 4, and a late subscriber still hears the current batch.
REANNOUNCE_LAST = 2


class StatePullError(PeerUnavailable):
    """A peer could not deliver the states asked for (unreachable, too slow, or it
    answered "unknown"/"gone"); names the peer and the reason."""

    def __init__(self, peer: str, reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"{short_peer(peer)}: states not pulled: {reason}")


@dataclass(frozen=True)
class PullReport:
    """Outcome of `pull_all`: contexts entered per peer, and why each failed peer did."""

    pulled: dict[ID, int]
    failed: dict[ID, str]

    @property
    def ok(self) -> bool:
        return not self.failed


class StateFederation:
    """One node's states on the network: serve them, announce them, pull its peers'."""

    def __init__(
        self,
        membership: Membership,
        book: StateBook,
        traffic: bulk.Traffic,
        *,
        wait_s: float = STATE_WAIT_S,
    ) -> None:
        self.membership = membership
        self.host = membership.host
        self.pubsub = membership.pubsub
        self.run_id = membership.run_id
        self.topic = federation.state_topic(self.run_id)
        self.book = book
        self.traffic = traffic
        self.wait_s = wait_s
        self.announcements = federation.Announcements()
        self._mine: list[tuple[range, int]] = []  # our latest announcements, re-published
        self._book_changed = trio.Event()
        self._heard = trio.Event()

    # ------------------------------------------------------------------ lifetime
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve, listen to and repeat announcements until cancelled (start it in the
        node's nursery with `nursery.start`)."""
        subscription = await self.pubsub.subscribe(self.topic)
        self.host.set_stream_handler(STATE_PROTOCOL, self.handle)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive, subscription)
            nursery.start_soon(self._reannounce)
            task_status.started()

    # ------------------------------------------------------------------ own states
    def put_own(self, context: int, round: int, states: Sequence[LayerState]) -> None:
        """Hold `states` (one unbatched LayerState per layer) as version `round` of `context`."""
        self.book.put_own(context, round, states)
        self._book_changed.set()
        self._book_changed = trio.Event()

    def put_own_batch(self, first: int, round: int, states: Sequence[LayerState]) -> range:
        """Hold batched states (batch b = context first + b) and return the contexts."""
        batch = int(states[0].h.shape[0])
        for b in range(batch):
            self.book.put_own(
                first + b, round, [LayerState(s.h[b], s.log_decay[b]) for s in states]
            )
        self._book_changed.set()
        self._book_changed = trio.Event()
        return range(first, first + batch)

    # ------------------------------------------------------------------ serving
    async def handle(self, stream: INetStream) -> None:
        await bulk.serve(stream, STATE_PROTOCOL, self.run_id, self._resolve, self.traffic)

    async def _resolve(self, peer: str, msg: wire.Message) -> bulk.Resolved:
        if not self._is_member(peer):
            raise bulk.Unavailable("not-member", "requester is not a member of this run")
        try:
            context, round = federation.check_request(msg)
        except ValueError as e:
            raise bulk.Unavailable("bad-request", str(e)) from None
        with trio.move_on_after(self.wait_s):
            while self.book.lookup(context, round)[0] is Lookup.PENDING:
                await self._book_changed.wait()
        status, held = self.book.lookup(context, round)
        if status is Lookup.GONE:
            raise bulk.Unavailable("gone", f"context {context} round {round} is no longer held")
        if status is Lookup.PENDING or held is None:
            raise bulk.Unavailable(
                "unknown", f"context {context} round {round} not held here after {self.wait_s:g} s"
            )
        return STATE_CODEC, held.parts, {}

    def _is_member(self, peer: str) -> bool:
        try:
            return ID.from_base58(peer) in self.membership.peers
        except ValueError:
            return False

    # ------------------------------------------------------------------ announcing
    async def announce(self, contexts: range, round: int) -> None:
        """Tell the run that versions `round` of `contexts` are held here."""
        fields = federation.ready_fields(contexts, round)
        self._mine = [*self._mine, (contexts, round)][-REANNOUNCE_LAST:]
        await self._publish(fields)

    async def _publish(self, fields: dict[str, int]) -> None:
        data = wire.encode("state.ready", run=self.run_id, **fields)
        await self.pubsub.publish(self.topic, data)

    async def _reannounce(self) -> None:
        while True:  # for the node's lifetime; cancelled with its nursery
            await trio.sleep(HEARTBEAT_S)  # a period, not synchronisation
            for contexts, round in self._mine:
                await self._publish(federation.ready_fields(contexts, round))

    async def _receive(self, subscription: object) -> None:
        me = self.host.get_id()
        while True:  # for the node's lifetime; cancelled with its nursery
            msg = await subscription.get()  # type: ignore[attr-defined]
            # a rejection counts against its sender (the gate)
            got = decode_announcement(msg, me, self.run_id, {"state.ready"}, self.traffic)
            if got is None:
                continue
            sender, decoded = got
            contexts, round = federation.parse_ready(decoded)
            self.announcements.add(sender.to_bytes(), contexts, round)
            self._heard.set()
            self._heard = trio.Event()

    async def wait_announced(
        self, peers: Sequence[ID], contexts: Sequence[int], round: int, timeout_s: float
    ) -> list[ID]:
        """Wait until every peer announced every context at `round`; returns the peers
        that had not when `timeout_s` ran out (empty: all did)."""

        def missing() -> list[ID]:
            return [
                p for p in peers if not self.announcements.covers(p.to_bytes(), contexts, round)
            ]

        with trio.move_on_after(timeout_s):
            while missing():
                await self._heard.wait()
        return missing()

    # ------------------------------------------------------------------ pulling
    async def pull(self, peer: ID, contexts: Sequence[int], round: int) -> int:
        """Pull `peer`'s states of `contexts` at `round` into the book, all or nothing.

        Returns the number of contexts entered. Raises WireError when the peer sent
        something invalid (already counted in Traffic), StatePullError when it could not
        deliver (unreachable, too slow, or "unknown"/"gone")."""
        name = str(peer)
        job = federation.PeerPull(
            self.book, peer.to_bytes(), name, run=self.run_id, round=round, contexts=contexts
        )
        requests = [bulk.Request(round, STATE_WHAT, c, 0, 0, STATE_CODEC) for c in contexts]

        def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            job.add(req.index, header, arrays)

        try:
            await bulk.pull(
                self.host,
                peer,
                STATE_PROTOCOL,
                self.run_id,
                requests,
                on_piece,
                self.traffic,
                window=STATE_WINDOW,
                wait_s=self.wait_s,
                expected_bytes=len(contexts) * federation.body_nbytes(self.book.spec),
            )
        except PeerUnavailable as e:
            raise StatePullError(name, str(e)) from None
        try:
            return job.commit()
        except WireError as e:
            self.traffic.reject(e.reason)
            raise

    async def pull_all(
        self, peers: Sequence[ID], contexts: Sequence[int], round: int
    ) -> PullReport:
        """Pull from every peer at once; each peer's outcome is independent."""
        pulled: dict[ID, int] = {}
        failed: dict[ID, str] = {}

        async def one(peer: ID) -> None:
            try:
                pulled[peer] = await self.pull(peer, contexts, round)
            except (WireError, StatePullError) as e:
                failed[peer] = str(e)
                log.warning("no states from %s: %s", short_peer(str(peer)), e)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(one, peer)
        return PullReport(pulled, failed)

    # ------------------------------------------------------------------ continuing
    async def merged(
        self, contexts: Sequence[int], round: int, peers: Sequence[ID], *, own: bool = True
    ) -> tuple[LayerState, ...]:
        """Per layer, the canonical merge of `peers`' states (and ours when `own`) for each
        context, stacked over `contexts`: the state a model continues from. Every named
        peer must have contributed every context (MergeError otherwise)."""
        members = [
            self.book.members(c, round, [p.to_bytes() for p in peers], own=own) for c in contexts
        ]
        return await trio.to_thread.run_sync(federation.merged_batch, members)
