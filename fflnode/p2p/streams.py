"""Framed messages and bulk bodies over libp2p streams, each under a deadline.

Rules (DESIGN.md, measured py-libp2p 0.8.1 behaviour):
* Every operation runs under `trio.fail_after`, sized as bytes / MIN_RATE + slack.
* A cancelled read may lose buffered bytes, so a stream whose read was cancelled or
  failed is reset, never resumed. `Exchange` callers open a fresh stream per request.
* Bodies are written in BULK_WRITE_BYTES pieces (>= 1 MiB amortises per-call overhead)
  and read into a buffer preallocated from the validated header.
* A clean EOF before `nbytes` is a truncation, never success.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import suppress

import numpy as np
import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError

from fflnode import wire
from fflnode.errors import PeerUnavailable, WireError, short_peer, shown

log = logging.getLogger(__name__)

# Slowest transfer rate we accept before calling a peer stalled: 250-400 MB/s is what
# Noise+yamux does here; 4 MB/s leaves room for 2 cores shared by 8 busy nodes.
MIN_RATE_BYTES_PER_S = 4 << 20
# Fixed part of every deadline: dial + Noise handshake + multistream negotiation on a
# loaded machine took up to ~2 s in testnets; 15 s leaves margin without hiding a hang.
RPC_SLACK_S = 15.0
BULK_WRITE_BYTES = 1 << 20
READ_PIECE_BYTES = 1 << 20
# A control message that has begun must finish within this: it is at most 256 KiB
# (wire.MAX_MESSAGE_BYTES), which a loaded 2-core machine delivered in well under a
# second in every testnet. A peer that starts one and stops ("slowloris") is an offender.
MESSAGE_STALL_S = 10.0

# Errors that mean "this peer/stream is gone", as opposed to "this peer lied".
STREAM_ERRORS = (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def deadline_s(nbytes: int, wait_s: float = 0.0) -> float:
    """Seconds allowed to move `nbytes`, after waiting up to `wait_s` for the peer."""
    return RPC_SLACK_S + wait_s + nbytes / MIN_RATE_BYTES_PER_S


def peer_of(stream: INetStream) -> str:
    return str(stream.muxed_conn.peer_id)


async def read_exactly(stream: INetStream, n: int, into: memoryview | None = None) -> memoryview:
    """Read exactly n bytes (into `into` when given); EOF first is a truncation.

    Without `into` the buffer grows with what arrives: a peer that claims n bytes and
    sends few costs what it sent, not n (a caller's `into` is sized from a validated
    header, and allocated by that caller).
    """
    if into is not None and len(into) != n:
        raise ValueError(f"buffer of {len(into)} bytes for a {n}-byte read")
    grown = bytearray()
    got = 0
    while got < n:
        try:
            piece = await stream.read(min(n - got, READ_PIECE_BYTES))
        except EOFError:
            piece = b""
        if not piece:
            raise WireError(peer_of(stream), "truncated", f"stream ended after {got} of {n} bytes")
        if len(piece) > n - got:  # a stream read never returns more than asked; be sure
            raise WireError(peer_of(stream), "length", "read returned more than requested")
        if into is None:
            grown += piece
        else:
            into[got : got + len(piece)] = piece
        got += len(piece)
    return into if into is not None else memoryview(grown)


async def send_message(stream: INetStream, kind: str, **fields: object) -> None:
    await stream.write(wire.frame(wire.encode(kind, **fields)))


async def recv_message(
    stream: INetStream, *, expect: set[str], run: str | None = None
) -> wire.Message:
    msg = await recv_message_or_eof(stream, expect=expect, run=run)
    if msg is None:
        raise WireError(peer_of(stream), "truncated", f"stream ended before a {sorted(expect)}")
    return msg


async def recv_message_or_eof(
    stream: INetStream, *, expect: set[str], run: str | None = None
) -> wire.Message | None:
    """The next message, or None when the peer closed the stream between messages."""
    peer = peer_of(stream)
    try:
        first = await stream.read(wire.LENGTH_PREFIX.size)
    except EOFError:
        return None
    if not first:
        return None
    prefix = bytes(first)
    try:
        with trio.fail_after(MESSAGE_STALL_S):
            if len(prefix) < wire.LENGTH_PREFIX.size:
                rest = await read_exactly(stream, wire.LENGTH_PREFIX.size - len(prefix))
                prefix += bytes(rest)
            n = wire.decode_length(prefix, peer)
            data = bytes(await read_exactly(stream, n))
    except trio.TooSlowError:
        raise WireError(
            peer, "stalled", f"a message began but did not finish within {MESSAGE_STALL_S:.0f} s"
        ) from None
    return wire.decode(data, peer, expect=expect, run=run)


async def send_bulk(
    stream: INetStream,
    *,
    run: str,
    round: int,
    what: str,
    index: int,
    codec: str,
    parts: Sequence[tuple[str, np.ndarray]],
    meta: dict[str, float | int] | None = None,
) -> int:
    """Send a bulk header and body; returns the bytes written (header included)."""
    header, views = wire.bulk_header(
        run=run, round=round, what=what, index=index, codec=codec, parts=parts, meta=meta
    )
    await stream.write(header)
    sent = len(header)
    for view in views:
        for pos in range(0, len(view), BULK_WRITE_BYTES):
            piece = view[pos : pos + BULK_WRITE_BYTES]
            await stream.write(piece.tobytes())
            sent += len(piece)
    return sent


async def recv_bulk_header(
    stream: INetStream, *, run: str, round: int, what: str, index: int, codec: str
) -> wire.BulkHeader:
    """The header of one bulk answer to a request, checked against the request.

    An `error` message in place of the header becomes PeerUnavailable (the peer is fine
    but cannot serve this yet, e.g. a round it no longer holds).
    """
    peer = peer_of(stream)
    msg = await recv_message(stream, expect={"bulk", "error"}, run=run)
    if msg.kind == "error":
        raise PeerUnavailable(f"{short_peer(peer)}: {shown(msg['code'])}: {shown(msg['reason'])}")
    header = wire.as_bulk_header(msg)
    wire.check_bulk_context(header, peer, round=round, what=what, index=index, codec=codec)
    return header


async def recv_bulk_body(stream: INetStream, header: wire.BulkHeader) -> dict[str, np.ndarray]:
    """The verified arrays of the body announced by `header`: it must arrive at line rate
    (deadline_s of its size) once the header came, or the sender stalled ("stalled")."""
    peer = peer_of(stream)
    body = np.empty(header.nbytes, dtype=np.uint8)
    allowed = deadline_s(header.nbytes)
    try:
        with trio.fail_after(allowed):
            await read_exactly(stream, header.nbytes, memoryview(body))
    except trio.TooSlowError:
        raise WireError(
            peer, "stalled", f"{header.nbytes}-byte body not complete within {allowed:.0f} s"
        ) from None
    return await trio.to_thread.run_sync(wire.check_body, header, memoryview(body), peer)


async def reset_quietly(stream: INetStream) -> None:
    """Reset a stream whose state is unknown (after a failure or cancellation)."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0), suppress(STREAM_ERRORS):
        await stream.reset()


async def close_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0), suppress(STREAM_ERRORS):
        await stream.close()
