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
* Pulling. `pull` fetches contexts from one peer over one stream, each answer
  validated against the LOCAL model's state spec as it arrives (federation.PeerPull);
  the peer's states enter the book only when all of them validated. With batch = 1 it
  asks for one context per request, STATE_WINDOW ahead; with batch > 1 for runs of up
  to `batch` consecutive contexts per request (federation.batches), BATCH_WINDOW ahead,
  decoded in a worker thread. `pull_all` does that for several peers at once and
  reports each failure by peer. `merged` merges the named peers' states (and ours) in
  canonical order; a named peer whose states are missing is a MergeError, never a
  silently smaller merge.
* Epoch announcements. `states.ready` and `states.hash` (fflnode.states_phase) ride the
  same topic; `on(kind, handler)` receives them, from peers the membership knows only.
  `validator` is the topic's pubsub validator: the access gate's screen, then a decode.

Every rejected message is counted in the node's Traffic (bulk.pull counts WireErrors from
bodies; announcements are counted here). Trio only moves bytes and waits: validation of a
body's digest runs in a worker thread (streams.recv_bulk), and so do merges.
Must never: insert part of a peer's answer, serve a peer the membership does not know,
or wait without a deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
# Batched requests in flight on one stream: each answer is up to 4 MiB
# (federation.MAX_BATCH_BODY_BYTES); 2 keep the pipe busy while one is decoded.
BATCH_WINDOW = 2
# Kinds this topic carries; the epoch's two go to whoever registered with `on`.
TOPIC_KINDS = frozenset({"state.ready", "states.ready", "states.hash"})


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
        batch: int = 1,
    ) -> None:
        self.membership = membership
        self.host = membership.host
        self.pubsub = membership.pubsub
        self.run_id = membership.run_id
        self.topic = federation.state_topic(self.run_id)
        self.book = book
        self.traffic = traffic
        self.wait_s = wait_s
        self.batch = federation.batch_limit(book.spec, book.codec, batch)
        self.tag = federation.batch_tag(book.codec)
        self._handlers: dict[str, list[Callable[[ID, wire.Message], None]]] = {}
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

    def book_changed(self) -> None:
        """Wake requests waiting for a context: the book gained states (put_held)."""
        self._book_changed.set()
        self._book_changed = trio.Event()

    async def wait_heard(self) -> None:
        """Until the next announcement on the state topic (callers bound the wait)."""
        await self._heard.wait()

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
        if msg["codec"] == self.tag:
            return await self._resolve_batch(msg)
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

    async def _resolve_batch(self, msg: wire.Message) -> bulk.Resolved:
        limit = federation.batch_limit(self.book.spec, self.book.codec, wire.MAX_MEMBERS)
        try:
            contexts, round = federation.check_batch_request(msg, self.tag, limit)
        except ValueError as e:
            raise bulk.Unavailable("bad-request", str(e)) from None

        def pending() -> bool:
            return any(self.book.lookup(c, round)[0] is Lookup.PENDING for c in contexts)

        with trio.move_on_after(self.wait_s):
            while pending():
                await self._book_changed.wait()
        helds = []
        for c in contexts:
            status, held = self.book.lookup(c, round)
            if status is Lookup.GONE:
                raise bulk.Unavailable("gone", f"context {c} round {round} is no longer held")
            if status is Lookup.PENDING or held is None:
                raise bulk.Unavailable(
                    "unknown", f"context {c} round {round} not held here after {self.wait_s:g} s"
                )
            helds.append(held)
        return self.tag, federation.batch_parts(helds), {}

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

    def on(self, kind: str, handler: Callable[[ID, wire.Message], None]) -> None:
        """Call `handler(sender, message)` for each `kind` announcement from a run peer."""
        self._handlers.setdefault(kind, []).append(handler)

    def off(self, kind: str, handler: Callable[[ID, wire.Message], None]) -> None:
        if handler in self._handlers.get(kind, []):
            self._handlers[kind].remove(handler)

    async def publish(self, kind: str, **fields: object) -> None:
        data = wire.encode(kind, run=self.run_id, **fields)
        if len(data) > wire.MAX_PUBSUB_BYTES:
            raise ValueError(f"{kind} announcement of {len(data)} bytes is too large for pubsub")
        await self.pubsub.publish(self.topic, data)

    def validator(self, screen: Callable[[ID, Any], bool]) -> Callable[[ID, Any], bool]:
        """This topic's pubsub validator: `screen` (the access gate's verdict on origin and
        forwarder), then a decode; a message that fails is neither delivered nor
        forwarded (counted against its origin). Never raises."""
        me = self.host.get_id()

        def validate(forwarder: ID, msg: Any) -> bool:
            try:
                if not screen(forwarder, msg):
                    return False
                if ID(msg.from_id) == me:
                    return True
                got = decode_announcement(msg, me, self.run_id, TOPIC_KINDS, self.traffic)
                return got is not None
            except Exception as e:  # nothing a peer sends may raise out of a validator
                self.traffic.reject_unexpected(str(forwarder), "state topic validator", e)
                return False

        return validate

    async def _receive(self, subscription: object) -> None:
        me = self.host.get_id()
        while True:  # for the node's lifetime; cancelled with its nursery
            msg = await subscription.get()  # type: ignore[attr-defined]
            # a rejection counts against its sender (the gate)
            got = decode_announcement(msg, me, self.run_id, TOPIC_KINDS, self.traffic)
            if got is None:
                continue
            sender, decoded = got
            if decoded.kind == "state.ready":
                contexts, round = federation.parse_ready(decoded)
                self.announcements.add(sender.to_bytes(), contexts, round)
            elif sender in self.membership.peers:  # only members' epoch announcements count
                for handler in self._handlers.get(decoded.kind, []):
                    try:
                        handler(sender, decoded)
                    except Exception as e:  # a handler choking on a peer's announcement
                        self.traffic.reject_unexpected(str(sender), decoded.kind, e)
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
    async def pull(
        self, peer: ID, contexts: Sequence[int], round: int, *, batch: int | None = None
    ) -> int:
        """Pull `peer`'s states of `contexts` at `round` into the book, all or nothing,
        `batch` contexts per request (None: this federation's; 1: one each).

        Returns the number of contexts entered. Raises WireError when the peer sent
        something invalid (already counted in Traffic), StatePullError when it could not
        deliver (unreachable, too slow, or "unknown"/"gone")."""
        name = str(peer)
        job = federation.PeerPull(
            self.book, peer.to_bytes(), name, run=self.run_id, round=round, contexts=contexts
        )
        size = self.batch if batch is None else federation.batch_limit(
            self.book.spec, self.book.codec, batch
        )  # fmt: skip
        if size == 1:
            requests = [bulk.Request(round, STATE_WHAT, c, 0, 0, STATE_CODEC) for c in contexts]
            window, expected = STATE_WINDOW, federation.body_nbytes(self.book.spec)
        else:
            requests = [
                bulk.Request(round, STATE_WHAT, r.start, 0, len(r), self.tag)
                for r in federation.batches(contexts, size)
            ]
            window, expected = BATCH_WINDOW, self.book.codec.body_nbytes(self.book.spec, 1)

        async def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            if req.codec == STATE_CODEC:
                job.add(req.index, header, arrays)
            else:
                batch = range(req.index, req.index + req.hi)
                await trio.to_thread.run_sync(job.add_batch, batch, header, arrays)

        try:
            await bulk.pull(
                self.host,
                peer,
                STATE_PROTOCOL,
                self.run_id,
                requests,
                on_piece,
                self.traffic,
                window=window,
                wait_s=self.wait_s,
                expected_bytes=len(contexts) * expected,
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
