"""The bulk fast path: an authenticated TLS 1.3 channel beside libp2p, offered over libp2p.

Why: one py-libp2p stream (Noise + yamux in Python) moved 208 MB/s here with fflnode's
tuning, its receiving end CPU-bound in the library's per-frame Python; 256 MiB over this
path moved at 586 MB/s and cost both ends 0.41 CPU seconds instead of 1.18
(tools/bench_bulk.py, 7 interleaved repeats in one run, load average ~5 on 2 cores).

Theory of operation (client C opens a channel to server S; both run a FastPath):
1. C opens a libp2p stream to S on OFFER_PROTOCOL (Noise has authenticated both peer
   IDs), sends its libp2p-TLS certificate (fflnode.p2p.libp2p_tls) and half-closes.
2. S checks that the certificate proves C's peer ID (the one Noise authenticated) and
   answers with an offer: its fast-path TCP port, a one-time 32-byte token, and its own
   certificate; or a refusal ("busy"), after which C falls back.
3. C checks that S's certificate proves S's peer ID, connects to the port on the IP of
   its libp2p connection to S, and runs TLS 1.3 with ALPN "libp2p", each side pinning
   the certificate the other sent in steps 1-2 as its only trust anchor.
4. Inside TLS, C sends the token. S accepts only a live token issued to the peer whose
   certificate this TLS connection presented, consumes it (one use), and answers ACCEPT.
5. Both sides now hold a TlsStream bound to the peer ID Noise authenticated; S gives it
   to the `handler`, C returns it from `open`.
If S does not speak OFFER_PROTOCOL, refuses, or the TCP/TLS setup fails or times out,
`open` falls back to an ordinary libp2p stream on `protocol` (S serves it with the same
handler), so an adopter writes one handler and gets the fast path where both ends have it.

Promises:
* No home-made cryptography: TLS is OpenSSL's (Python's ssl), certificates are the
  libp2p TLS spec's, made and checked with `cryptography`.
* A peer whose certificate does not prove the peer ID it holds is refused: `open` raises
  FastPathError(peer, "certificate"); the server answers "refused: certificate", counts
  it (`stats.refused`, `on_reject`) and never issues it a token.
* Every byte from a peer is hostile: offers and requests are size-capped before parsing,
  every read has a deadline, the listener bounds concurrent handshakes, and no exception
  from peer input leaves a handler (each is counted, and logged through a PeerLog: one
  line per peer, or per source IP before TLS has named a peer, per window).
Must never: give a channel to a peer other than the one that was offered it; reuse a
token; fall back silently after a peer proved dishonest.
Control traffic stays on standard libp2p; only bulk bytes take this path.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from fflnode.errors import FflError, error_kind, short_peer
from fflnode.p2p import libp2p_tls, streams
from fflnode.p2p.peerlog import PeerLog
from fflnode.p2p.tlsstream import TlsStream

log = logging.getLogger(__name__)

OFFER_PROTOCOL = "/fflnode/fastpath/1.0.0"
# The libp2p protocol a channel falls back to; servers serve it with the same handler.
FALLBACK_PROTOCOL = "/fflnode/fastpath-fallback/1.0.0"

# Asking for an offer is one round trip on a libp2p connection, plus a dial when there is
# none (~252 ms measured, up to ~2 s on a loaded machine): the libp2p RPC slack.
OFFER_TIMEOUT_S = streams.RPC_SLACK_S
# TCP connect + TLS 1.3 handshake + token round trip on the client. A whole open (offer
# included) took 22 ms median on 127.0.0.1 under load (tools/bench_bulk.py); 5 s covers
# a slow network without holding up the fallback long.
CONNECT_TIMEOUT_S = 5.0
# A TCP connection to the listener must finish TLS and send its token within this: a
# client that connects and stalls holds a handshake slot at most this long.
HANDSHAKE_TIMEOUT_S = 5.0
# A token is good for this long after the offer: the client connects right away (ms);
# 10 s covers a loaded machine and keeps few offers live.
OFFER_TTL_S = 10.0
# Live offers at once, all peers / one peer: a peer opens a handful of channels at a
# time; more pile up only if someone asks for offers it never uses. Past either, "busy".
MAX_PENDING_OFFERS = 64
MAX_PENDING_PER_PEER = 4
# TLS handshakes in progress on the listener; more TCP connections are closed at once.
MAX_CONCURRENT_HANDSHAKES = 16
# After the fast path to a peer failed to set up (port unreachable, TLS failed), go
# straight to libp2p for this long: a firewalled port would otherwise cost every open
# CONNECT_TIMEOUT_S. A refusal ("busy") is not remembered: it passes in seconds.
RETRY_FAST_AFTER_S = 60.0
MAX_REMEMBERED_FAILURES = 4096  # peers; past this the memory starts over
TOKEN_BYTES = 32  # 256 random bits: unguessable, single use
ACCEPT = b"\x01"

# Offer protocol messages (sans-IO, below): each side writes one message and half-closes;
# the other reads to EOF, at most the message's cap. Request: MAGIC, u16 n, n bytes of DER
# certificate. Reply: MAGIC, status; OFFER: u16 port, token, u16 n, certificate; REFUSED:
# u8 n, n bytes of ASCII reason.
MAGIC = b"FFP1"
STATUS_OFFER, STATUS_REFUSED = 0, 1
U16 = struct.Struct(">H")
MAX_REASON_BYTES = 64
MAX_REQUEST_BYTES = len(MAGIC) + U16.size + libp2p_tls.MAX_CERTIFICATE_BYTES
MAX_REPLY_BYTES = (
    len(MAGIC) + 1 + U16.size + TOKEN_BYTES + U16.size + (libp2p_tls.MAX_CERTIFICATE_BYTES)
)


class FastPathError(FflError):
    """A peer that failed the fast path's checks: `reason` is a stable slug (metrics label),
    the message names the peer and what was wrong."""

    def __init__(self, peer: str, reason: str, detail: str) -> None:
        self.peer = peer
        self.reason = reason
        self.detail = detail
        super().__init__(f"fast path to {short_peer(peer)}: {reason}: {detail}")


# -- the offer protocol: a pure codec, then one bounded read ----------------------------


@dataclass(frozen=True)
class Offer:
    port: int
    token: bytes
    cert: bytes


def encode_request(cert: bytes) -> bytes:
    return MAGIC + U16.pack(len(cert)) + cert


def encode_offer(offer: Offer) -> bytes:
    return (
        MAGIC
        + bytes([STATUS_OFFER])
        + U16.pack(offer.port)
        + offer.token
        + U16.pack(len(offer.cert))
        + offer.cert
    )


def encode_refusal(reason: str) -> bytes:
    raw = reason.encode("ascii", "replace")[:MAX_REASON_BYTES]
    return MAGIC + bytes([STATUS_REFUSED, len(raw)]) + raw


def decode_request(data: bytes, peer: str) -> bytes:
    """The certificate a client sent; FastPathError on anything else."""
    return _certificate(_after_magic(data, peer, "request"), peer)


def decode_reply(data: bytes, peer: str) -> Offer | str:
    """An Offer, or the reason the server refused; FastPathError on anything else."""
    body = _after_magic(data, peer, "reply")
    if not body:
        raise FastPathError(peer, "schema", "reply has no status")
    status, body = body[0], body[1:]
    if status == STATUS_REFUSED:
        if not body or body[0] != len(body) - 1 or body[0] > MAX_REASON_BYTES:
            raise FastPathError(peer, "schema", "malformed refusal")
        text = body[1:].decode("ascii", "replace")
        return "".join(c if c.isprintable() else "?" for c in text)
    if status != STATUS_OFFER:
        raise FastPathError(peer, "schema", f"unknown reply status {status}")
    if len(body) < U16.size + TOKEN_BYTES:
        raise FastPathError(peer, "schema", "offer too short")
    (port,) = U16.unpack_from(body)
    if port == 0:
        raise FastPathError(peer, "schema", "offer names port 0")
    token = body[U16.size : U16.size + TOKEN_BYTES]
    return Offer(port, token, _certificate(body[U16.size + TOKEN_BYTES :], peer))


def _after_magic(data: bytes, peer: str, what: str) -> bytes:
    if data[: len(MAGIC)] != MAGIC:
        raise FastPathError(peer, "schema", f"{what} does not start with the fast-path magic")
    return data[len(MAGIC) :]


def _certificate(data: bytes, peer: str) -> bytes:
    """A u16-length-prefixed certificate that is exactly the rest of `data`."""
    if len(data) < U16.size:
        raise FastPathError(peer, "schema", "certificate length missing")
    (n,) = U16.unpack_from(data)
    if not 0 < n <= libp2p_tls.MAX_CERTIFICATE_BYTES:
        raise FastPathError(peer, "oversized", f"certificate of {n} bytes")
    if len(data) - U16.size != n:
        raise FastPathError(peer, "schema", f"{len(data) - U16.size} certificate bytes, not {n}")
    return data[U16.size :]


async def read_to_eof(stream: INetStream, peer: str, limit: int) -> bytes:
    """Everything the peer writes before half-closing, refused past `limit` bytes."""
    data = bytearray()
    while True:
        try:
            piece = await stream.read(limit + 1 - len(data))
        except EOFError:
            piece = b""
        if not piece:
            return bytes(data)
        data += piece
        if len(data) > limit:
            raise FastPathError(peer, "oversized", f"message over {limit} bytes")


def check_certificate(cert: bytes, peer: ID) -> None:
    """Refuse a certificate that does not prove `peer` (the Noise-authenticated ID)."""
    try:
        proven = libp2p_tls.verify_certificate(cert)
    except libp2p_tls.CertificateError as e:
        raise FastPathError(str(peer), "certificate", str(e)) from None
    if proven != peer:
        raise FastPathError(
            str(peer), "certificate", f"certificate proves another peer ID, {proven}"
        )


# -- the fallback channel --------------------------------------------------------------


class Libp2pChannel(trio.abc.HalfCloseableStream):
    """A libp2p stream with the TlsStream surface, for peers without the fast path."""

    fast = False

    def __init__(self, stream: INetStream, peer_id: ID) -> None:
        self.stream = stream
        self.peer_id = peer_id
        self._broken = False  # a failed or cancelled operation: aclose resets

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        try:
            for pos in range(0, len(view), streams.BULK_WRITE_BYTES):
                await self.stream.write(view[pos : pos + streams.BULK_WRITE_BYTES].tobytes())
        except streams.STREAM_ERRORS as e:
            self._broken = True
            raise trio.BrokenResourceError(f"libp2p stream: {type(e).__name__} {e}") from e
        except BaseException:
            self._broken = True
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return await self.stream.read(max_bytes or streams.READ_PIECE_BYTES)
        except EOFError:
            return b""
        except streams.STREAM_ERRORS as e:
            self._broken = True
            raise trio.BrokenResourceError(f"libp2p stream: {type(e).__name__} {e}") from e
        except BaseException:  # a cancelled read may lose bytes (DESIGN.md): never resume
            self._broken = True
            raise

    async def receive_into(self, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        data = await self.receive_some(len(view)) if len(view) else b""
        view[: len(data)] = data
        return len(data)

    async def send_eof(self) -> None:
        try:
            await self.stream.close()  # libp2p's close is a half-close (yamux FIN)
        except streams.STREAM_ERRORS as e:
            raise trio.BrokenResourceError(f"libp2p stream: {type(e).__name__} {e}") from e

    async def aclose(self) -> None:
        """Close (FIN) after a clean exchange; reset after any failure or cancellation."""
        if self._broken:
            await streams.reset_quietly(self.stream)
        else:
            await streams.close_quietly(self.stream)


class FastChannel(TlsStream):
    """The fast path's TLS stream, bound to the libp2p peer ID it authenticated."""

    fast = True
    peer_id: ID


Channel = FastChannel | Libp2pChannel


class ChannelStream:
    """A fast channel with the surface fflnode.p2p.streams and bulk use on a libp2p
    stream (read, write, close = half-close, reset = abort), so the bulk protocol runs
    unchanged over either; `peer_id` (and `peer_name`, its base58) is the peer the
    channel authenticated, and
    `read_into` lets streams.read_exactly decrypt straight into a body's buffer.

    `authenticated_integrity`: TLS 1.3 authenticates every record (AEAD), in order, and
    TlsStream refuses a transport EOF without close_notify, so a body read here is the
    bytes the peer's TLS sent, whole: streams skips the redundant blake2b."""

    authenticated_integrity = True

    def __init__(self, channel: FastChannel) -> None:
        self.channel = channel
        self.peer_id = channel.peer_id
        self.peer_name = str(channel.peer_id)

    async def read(self, n: int = -1) -> bytes | bytearray:
        return await self.channel.receive_some(n if n > 0 else None)

    async def read_into(self, view: memoryview) -> int:
        return await self.channel.receive_into(view)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self.channel.send_all(data)

    async def close(self) -> None:
        await self.channel.send_eof()

    async def reset(self) -> None:
        await self.channel.aclose()


def as_stream(channel: Channel) -> INetStream | ChannelStream:
    """What fflnode.p2p.streams reads and writes for `channel`: its libp2p stream when
    it fell back, else the fast channel behind ChannelStream."""
    return channel.stream if isinstance(channel, Libp2pChannel) else ChannelStream(channel)


Handler = Callable[[ID, Channel], Awaitable[None]]
OnReject = Callable[[str, str], None]


# -- the trio shell --------------------------------------------------------------------


@dataclass
class _Pending:
    peer: ID
    cert: bytes
    token: bytes
    expires: float  # trio.current_time()


@dataclass
class Stats:
    """What the fast path did, for reports and metrics."""

    offered: int = 0  # offers issued (server)
    accepted: int = 0  # channels handed to the handler over TLS (server)
    opened: int = 0  # channels opened over TLS (client)
    fallbacks: dict[str, int] = field(default_factory=dict)  # client: why libp2p was used
    refused: dict[str, int] = field(default_factory=dict)  # server/client: refusals by reason

    def count(self, table: dict[str, int], reason: str) -> None:
        table[reason] = table.get(reason, 0) + 1


class FastPath:
    """One node's fast path: serves offers and channels, opens channels to peers.

    `handler(peer_id, channel)` receives every inbound channel, fast or fallback; it owns
    the channel until it returns (FastPath closes it then). `listen_host`: the address
    the TLS listener binds, e.g. "0.0.0.0"; clients connect to the IP their libp2p
    connection to us uses, so bind where peers reach the libp2p host. `port` 0 lets the
    kernel choose. `on_reject(peer, reason)`: told of every refused peer (the gate's
    offence counter, as Traffic.on_reject). `peer_log`: where lines about what a peer
    or an address did wrong go, rate-limited per key (the node's, shared with its other
    protocols; default: one of its own on this module's logger).
    """

    def __init__(
        self,
        host: IHost,
        key_pair: KeyPair,
        handler: Handler,
        *,
        listen_host: str,
        port: int = 0,
        protocol: str = FALLBACK_PROTOCOL,
        on_reject: OnReject | None = None,
        peer_log: PeerLog | None = None,
    ) -> None:
        self.host = host
        self.key_pair = key_pair
        self.handler = handler
        self.listen_host = listen_host
        self.port = port
        self.protocol = protocol
        self.on_reject = on_reject
        self.peer_log = peer_log or PeerLog(log)
        # Our own fallbacks (a peer busy, its port unreachable) are news about the path,
        # not offences: their own window, so they never hold back a warning about a peer.
        self.fallback_log = PeerLog(log)
        self.stats = Stats()
        self.identity: libp2p_tls.TlsIdentity | None = None
        self._chain: Path | None = None
        self._pending: list[_Pending] = []
        self._nursery: trio.Nursery | None = None
        self._failed_until: dict[ID, float] = {}  # peer -> trio time to try TLS again

    # -- lifetime --
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve offers and channels until cancelled (start it with nursery.start)."""
        self.identity = await trio.to_thread.run_sync(
            libp2p_tls.TlsIdentity.generate, self.key_pair
        )
        with self.identity.chain_file() as chain:
            listeners = await trio.open_tcp_listeners(self.port, host=self.listen_host)
            self.port = listeners[0].socket.getsockname()[1]
            try:
                async with trio.open_nursery() as nursery:
                    self._chain, self._nursery = chain, nursery
                    self.host.set_stream_handler(OFFER_PROTOCOL, self._on_offer_stream)
                    self.host.set_stream_handler(self.protocol, self._on_fallback_stream)
                    slots = trio.CapacityLimiter(MAX_CONCURRENT_HANDSHAKES)
                    for listener in listeners:
                        nursery.start_soon(self._accept_loop, listener, slots)
                    log.info("fast path listening on %s:%d", self.listen_host, self.port)
                    task_status.started()
            finally:
                self._chain, self._nursery = None, None
                for proto in (OFFER_PROTOCOL, self.protocol):
                    self.host.remove_stream_handler(proto)  # type: ignore[attr-defined]

    # -- client --
    async def open(self, peer_id: ID, *, fallback: bool = True) -> Channel:
        """A channel to `peer_id`: TLS when the peer offers it, else a libp2p stream.

        Raises FastPathError when the peer proves dishonest (a certificate that does not
        prove its peer ID, a malformed reply): that is never papered over by a fallback.
        With `fallback=False`, a setup failure is a FastPathError too. Any libp2p failure
        (peer unreachable) raises what host.new_stream raises.
        """
        if self._chain is None or self.identity is None:
            raise RuntimeError("FastPath.open before FastPath.serve has started")
        peer = str(peer_id)
        try:
            if trio.current_time() < self._failed_until.get(peer_id, -math.inf):
                raise _SetupFailed("remembered", "it failed to set up recently")
            channel = await self._open_fast(peer_id)
        except _SetupFailed as e:
            self.stats.count(self.stats.fallbacks, e.reason)
            # Remembered: failures that cost a timeout per open (an unreachable port, a
            # TLS endpoint that does not finish). Not a refusal ("busy": passes in
            # seconds) nor a failed libp2p offer stream ("no-offer": a round trip, and
            # seen transiently on fresh connections, 4 nodes on a loaded machine).
            if e.reason not in ("refused", "remembered", "no-offer"):
                if len(self._failed_until) >= MAX_REMEMBERED_FAILURES:
                    self._failed_until.clear()
                self._failed_until[peer_id] = trio.current_time() + RETRY_FAST_AFTER_S
            if not fallback:
                raise FastPathError(peer, e.reason, e.detail) from None
            text = f"fast path unavailable ({e.reason}: {e.detail}); using a libp2p stream"
            self.fallback_log.log(peer, "fastpath-fallback", text, logging.INFO)
            stream = await self.host.new_stream(peer_id, [self.protocol])
            return Libp2pChannel(stream, peer_id)
        except FastPathError as e:
            self._reject(e)
            raise
        self.stats.opened += 1
        self._failed_until.pop(peer_id, None)
        return channel

    async def _open_fast(self, peer_id: ID) -> FastChannel:
        assert self._chain is not None and self.identity is not None
        peer = str(peer_id)
        offer, address = await self._ask(peer_id)
        check_certificate(offer.cert, peer_id)
        ctx = libp2p_tls.client_context(self._chain, offer.cert)
        tcp: trio.SocketStream | None = None
        ok = False
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                try:
                    tcp = await trio.open_tcp_stream(address, offer.port)
                except OSError as e:
                    raise _SetupFailed("connect", f"{address}:{offer.port}: {e}") from None
                channel = FastChannel(tcp, ctx, server_side=False)
                try:
                    await channel.do_handshake()
                except ssl.SSLCertVerificationError as e:
                    raise FastPathError(
                        peer, "certificate", f"TLS endpoint presented another certificate ({e})"
                    ) from None
                _check_session(channel, offer.cert, peer)
                channel.peer_id = peer_id
                await channel.send_all(offer.token)
                answer = await channel.receive_exactly(len(ACCEPT))
                if answer != ACCEPT:
                    raise FastPathError(peer, "schema", "answer to the token is not ACCEPT")
            ok = True
            return channel
        except trio.TooSlowError:
            raise _SetupFailed("timeout", f"TLS setup took over {CONNECT_TIMEOUT_S:g} s") from None
        except (ssl.SSLError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            # The server refuses a token or certificate by closing: it saw a problem, we
            # did not, so this is a setup failure, not proof of a dishonest peer.
            raise _SetupFailed("tls", f"{type(e).__name__}: {e}") from None
        finally:
            if tcp is not None and not ok:
                with trio.CancelScope(shield=True):
                    await tcp.aclose()

    async def _ask(self, peer_id: ID) -> tuple[Offer, str]:
        """The peer's offer and the IP to reach it on; _SetupFailed when it has none."""
        assert self.identity is not None
        peer = str(peer_id)
        stream: INetStream | None = None
        ok = False
        try:
            with trio.fail_after(OFFER_TIMEOUT_S):
                try:
                    stream = await self.host.new_stream(peer_id, [OFFER_PROTOCOL])
                except streams.STREAM_ERRORS as e:
                    raise _SetupFailed("no-offer", f"{type(e).__name__}: {e}") from None
                address = _remote_ip(stream)
                if address is None:
                    raise _SetupFailed("address", "libp2p connection has no TCP/IP address")
                await stream.write(encode_request(self.identity.cert_der))
                await stream.close()  # half-close: the request is complete
                data = await read_to_eof(stream, peer, MAX_REPLY_BYTES)
                if not data:  # it hung up: maybe crashed, not proof of dishonesty
                    raise _SetupFailed("no-offer", "the peer closed the offer stream")
                reply = decode_reply(data, peer)
            if isinstance(reply, str):
                raise _SetupFailed("refused", reply)
            ok = True
            return reply, address
        except trio.TooSlowError:
            raise _SetupFailed("timeout", f"no offer within {OFFER_TIMEOUT_S:g} s") from None
        except streams.STREAM_ERRORS as e:
            raise _SetupFailed("no-offer", f"{type(e).__name__}: {e}") from None
        finally:
            if stream is not None:
                await (streams.close_quietly(stream) if ok else streams.reset_quietly(stream))

    # -- server: offers --
    async def _on_offer_stream(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        peer = str(peer_id)
        ok = False
        liar: FastPathError | None = None
        try:
            with trio.fail_after(OFFER_TIMEOUT_S):
                request = await read_to_eof(stream, peer, MAX_REQUEST_BYTES)
                if not request:  # it hung up before asking: a client cancelled, or a
                    # stream py-libp2p lost while negotiating; nothing to answer or count
                    log.debug("fast-path request from %s: empty", short_peer(peer))
                    return
                cert = decode_request(request, peer)
                try:
                    check_certificate(cert, peer_id)
                except FastPathError as e:
                    # Say why (an honest node with a broken identity learns it); it is
                    # counted as the offence it is below.
                    liar = e
                    await stream.write(encode_refusal("certificate"))
                else:
                    await stream.write(self._offer_for(peer_id, cert))
            ok = True
        except FastPathError as e:
            liar = e
        except trio.TooSlowError:
            log.debug("fast-path request from %s timed out", short_peer(peer))
        except streams.STREAM_ERRORS as e:
            log.debug("fast-path request from %s failed: %s", short_peer(peer), type(e).__name__)
        finally:
            await (streams.close_quietly(stream) if ok else streams.reset_quietly(stream))
        if liar is not None:
            self._reject(liar)
            self._log(peer, liar.reason, f"refused a fast-path request: {liar}")

    def _offer_for(self, peer_id: ID, cert: bytes) -> bytes:
        """An encoded offer (and its pending token) for `peer_id`, or a refusal."""
        refusal = self._refusal(peer_id)
        if refusal:
            return encode_refusal(refusal)
        assert self.identity is not None
        token = secrets.token_bytes(TOKEN_BYTES)
        self._pending.append(_Pending(peer_id, cert, token, trio.current_time() + OFFER_TTL_S))
        self.stats.offered += 1
        return encode_offer(Offer(self.port, token, self.identity.cert_der))

    def _refusal(self, peer_id: ID) -> str:
        now = trio.current_time()
        self._pending = [p for p in self._pending if p.expires > now]
        if len(self._pending) >= MAX_PENDING_OFFERS:
            return "busy"
        if sum(p.peer == peer_id for p in self._pending) >= MAX_PENDING_PER_PEER:
            return "busy"
        return ""

    # -- server: channels --
    async def _accept_loop(
        self, listener: trio.SocketListener, slots: trio.CapacityLimiter
    ) -> None:
        assert self._nursery is not None
        async with listener:
            while True:
                try:
                    tcp = await listener.accept()
                except OSError as e:  # EMFILE and friends: back off, keep serving
                    self._log("listener", "accept", f"fast-path listener: accept failed: {e}")
                    await trio.sleep(0.1)
                    continue
                try:
                    slots.acquire_on_behalf_of_nowait(tcp)
                except trio.WouldBlock:
                    self.stats.count(self.stats.refused, "flood")
                    with trio.CancelScope(shield=True):
                        await tcp.aclose()
                    continue
                self._nursery.start_soon(self._serve_connection, tcp, slots)

    async def _serve_connection(self, tcp: trio.SocketStream, slots: trio.CapacityLimiter) -> None:
        address = _address(tcp)
        channel: FastChannel | None = None
        try:
            try:
                channel = await self._authenticate(tcp, address)
            finally:
                slots.release_on_behalf_of(tcp)
            if channel is None:
                return
            self.stats.accepted += 1
            await self.handler(channel.peer_id, channel)
        except FastPathError as e:
            self._reject(e)
            self._log(e.peer, e.reason, f"refused a fast-path connection from {address}: {e}")
        except FflError as e:  # the handler's verdict on what the peer sent (WireError...)
            who = str(channel.peer_id) if channel else _ip(address)
            self._log(who, "channel", f"fast-path channel from {address}: {e}")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            peer = short_peer(str(channel.peer_id)) if channel else address
            log.debug("fast-path channel from %s ended: %s", peer, e)
        except trio.TooSlowError:
            who = str(channel.peer_id) if channel else _ip(address)
            self._log(who, "timeout", f"fast-path channel from {address} timed out")
        except Exception as e:  # a connection runs in our own nursery: nothing a peer
            # sends may end it (and the node) with an exception nobody foresaw
            who = str(channel.peer_id) if channel else _ip(address)
            self.stats.count(self.stats.refused, "unexpected-error")
            if channel is not None and self.on_reject is not None:
                self.on_reject(who, "unexpected-error")
            self._log(who, "error", f"fast-path channel from {address}: {error_kind(e)}")
        finally:
            with trio.CancelScope(shield=True):
                await tcp.aclose()

    async def _authenticate(self, tcp: trio.SocketStream, address: str) -> FastChannel | None:
        """TLS and token checks; the channel, or None (refused and counted)."""
        now = trio.current_time()
        self._pending = [p for p in self._pending if p.expires > now]
        if not self._pending:  # nobody was offered anything: nothing to talk about
            self.stats.count(self.stats.refused, "unexpected")
            return None
        assert self._chain is not None
        ctx = libp2p_tls.server_context(self._chain, list({p.cert: 0 for p in self._pending}))
        channel = FastChannel(tcp, ctx, server_side=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await channel.do_handshake()
                cert = channel.peer_certificate() or b""
                token = await channel.receive_exactly(TOKEN_BYTES)
        except trio.TooSlowError:
            self.stats.count(self.stats.refused, "timeout")
            log.debug("fast-path connection from %s: no TLS and token in time", address)
            return None
        except (ssl.SSLError, trio.BrokenResourceError) as e:
            self.stats.count(self.stats.refused, "tls")
            text = f"fast-path connection from {address} failed TLS: {e}"
            self._log(_ip(address), "tls", text, logging.INFO)
            return None
        match = self._take(cert, token)
        if match is None:
            self.stats.count(self.stats.refused, "token")
            text = f"fast-path connection from {address}: unknown, expired or reused token"
            self._log(_ip(address), "token", text)
            return None
        _check_session(channel, match.cert, str(match.peer))
        channel.peer_id = match.peer
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            await channel.send_all(ACCEPT)
        return channel

    def _take(self, cert: bytes, token: bytes) -> _Pending | None:
        """Consume the live offer made for this certificate with this token."""
        now = trio.current_time()
        for i, p in enumerate(self._pending):
            if p.cert == cert and hmac.compare_digest(p.token, token):
                del self._pending[i]
                return p if p.expires > now else None
        return None

    # -- server: fallback --
    async def _on_fallback_stream(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        channel = Libp2pChannel(stream, peer_id)
        try:
            await self.handler(peer_id, channel)
        except FastPathError as e:
            self._reject(e)
            self._log(str(peer_id), e.reason, f"fallback channel: {e}")
        except FflError as e:  # the handler's verdict on what the peer sent (WireError...)
            self._log(str(peer_id), "channel", f"fallback channel: {e}")
        except (trio.BrokenResourceError, trio.ClosedResourceError, *streams.STREAM_ERRORS) as e:
            log.debug("fallback channel from %s ended: %s", short_peer(str(peer_id)), e)
        except trio.TooSlowError:
            self._log(str(peer_id), "timeout", "fallback channel timed out")
        else:
            await channel.aclose()
            return
        channel._broken = True
        await channel.aclose()

    def _log(self, who: str, kind: str, text: str, level: int = logging.WARNING) -> None:
        """A line about what `who` (a peer ID, or a source IP before TLS named a peer)
        did: the first is written, the rest held back and counted for a window."""
        self.peer_log.log(who, f"fastpath-{kind}", text, level)

    def _reject(self, e: FastPathError) -> None:
        self.stats.count(self.stats.refused, e.reason)
        if self.on_reject is not None:
            self.on_reject(e.peer, e.reason)


class _SetupFailed(Exception):
    """The fast path could not be set up (not a dishonest peer): fall back."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def _check_session(channel: TlsStream, pinned: bytes, peer: str) -> None:
    """The TLS session is libp2p TLS 1.3 with exactly the pinned certificate."""
    if channel.version() != "TLSv1.3" or channel.alpn() != libp2p_tls.ALPN:
        raise FastPathError(peer, "tls", f"negotiated {channel.version()} / {channel.alpn()}")
    if channel.peer_certificate() != pinned:
        raise FastPathError(peer, "certificate", "TLS certificate differs from the one offered")


def _remote_ip(stream: INetStream) -> str | None:
    try:
        remote = stream.get_remote_address()
    except Exception:  # transports raise assorted types for a socket already gone
        return None
    return str(remote[0]) if remote else None


def _ip(address: str) -> str:
    """The source IP of a "host:port" from _address: what an unauthenticated connection's
    lines are counted against (its port changes with every connection)."""
    return address.rsplit(":", 1)[0]


def _address(tcp: trio.SocketStream) -> str:
    try:
        host, port = tcp.socket.getpeername()[:2]
    except OSError:
        return "an unknown address"
    return f"{host}:{port}"


__all__ = [
    "ACCEPT",
    "Channel",
    "ChannelStream",
    "FALLBACK_PROTOCOL",
    "FastChannel",
    "FastPath",
    "FastPathError",
    "Libp2pChannel",
    "OFFER_PROTOCOL",
    "Offer",
    "Stats",
    "as_stream",
]
