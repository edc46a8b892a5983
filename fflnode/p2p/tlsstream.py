"""TLS over a trio stream, driven through ssl.SSLObject and two MemoryBIOs, for bulk data.

Why not trio.SSLStream: it returns at most one TLS record (16 KiB) per receive_some, and
each call costs its locks, conflict detectors and retry loop. Measured on this machine
(tools/bench_bulk.py --paths trio-ssl,tls, 5 interleaved repeats of 256 MiB): receiving
took 0.29 CPU s with trio.SSLStream and 0.17 with this driver, sending 0.25 and 0.19.
Here one `receive_into` refills the incoming BIO with up to RECV_FILL_BYTES of ciphertext
per socket read, then decrypts record after record straight into the caller's buffer in
a tight loop, without yielding between records.

What it owns and promises:
* The TLS machinery is the standard library's (OpenSSL): this module only moves bytes
  between the BIOs and the socket. No cryptography of its own.
* `do_handshake` must complete before anything else; the caller then inspects
  `peer_certificate()` and `alpn()`. Contexts should set `num_tickets = 0` (servers):
  TLS 1.3 session tickets would be post-handshake records nobody uses here.
* One task sends and one task receives at a time (BusyResourceError otherwise, as any
  trio stream). Everything OpenSSL writes into the outgoing BIO (data, alerts, key
  update replies) is flushed under one lock, in BIO order.
* `send_eof` sends close_notify; the peer then reads EOF (b"" / 0). A transport EOF
  without close_notify is a truncation: BrokenResourceError, never a clean end.
* Any failure or cancellation in the middle of an operation leaves the stream broken:
  later calls raise BrokenResourceError. Nothing is ever resumed.
"""

from __future__ import annotations

import contextlib
import ssl

import trio

# Ciphertext read from the socket per refill: 256 KiB is 16 full TLS records; larger
# refills measured no faster here and hold more memory per open stream.
RECV_FILL_BYTES = 256 << 10
# Plaintext handed to OpenSSL per flush: bounds the outgoing BIO (and so the memory of a
# stream) to about this much ciphertext, while amortising the per-flush Python cost.
SEND_CHUNK_BYTES = 1 << 20
# receive_some's size when the caller names none.
DEFAULT_RECEIVE_BYTES = 256 << 10


class TlsStream(trio.abc.HalfCloseableStream):
    """A TLS connection over `transport` (normally a trio.SocketStream)."""

    def __init__(
        self, transport: trio.abc.Stream, context: ssl.SSLContext, *, server_side: bool
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._send_lock = trio.Lock()  # transport sends, in outgoing-BIO order
        self._sending = False
        self._receiving = False
        self._handshaken = False
        self._broken = False
        self._eof_sent = False
        self._eof_received = False

    # -- handshake and identity --
    async def do_handshake(self) -> None:
        """Run the TLS handshake; raises ssl.SSLError (e.g. SSLCertVerificationError)
        when OpenSSL refuses, BrokenResourceError when the transport ends first."""
        try:
            while True:
                try:
                    self._ssl.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                await self._flush()
                if done:
                    self._handshaken = True
                    return
                if not await self._fill():
                    raise trio.BrokenResourceError("peer closed during the TLS handshake")
        except ssl.SSLError:
            self._broken = True
            await self._flush_quietly()  # let the peer read OpenSSL's alert
            raise
        except BaseException:
            self._broken = True
            raise

    def peer_certificate(self) -> bytes | None:
        """The DER certificate the peer presented (after the handshake)."""
        return self._ssl.getpeercert(binary_form=True)

    def alpn(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    def version(self) -> str | None:
        return self._ssl.version()

    # -- sending --
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check("send")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was called on this TLS stream")
        self._sending = True
        try:
            view = memoryview(data).cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
                return
            for pos in range(0, len(view), SEND_CHUNK_BYTES):
                try:
                    self._ssl.write(view[pos : pos + SEND_CHUNK_BYTES])
                except ssl.SSLError as e:
                    raise trio.BrokenResourceError(f"TLS write failed: {e}") from e
                await self._flush()
        except BaseException:
            self._broken = True
            raise
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Send close_notify: the peer reads EOF; we may go on receiving (TLS 1.3)."""
        self._check("send")
        if self._eof_sent:
            await trio.lowlevel.checkpoint()
            return
        self._eof_sent = True
        try:
            self._ssl.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass  # close_notify is in the outgoing BIO; the peer's comes later, or not
        except ssl.SSLError as e:
            self._broken = True
            raise trio.BrokenResourceError(f"TLS close_notify failed: {e}") from e
        await self._flush()

    # -- receiving --
    async def receive_into(self, buffer: bytearray | memoryview) -> int:
        """Decrypt into `buffer` as much as is available (>= 1 byte, waiting for it);
        0 means the peer sent close_notify."""
        self._check("receive")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        self._receiving = True
        try:
            return await self._receive_into(memoryview(buffer).cast("B"))
        except BaseException:
            self._broken = True
            raise
        finally:
            self._receiving = False

    async def _receive_into(self, view: memoryview) -> int:
        want = len(view)
        if want == 0 or self._eof_received:
            await trio.lowlevel.checkpoint()
            return 0
        got = 0
        while True:
            try:
                while got < want:
                    n = self._ssl.read(want - got, view[got:])
                    if n == 0:  # close_notify seen by OpenSSL in this read
                        self._eof_received = True
                        break
                    got += n
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self._eof_received = True
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(f"TLS read failed: {e}") from e
            if self._outgoing.pending:  # e.g. a KeyUpdate answer OpenSSL produced
                await self._flush()
            if got or self._eof_received:
                await trio.lowlevel.checkpoint()
                return got
            if not await self._fill():
                raise trio.BrokenResourceError("transport closed without TLS close_notify")

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        buf = bytearray(max_bytes or DEFAULT_RECEIVE_BYTES)
        n = await self.receive_into(buf)
        del buf[n:]
        return buf

    async def receive_exactly(self, n: int) -> bytes:
        """Exactly n bytes; EOF first is BrokenResourceError (a truncation)."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = await self.receive_into(view[got:])
            if k == 0:
                raise trio.BrokenResourceError(f"TLS stream ended after {got} of {n} bytes")
            got += k
        return bytes(buf)

    # -- closing --
    async def aclose(self) -> None:
        """Close the transport at once (no close_notify: call send_eof first for that)."""
        self._broken = True
        await self.transport.aclose()

    # -- plumbing --
    def _check(self, what: str) -> None:
        if self._broken:
            raise trio.BrokenResourceError(f"cannot {what}: this TLS stream is broken or closed")
        if not self._handshaken:
            raise RuntimeError("TlsStream used before do_handshake")

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._outgoing.read()
            if data:
                await self.transport.send_all(data)

    async def _flush_quietly(self) -> None:
        with (
            trio.move_on_after(1.0),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await self._flush()

    async def _fill(self) -> bool:
        data = await self.transport.receive_some(RECV_FILL_BYTES)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True
