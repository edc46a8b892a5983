"""Framed messages and bulk bodies over libp2p streams, each under a deadline.

Rules (DESIGN.md, measured py-libp2p 0.8.1 behaviour):
* Every operation runs under `trio.fail_after`, sized as bytes / MIN_RATE + slack.
* A cancelled read may lose buffered bytes, so a stream whose read was cancelled or
  failed is reset, never resumed. `Exchange` callers open a fresh stream per request.
* Bodies are written in BULK_WRITE_BYTES pieces (>= 1 MiB amortises per-call overhead)
  and read into a buffer preallocated from the validated header.
* A clean EOF before `nbytes` is a truncation, never success.
* A body's blake2b guards against corruption in transit, not forgery. On a stream whose
  own encryption authenticates every byte in order and tells a truncation from an end
  (a fast-path TLS 1.3 channel, `authenticated_integrity`), it proves nothing more: the
  sender writes NO_DIGEST and the receiver checks everything but the digest. blake2b of
  both ends' bytes was a quarter of a merging node's CPU here (py-spy, 4 nodes, 64 MiB).
  Over libp2p streams, digests are always computed and checked (NO_DIGEST fails there).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import Any

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

# The blake2b field of a bulk header sent where the channel authenticates the body.
NO_DIGEST = bytes(wire.DIGEST_BYTES)

# Errors that mean "this peer/stream is gone", as opposed to "this peer lied".
STREAM_ERRORS = (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def deadline_s(nbytes: int, wait_s: float = 0.0) -> float:
    """Seconds allowed to move `nbytes`, after waiting up to `wait_s` for the peer."""
    return RPC_SLACK_S + wait_s + nbytes / MIN_RATE_BYTES_PER_S


def authenticated_integrity(stream: INetStream) -> bool:
    """Whether the stream's transport authenticates its bytes end to end (module doc)."""
    return bool(getattr(stream, "authenticated_integrity", False))


def peer_of(stream: INetStream) -> str:
    """The authenticated peer of a libp2p stream, or of a fast-path channel's stream
    (fflnode.p2p.fastpath.ChannelStream, which keeps it base58-encoded: str(ID) encodes
    anew at every call, and this is called for every message)."""
    name = getattr(stream, "peer_name", None)  # a ChannelStream's, encoded once
    return name if name is not None else str(stream.muxed_conn.peer_id)


async def read_exactly(stream: INetStream, n: int, into: memoryview | None = None) -> memoryview:
    """Read exactly n bytes (into `into` when given); EOF first is a truncation.

    Without `into` the buffer grows with what arrives: a peer that claims n bytes and
    sends few costs what it sent, not n (a caller's `into` is sized from a validated
    header, and allocated by that caller).
    """
    if into is not None and len(into) != n:
        raise ValueError(f"buffer of {len(into)} bytes for a {n}-byte read")
    read_into = getattr(stream, "read_into", None)
    if into is not None and read_into is not None:  # a fast-path channel decrypts into it
        got = 0
        while got < n:
            k = await read_into(into[got:])
            if not k:
                raise WireError(
                    peer_of(stream), "truncated", f"stream ended after {got} of {n} bytes"
                )
            got += k
        return into
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
    if authenticated_integrity(stream):
        header, views = _header_without_digest(
            run=run, round=round, what=what, index=index, codec=codec, parts=parts, meta=meta
        )
    else:
        header, views = wire.bulk_header(
            run=run, round=round, what=what, index=index, codec=codec, parts=parts, meta=meta
        )
    await stream.write(header)
    sent = len(header)
    copy = not authenticated_integrity(stream)  # a fast channel encrypts from the view
    for view in views:
        for pos in range(0, len(view), BULK_WRITE_BYTES):
            piece = view[pos : pos + BULK_WRITE_BYTES]
            await stream.write(piece.tobytes() if copy else piece)
            sent += len(piece)
    return sent


def _header_without_digest(
    *,
    run: str,
    round: int,
    what: str,
    index: int,
    codec: str,
    parts: Sequence[tuple[str, np.ndarray]],
    meta: dict[str, float | int] | None,
) -> tuple[bytes, list[memoryview]]:
    """wire.bulk_header with NO_DIGEST in place of the blake2b of the body."""
    views, specs = [], []
    for name, arr in parts:
        arr = np.ascontiguousarray(arr)
        specs.append([name, wire.dtype_name(arr.dtype), list(arr.shape)])
        views.append(memoryview(arr.reshape(-1).view(np.uint8)))
    header = wire.encode(
        "bulk",
        run=run,
        round=round,
        what=what,
        index=index,
        codec=codec,
        parts=specs,
        meta=dict(meta or {}),
        nbytes=sum(len(v) for v in views),
        blake2b=NO_DIGEST,
    )
    return wire.frame(header), views


def _arrays_of(h: wire.BulkHeader, body: memoryview, peer: str) -> dict[str, np.ndarray]:
    """wire.check_body but for the digest, which the channel made redundant (module doc):
    the length, then each part's dtype, shape and finiteness."""
    if len(body) != h.nbytes:
        raise WireError(peer, "truncated", f"body has {len(body)} of {h.nbytes} bytes")
    out, pos = {}, 0
    for part in h.parts:
        arr = np.frombuffer(
            body, dtype=wire.DTYPES[part.dtype], count=int(np.prod(part.shape)), offset=pos
        ).reshape(part.shape)
        if part.dtype in wire.FLOAT_DTYPES and not np.isfinite(arr).all():
            raise WireError(
                peer,
                "nonfinite",
                f"{h.what} chunk {h.index} part {shown(part.name)} holds NaN or Inf",
            )
        out[part.name] = arr
        pos += part.nbytes
    return out


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
    if authenticated_integrity(stream):  # no digest to compute: finiteness (~0.1 ms/MiB)
        return _arrays_of(header, memoryview(body), peer)
    return await trio.to_thread.run_sync(wire.check_body, header, memoryview(body), peer)


async def serve_one(
    stream: INetStream,
    *,
    expect: set[str],
    run: str,
    timeout_s: float,
    traffic: Any,
    where: str,
    answer: Callable[[wire.Message], Awaitable[None]],
) -> None:
    """One request, one answer (a ping, a merge hash): read one `expect` message within
    `timeout_s`, let `answer` reply on the stream, then close it; reset it on any
    failure. Never raises on what the peer sent: a malformed request is counted against
    it (`traffic`, a bulk.Traffic, at `where`), an unexpected exception too; a truncated
    or late one is load (the requester gave up on a slow node), not an offence."""
    ok = False
    try:
        with trio.fail_after(timeout_s):
            msg = await recv_message(stream, expect=expect, run=run)
            await answer(msg)
            ok = True
    except WireError as e:
        if e.reason != "truncated":
            traffic.reject_error(e, where)
    except (trio.TooSlowError, *STREAM_ERRORS):
        pass
    except Exception as e:  # nothing a peer sends may take the node down (issue 10)
        traffic.reject_unexpected(peer_of(stream), where, e)
    finally:
        await (close_quietly(stream) if ok else reset_quietly(stream))


async def reset_quietly(stream: INetStream) -> None:
    """Reset a stream whose state is unknown (after a failure or cancellation)."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0), suppress(STREAM_ERRORS):
        await stream.reset()


async def close_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0), suppress(STREAM_ERRORS):
        await stream.close()
