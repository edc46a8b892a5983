"""Bulk request/response: `get` a piece, receive a verified `bulk` body, `ack` it.

Theory of operation. The receiver drives: it opens one stream per (peer, purpose), writes
up to `window` `get` requests ahead, and reads the answers in order (a stream is FIFO),
acknowledging each verified body. It never asks for more than it has room for, so it
never stops reading mid-body: py-libp2p resets a stream whose sender waits 5 s for window
credit (DESIGN.md). The server answers each request in order from a `resolve` callback,
which may wait (e.g. for a round to be ready) and may refuse with `Unavailable`, which
goes back as an `error` message instead of a body. Any protocol violation resets the
stream; nothing is ever resumed after a failed or cancelled read.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from fflnode import wire
from fflnode.errors import (
    FflError,
    PeerUnavailable,
    WireError,
    bounded,
    error_kind,
    short_peer,
    shown,
)
from fflnode.p2p import streams
from fflnode.p2p.peerlog import PeerLog

log = logging.getLogger(__name__)

# How long a server waits for the next request on an open stream before closing it: a
# client pulls its pieces back to back, so a minute of silence means it is gone.
SERVE_IDLE_TIMEOUT_S = 60.0
# Pieces requested ahead on one stream: 2 keeps the pipe full (one in flight while one
# is consumed) with at most 2 pieces buffered per stream.
DEFAULT_WINDOW = 2


class Unavailable(FflError):
    """A request this server cannot serve (yet, or any more); sent back as `error`."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


@dataclass(frozen=True)
class Request:
    round: int
    what: str
    index: int
    lo: int = 0
    hi: int = 0
    codec: str = "none"


@dataclass
class Traffic:
    """Bytes moved per protocol and rejected messages per reason (for report and metrics),
    and the one place a rejection is counted against its sender and logged."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    # Told (peer, reason) of each rejection whose sender is known: the access gate's
    # per-peer counter (fflnode.p2p.gate.Gate.offence). None: nobody counts per peer.
    on_reject: Callable[[str, str], None] | None = None
    # Lines about peers, rate-limited per peer (fflnode.p2p.peerlog).
    peer_log: PeerLog = field(default_factory=lambda: PeerLog(log))

    def add_sent(self, protocol: str, n: int) -> None:
        self.sent[protocol] = self.sent.get(protocol, 0) + n

    def add_received(self, protocol: str, n: int) -> None:
        self.received[protocol] = self.received.get(protocol, 0) + n

    def reject(self, reason: str, peer: str = "", detail: str = "") -> None:
        """Count a rejected input, against `peer` when it is known, and log it (at most
        one line per peer per peerlog.WINDOW_S)."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if peer and self.on_reject is not None:
            self.on_reject(peer, reason)
        if detail:
            self.peer_log.log(peer or "?", reason, f"rejected {detail}")

    def reject_error(self, error: WireError, where: str) -> None:
        self.reject(error.reason, error.peer, f"{where}: {error.reason}: {error.detail}")

    def reject_unexpected(self, peer: str, where: str, error: BaseException) -> None:
        """An exception no validator anticipated, raised while handling `peer`'s input:
        contained, counted as an offence ("unexpected") and logged (bounded)."""
        self.reject(
            "unexpected",
            peer,
            f"{where}: handling this peer's input raised {error_kind(error)}",
        )

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.received.values())


class Gauge:
    """Bytes a node holds in named buffers now, and the most it held at once: the
    merge's aggregation memory, measured where the buffers are taken and given back."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def hold(self, nbytes: int) -> None:
        self.now += nbytes
        self.peak = max(self.peak, self.now)

    def release(self, nbytes: int) -> None:
        self.now -= nbytes


Resolved = tuple[str, Sequence[tuple[str, np.ndarray]], dict[str, float | int]]
Resolver = Callable[[str, wire.Message], Awaitable[Resolved]]
OnPiece = Callable[[Request, wire.BulkHeader, dict[str, np.ndarray]], Awaitable[None] | None]


async def pull(
    host: IHost,
    peer: ID,
    protocol: str,
    run: str,
    requests: Sequence[Request],
    on_piece: OnPiece,
    traffic: Traffic,
    *,
    window: int = DEFAULT_WINDOW,
    wait_s: float = 0.0,
    expected_bytes: int = 0,
) -> None:
    """Fetch `requests` from `peer` over one stream, `window` ahead, calling `on_piece`
    for each verified answer in request order. Raises PeerUnavailable or WireError.

    `wait_s` is how long the peer may legitimately take before its first answer (e.g.
    until it finishes a round); `expected_bytes` sizes the transfer deadline.
    """
    if not requests:
        return
    deadline = streams.deadline_s(max(expected_bytes, 1), wait_s)
    stream: INetStream | None = None
    ok = in_body = False
    try:
        with trio.fail_after(deadline):
            stream = await host.new_stream(peer, [protocol])
            sent = 0
            for req in requests[:window]:
                await _send_get(stream, run, req)
                sent += 1
            for req in requests:
                header = await streams.recv_bulk_header(
                    stream,
                    run=run,
                    round=req.round,
                    what=req.what,
                    index=req.index,
                    codec=req.codec,
                )
                in_body = True
                arrays = await streams.recv_bulk_body(stream, header)
                in_body = False
                traffic.add_received(protocol, header.nbytes + wire.LENGTH_PREFIX.size)
                await streams.send_message(stream, "ack", ok=True)
                if sent < len(requests):
                    await _send_get(stream, run, requests[sent])
                    sent += 1
                await _deliver(on_piece, req, header, arrays, peer, protocol)
            ok = True
    except trio.TooSlowError:
        raise _timed_out(peer, protocol, deadline, _Progress(in_body), traffic) from None
    except WireError as e:
        traffic.reject(e.reason, e.peer)
        raise
    except streams.STREAM_ERRORS as e:
        raise _gone(peer, protocol, e) from None
    finally:
        if stream is not None:
            await (streams.close_quietly(stream) if ok else streams.reset_quietly(stream))


OpenStream = Callable[[], Awaitable[INetStream]]


class Link:
    """Requests to one peer, submitted over time, pipelined on one stream; each verified
    answer goes to `on_piece` in request order.

    `submit` queues a request, `finish` says no more will come, and `run` (one attempt)
    opens a stream with `open_stream`, sends queued requests while fewer than `depth` are
    unanswered, reads the answers as they come, and returns once every request of a
    finished link is answered. A sender task writes requests while this task reads
    answers, so the peer always has the next requests in hand. `on_piece` may wait (the
    merge holds a piece until it is that member's turn): the link reads nothing more
    meanwhile, so a link holds one answer at a time and the peer waits in TCP's flow
    control, whatever `depth` is.

    Errors are those of `pull` (PeerUnavailable, WireError counted in `traffic`), and
    any FflError of `on_piece`. A failed attempt resets its stream; calling `run` again
    re-sends, on a fresh stream, the requests that were not answered (requests are
    idempotent reads). `expected_bytes` and `wait_s` size each attempt's deadline as in
    `pull`.
    """

    def __init__(
        self,
        peer: ID,
        protocol: str,
        run: str,
        traffic: Traffic,
        open_stream: OpenStream,
        *,
        expected_bytes: int,
        wait_s: float = 0.0,
        depth: int = DEFAULT_WINDOW,
        gauge: Gauge | None = None,
    ) -> None:
        self.peer = peer
        self.gauge = gauge  # counts each answer's body from its header until delivered
        self.depth = depth  # requests sent and not answered, at most
        self.protocol = protocol
        self.run_id = run
        self.traffic = traffic
        self.open_stream = open_stream
        self.expected_bytes = expected_bytes
        self.wait_s = wait_s
        self._queued, self._source = trio.open_memory_channel[Request](math.inf)
        self.unanswered: deque[Request] = deque()  # taken from the queue, not answered
        self._room = trio.lowlevel.ParkingLot()  # the sender waits here for depth

    def submit(self, req: Request) -> None:
        self._queued.send_nowait(req)

    def finish(self) -> None:
        """No more requests: `run` returns once the submitted ones are answered."""
        self._queued.close()

    async def run(self, on_piece: OnPiece) -> None:
        """One attempt (see the class)."""
        peer = self.peer
        deadline = streams.deadline_s(max(self.expected_bytes, 1), self.wait_s)
        stream: INetStream | None = None
        ok = False
        progress = _Progress()
        try:
            with trio.fail_after(deadline):
                stream = await self.open_stream()
                lock = trio.Lock()  # the sender's gets and the reader's acks
                sent_in, sent_out = trio.open_memory_channel[Request](math.inf)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._send_all, stream, lock, sent_in)
                        async for req in sent_out:
                            await self._answer(stream, lock, req, on_piece, progress)
                except BaseExceptionGroup as group:
                    raise first_error(group) from None
            ok = True
        except trio.TooSlowError:
            raise _timed_out(peer, self.protocol, deadline, progress, self.traffic) from None
        except WireError as e:
            self.traffic.reject(e.reason, e.peer)
            raise
        except streams.STREAM_ERRORS as e:
            raise _gone(peer, self.protocol, e) from None
        finally:
            if stream is not None:
                await (streams.close_quietly(stream) if ok else streams.reset_quietly(stream))

    async def _send_all(
        self, stream: INetStream, lock: trio.Lock, sent: trio.MemorySendChannel[Request]
    ) -> None:
        async with sent:
            for req in list(self.unanswered):  # a retry: what the last attempt left
                async with lock:
                    await _send_get(stream, self.run_id, req)
                sent.send_nowait(req)
            async for req in self._source:
                while len(self.unanswered) >= self.depth:
                    await self._room.park()
                self.unanswered.append(req)  # before sending: a failed send retries it
                async with lock:
                    await _send_get(stream, self.run_id, req)
                sent.send_nowait(req)

    async def _answer(
        self,
        stream: INetStream,
        lock: trio.Lock,
        req: Request,
        on_piece: OnPiece,
        progress: _Progress,
    ) -> None:
        header = await streams.recv_bulk_header(
            stream, run=self.run_id, round=req.round, what=req.what, index=req.index,
            codec=req.codec,
        )  # fmt: skip
        progress.in_body = True
        if self.gauge is not None:
            self.gauge.hold(header.nbytes)
        try:
            arrays = await streams.recv_bulk_body(stream, header)
            progress.in_body = False
            self.traffic.add_received(self.protocol, header.nbytes + wire.LENGTH_PREFIX.size)
            async with lock:
                await streams.send_message(stream, "ack", ok=True)
            await _deliver(on_piece, req, header, arrays, self.peer, self.protocol)
        finally:
            if self.gauge is not None:
                self.gauge.release(header.nbytes)
        if self.unanswered and self.unanswered[0] is req:  # after: a retry asks again
            self.unanswered.popleft()
            self._room.unpark()


@dataclass
class _Progress:
    in_body: bool = False  # a body began and has not finished


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error that ended a nursery's tasks: the first leaf that is not a cancellation
    (the others were cancelled because of it), else the first cancellation."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    return next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])


def _timed_out(
    peer: ID, protocol: str, deadline: float, progress: _Progress, traffic: Traffic
) -> FflError:
    if progress.in_body:  # it began a body and did not finish it: a staller, not slow
        stalled = WireError(str(peer), "stalled", f"{protocol}: a body began, then stopped")
        traffic.reject(stalled.reason, stalled.peer)
        return stalled
    return PeerUnavailable(
        f"{short_peer(str(peer))}: {protocol} did not complete within {deadline:.0f} s"
    )


def _gone(peer: ID, protocol: str, e: BaseException) -> PeerUnavailable:
    return PeerUnavailable(
        f"{short_peer(str(peer))}: {protocol} failed: {type(e).__name__} {bounded(str(e), 120)}"
    )


async def _deliver(
    on_piece: OnPiece,
    req: Request,
    header: wire.BulkHeader,
    arrays: dict[str, np.ndarray],
    peer: ID,
    protocol: str,
) -> None:
    try:
        result = on_piece(req, header, arrays)
        if result is not None:
            await result
    except (FflError, trio.Cancelled):
        raise
    except Exception as e:  # what a consumer did not anticipate in peer data
        raise WireError(str(peer), "unexpected", f"{protocol} piece: {type(e).__name__}") from e


async def _send_get(stream: INetStream, run: str, req: Request) -> None:
    await streams.send_message(
        stream,
        "get",
        run=run,
        round=req.round,
        what=req.what,
        index=req.index,
        lo=req.lo,
        hi=req.hi,
        codec=req.codec,
    )


async def serve(
    stream: INetStream, protocol: str, run: str, resolve: Resolver, traffic: Traffic
) -> None:
    """Answer `get` requests on one stream until the client closes it."""
    peer = streams.peer_of(stream)
    ok = False
    try:
        while True:
            msg = None
            with trio.move_on_after(SERVE_IDLE_TIMEOUT_S) as idle:
                msg = await streams.recv_message_or_eof(stream, expect={"get", "ack"}, run=run)
            if idle.cancelled_caught:
                log.debug("closing idle %s stream from %s", protocol, short_peer(peer))
                return
            if msg is None:
                ok = True  # clean close between messages: the client is done
                return
            if msg.kind == "ack":
                if not msg["ok"]:  # fflnode never sends one (it resets): a peer playing
                    traffic.reject(
                        "ack-refused",
                        peer,
                        f"{protocol}: an ack refusing our body: {shown(msg.get('reason'))}",
                    )
                continue
            try:
                codec, parts, meta = await resolve(peer, msg)
            except Unavailable as u:
                await streams.send_message(stream, "error", code=u.code, reason=u.reason)
                continue
            nbytes = sum(int(a.nbytes) for _, a in parts)
            with trio.fail_after(streams.deadline_s(nbytes)):
                sent = await streams.send_bulk(
                    stream,
                    run=run,
                    round=msg["round"],
                    what=msg["what"],
                    index=msg["index"],
                    codec=codec,
                    parts=parts,
                    meta=meta,
                )
            traffic.add_sent(protocol, sent)
    except WireError as e:
        traffic.reject_error(e, f"{protocol} request")
    except trio.TooSlowError:
        traffic.reject("stalled", peer, f"{protocol}: the peer did not take our body in time")
    except streams.STREAM_ERRORS as e:
        log.debug("%s stream from %s ended: %s", protocol, short_peer(peer), type(e).__name__)
    except Exception as e:  # nothing a peer sends may take the node down (issue 10)
        traffic.reject_unexpected(peer, protocol, e)
    finally:
        await (streams.close_quietly(stream) if ok else streams.reset_quietly(stream))
