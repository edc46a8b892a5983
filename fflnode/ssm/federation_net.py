"""F-SSD over libp2p: serve and pull SSM states (the shell around federation.py).

Theory of operation. A `StateFederation` gives one node's StateBook a network presence:

* Serving. `/fflnode/state/1.0.0` is the bulk request/response of fflnode.p2p.bulk (the
  framing, deadlines and rejection accounting the gradient exchange and the merge use):
  each `get` names a context and its version; the answer is the held body, built once by
  StateBook.put_own, or an `error` with a stable code: "gone" (superseded or evicted),
  "unknown" (not held here, even after waiting STATE_WAIT_S for it), "bad-request",
  "not-member" (only peers the run's membership has heard from are served).
* Range announcements. `state.ready` messages a peer publishes on the state topic are
  validated and recorded in federation.Announcements (bounded); the node itself never
  publishes them: the state phase agrees with `states.ready` instead (below).
* Pulling. `pull` fetches contexts from one peer over one stream, each answer
  validated against the LOCAL model's state spec as it arrives (federation.PeerPull);
  the peer's states enter the book only when all of them validated. With batch = 1 it
  asks for one context per request, STATE_WINDOW ahead; with batch > 1 for runs of up
  to `batch` consecutive contexts per request (federation.batches), BATCH_WINDOW ahead,
  decoded in a worker thread. Composition is the caller's (fflnode.ssm.epoch).
* Epoch announcements. `states.ready` and `states.hash` (fflnode.states_phase) ride the
  same topic; `on(kind, handler)` receives them, from peers the membership knows only.
  `validator` is the topic's pubsub validator: the access gate's screen, then a decode.

Every rejected message is counted in the node's Traffic (bulk.pull counts WireErrors from
bodies; announcements are counted here). Trio only moves bytes and waits: validation of a
body's digest runs in a worker thread (streams.recv_bulk).
Must never: insert part of a peer's answer, serve a peer the membership does not know,
or wait without a deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from fflnode import wire
from fflnode.errors import PeerUnavailable, WireError, short_peer
from fflnode.p2p import bulk
from fflnode.p2p.membership import Membership, decode_announcement
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


class StateFederation:
    """One node's states on the network: serve them, pull its peers', hear the topic."""

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
        self._book_changed = trio.Event()
        self._heard = trio.Event()

    # ------------------------------------------------------------------ lifetime
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve and listen until cancelled (start it in the node's nursery with
        `nursery.start`)."""
        subscription = await self.pubsub.subscribe(self.topic)
        self.host.set_stream_handler(STATE_PROTOCOL, self.handle)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive, subscription)
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
