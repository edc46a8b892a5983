"""The bulk fast path: libp2p-TLS 1.3 beside libp2p, with real hosts on 127.0.0.1.

Peers that lie are built for real here: a FastPath whose certificate is made from a key
pair other than its host's (so its certificate proves another peer ID), a server whose
TLS endpoint presents a certificate other than the one it offered, clients that send
wrong, replayed or expired tokens, and garbage on both the offer protocol and the port.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import random
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field

import multiaddr
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from fflnode.errors import short_peer
from fflnode.p2p import fastpath, libp2p_tls
from fflnode.p2p.fastpath import (
    ACCEPT,
    OFFER_PROTOCOL,
    TOKEN_BYTES,
    Channel,
    FastPath,
    FastPathError,
    Offer,
)
from fflnode.p2p.host import build_host, running_host
from fflnode.p2p.tlsstream import TlsStream

LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
BODY_BYTES = 24 << 20  # large enough to span many TLS records, socket buffers and refills
# Dial + Noise + offer + TLS + 2 x 24 MiB on a loaded 2-core machine: seconds, not minutes.
TEST_TIMEOUT_S = 60.0


@dataclass
class Node:
    host: IHost
    key_pair: KeyPair
    fast: FastPath
    received: list[tuple[ID, bool, bytes]] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)

    @property
    def id(self) -> ID:
        return self.host.get_id()


async def echo(node: Node, peer: ID, channel: Channel) -> None:
    """Read a length-prefixed body, record its digest, send the body back, end."""
    n = int.from_bytes(await read_exactly(channel, 8), "big")
    body = await read_exactly(channel, n)
    node.received.append((peer, channel.fast, hashlib.sha256(body).digest()))
    await channel.send_all(body)
    await channel.send_eof()


async def read_exactly(channel: Channel, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await channel.receive_into(view[got:])
        assert k, f"channel ended after {got} of {n} bytes"
        got += k
    return bytes(buf)


@asynccontextmanager
async def nodes(*cert_keys: KeyPair | None, serve: bool = True) -> AsyncIterator[list[Node]]:
    """One node per argument; None: an honest node, a KeyPair: a node whose fast-path
    certificate is made from that key pair instead of its host's (a lying peer)."""
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        out: list[Node] = []
        for cert_key in cert_keys:
            key_pair = create_new_key_pair()
            host = build_host(key_pair)
            await stack.enter_async_context(running_host(host, LISTEN))
            node = Node(host, key_pair, None)  # type: ignore[arg-type]

            async def handler(peer: ID, channel: Channel, node: Node = node) -> None:
                await echo(node, peer, channel)

            node.fast = FastPath(
                host,
                cert_key or key_pair,
                handler,
                listen_host="127.0.0.1",
                on_reject=lambda peer, reason, node=node: node.rejects.append((peer, reason)),
            )
            if serve:
                await nursery.start(node.fast.serve)
            out.append(node)
        for a in out:
            for b in out:
                if a is not b:
                    await a.host.connect(info_from_p2p_addr(b.host.get_addrs()[0]))
        yield out


async def round_trip(channel: Channel, body: bytes) -> bytes:
    """Send body, read the echo; the echo server reads everything before answering."""
    await channel.send_all(len(body).to_bytes(8, "big") + body)
    back = await read_exactly(channel, len(body))
    assert await channel.receive_some(1) == b"", "echo did not end with EOF"
    await channel.aclose()
    return back


def random_body(n: int) -> bytes:
    return random.Random(n).randbytes(n)


# -- the channel ---------------------------------------------------------------------


async def test_large_body_round_trip_is_bit_exact_over_tls() -> None:
    body = random_body(BODY_BYTES)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):
            channel = await client.fast.open(server.id)
            assert channel.fast and channel.peer_id == server.id
            assert channel.version() == "TLSv1.3" and channel.alpn() == "libp2p"
            back = await round_trip(channel, body)
    assert back == body
    assert server.received == [(client.id, True, hashlib.sha256(body).digest())]
    assert (client.fast.stats.opened, server.fast.stats.accepted) == (1, 1)
    assert not client.fast.stats.fallbacks and not server.fast.stats.refused


async def test_channels_to_one_peer_are_independent() -> None:
    bodies = [random_body(n) for n in (1, 4096, 3 << 20)]
    results: dict[int, bytes] = {}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):

            async def one(i: int) -> None:
                results[i] = await round_trip(await client.fast.open(server.id), bodies[i])

            async with trio.open_nursery() as nursery:
                for i in range(len(bodies)):
                    nursery.start_soon(one, i)
    assert [results[i] for i in range(len(bodies))] == bodies
    assert server.fast.stats.accepted == len(bodies)


# -- lying peers ---------------------------------------------------------------------


async def test_server_with_certificate_for_another_key_is_refused() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, create_new_key_pair()) as (client, liar):
            with pytest.raises(FastPathError) as e:
                await client.fast.open(liar.id)
    assert e.value.reason == "certificate" and e.value.peer == str(liar.id)
    assert "another peer ID" in str(e.value)
    assert client.rejects == [(str(liar.id), "certificate")]
    assert not client.fast.stats.fallbacks, "a lying peer must not get a silent fallback"
    assert liar.received == []


async def test_client_with_certificate_for_another_key_gets_no_token() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(create_new_key_pair(), None) as (liar, server):
            with pytest.raises(FastPathError) as e:
                await liar.fast.open(server.id, fallback=False)
    assert e.value.reason == "refused" and "certificate" in str(e.value)
    assert server.rejects == [(str(liar.id), "certificate")]
    assert server.fast.stats.refused == {"certificate": 1}
    assert server.fast.stats.offered == 0 and not server.fast._pending


async def test_tls_endpoint_with_a_certificate_other_than_offered_is_refused() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):
            # The offer now carries a fresh certificate (valid for the server's peer ID),
            # while the TLS listener still presents the one it was started with.
            server.fast.identity = libp2p_tls.TlsIdentity.generate(server.key_pair)
            with pytest.raises(FastPathError) as e:
                await client.fast.open(server.id)
    assert e.value.reason == "certificate"
    assert "another certificate" in str(e.value)
    assert server.received == [] and server.fast.stats.accepted == 0


async def test_tls_client_with_a_certificate_other_than_requested_falls_back() -> None:
    body = random_body(1 << 20)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):
            # The request carries a fresh certificate; TLS presents the original one,
            # which the server never pinned: OpenSSL refuses the handshake.
            client.fast.identity = libp2p_tls.TlsIdentity.generate(client.key_pair)
            channel = await client.fast.open(server.id)
            assert not channel.fast
            assert await round_trip(channel, body) == body
    assert server.fast.stats.refused == {"tls": 1} and server.fast.stats.accepted == 0
    assert client.fast.stats.fallbacks == {"tls": 1}


# -- tokens --------------------------------------------------------------------------


async def connect_with(client: Node, server: Node, offer: Offer, token: bytes) -> bytes:
    """Run TLS to the offered port as `client` really would, send `token`; the answer
    (ACCEPT), or b"" when the server closed on us."""
    assert client.fast._chain is not None
    ctx = libp2p_tls.client_context(client.fast._chain, offer.cert)
    tcp = await trio.open_tcp_stream("127.0.0.1", offer.port)
    channel = TlsStream(tcp, ctx, server_side=False)
    try:
        await channel.do_handshake()
        await channel.send_all(token)
        return await channel.receive_exactly(len(ACCEPT))
    except (trio.BrokenResourceError, ssl.SSLError):
        return b""
    finally:
        await tcp.aclose()


async def test_wrong_token_is_refused() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):
            offer, _ = await client.fast._ask(server.id)
            wrong = bytes(b ^ 0xFF for b in offer.token)
            assert await connect_with(client, server, offer, wrong) == b""
    assert server.fast.stats.refused == {"token": 1}
    assert server.fast.stats.accepted == 0 and server.received == []


async def test_a_flood_of_bad_requests_and_tokens_writes_a_line_per_sender(caplog) -> None:
    """Every refusal is counted, but the log gets one line per sender and window: the
    fuzzer (tools/fuzz_daemon.py) saw 46 lines about one attacker in 6 s when each
    refusal was logged."""
    caplog.set_level(logging.DEBUG, logger="fflnode.p2p.fastpath")
    flood = 40
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):
            for i in range(flood):  # malformed offer requests, from an authenticated peer
                stream = await client.host.new_stream(server.id, [OFFER_PROTOCOL])
                await stream.write(b"XXXX" + bytes([i]))
                await stream.close()
                with suppress(Exception), trio.move_on_after(2):  # reset or EOF: refused
                    while await stream.read(1024):
                        pass
            offer, _ = await client.fast._ask(server.id)
            wrong = bytes(b ^ 0xFF for b in offer.token)
            for _ in range(flood):  # wrong tokens over real TLS, from one address
                assert await connect_with(client, server, offer, wrong) == b""
    assert server.fast.stats.refused == {"schema": flood, "token": flood}
    assert len(server.rejects) == flood  # each bad request an offence against its peer
    ours = [r for r in caplog.records if r.name == "fflnode.p2p.fastpath"]
    lines = [r.getMessage() for r in ours if r.levelno >= logging.INFO]
    lines = [x for x in lines if "listening on" not in x]
    about_peer = [x for x in lines if x.startswith(short_peer(str(client.id)))]
    about_address = [x for x in lines if x.startswith("127.0.0.1:")]
    assert len(about_peer) == 1 and "fast-path magic" in about_peer[0], lines
    assert len(about_address) == 1 and "token" in about_address[0], lines
    assert len(lines) == 2, lines


async def test_an_unforeseen_exception_in_a_channel_ends_only_that_channel() -> None:
    """Channels run in the FastPath's own nursery: an exception nobody foresaw (here the
    handler's ValueError) must end that channel, counted, and never the server."""
    body = random_body(4096)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):
            echo_handler = server.fast.handler
            calls = 0

            async def flaky(peer: ID, channel: Channel) -> None:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise ValueError("a parser choked")
                await echo_handler(peer, channel)

            server.fast.handler = flaky
            first = await client.fast.open(server.id)
            assert first.fast
            with pytest.raises((trio.BrokenResourceError, AssertionError)):
                await round_trip(first, body)
            second = await client.fast.open(server.id)  # the server still serves
            assert second.fast and await round_trip(second, body) == body
    assert server.fast.stats.refused == {"unexpected-error": 1}
    assert server.rejects == [(str(client.id), "unexpected-error")]


async def test_replayed_token_is_refused() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):
            offer, _ = await client.fast._ask(server.id)
            assert await connect_with(client, server, offer, offer.token) == ACCEPT
            assert await connect_with(client, server, offer, offer.token) == b""
    assert server.fast.stats.accepted == 1
    assert server.fast.stats.refused == {"unexpected": 1}  # its one offer was used up


async def test_token_of_another_peer_is_refused() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None, None) as (alice, mallory, server):
            alices_offer, _ = await alice.fast._ask(server.id)
            await mallory.fast._ask(server.id)  # so the server pins mallory's certificate
            # Mallory presents her own (pinned) certificate with Alice's token.
            assert await connect_with(mallory, server, alices_offer, alices_offer.token) == b""
            # The token was bound to Alice's certificate and is still hers to use once.
            assert await connect_with(alice, server, alices_offer, alices_offer.token) == ACCEPT
    assert server.fast.stats.refused == {"token": 1} and server.fast.stats.accepted == 1


async def test_expired_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "OFFER_TTL_S", 0.3)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):
            offer, _ = await client.fast._ask(server.id)
            await trio.sleep(0.5)
            assert await connect_with(client, server, offer, offer.token) == b""
    assert server.fast.stats.accepted == 0
    assert server.fast.stats.refused == {"unexpected": 1}  # expired offers are purged


# -- falling back --------------------------------------------------------------------


async def test_unreachable_port_falls_back_to_libp2p_bit_exact() -> None:
    body = random_body(3 << 20)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):
            with trio.socket.socket() as s:  # a port nobody listens on
                await s.bind(("127.0.0.1", 0))
                server.fast.port = s.getsockname()[1]
            channel = await client.fast.open(server.id)
            assert not channel.fast and channel.peer_id == server.id
            back = await round_trip(channel, body)
            # The failure is remembered: the next open goes straight to libp2p.
            again = await client.fast.open(server.id)
            assert not again.fast
            assert await round_trip(again, b"again") == b"again"
    assert back == body
    assert server.received[0] == (client.id, False, hashlib.sha256(body).digest())
    assert client.fast.stats.fallbacks == {"connect": 1, "remembered": 1}
    assert server.fast.stats.offered == 1


async def test_busy_server_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "MAX_PENDING_PER_PEER", 1)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):
            await client.fast._ask(server.id)  # holds the one offer it may have
            channel = await client.fast.open(server.id)
            assert not channel.fast
            assert await round_trip(channel, b"x") == b"x"
            with pytest.raises(FastPathError) as e:
                await client.fast.open(server.id, fallback=False)
    assert e.value.reason == "refused" and "busy" in str(e.value)
    assert client.fast.stats.fallbacks == {"refused": 2}
    # Our fallback is news, not an offence: it has its own log window and leaves the
    # peer log (shared with the node's other protocols) free for warnings about it.
    assert client.fast.fallback_log.written == 1 and client.fast.peer_log.written == 0


async def test_peer_without_fast_path_gets_the_fallback_protocol() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):
            server.host.remove_stream_handler(OFFER_PROTOCOL)  # an older fflnode
            channel = await client.fast.open(server.id)
            assert not channel.fast
            assert await round_trip(channel, b"hello") == b"hello"
    assert client.fast.stats.fallbacks == {"no-offer": 1}


# -- hostile bytes -------------------------------------------------------------------


async def test_garbage_to_the_listener_and_the_offer_protocol_never_escapes() -> None:
    rng = random.Random(7)
    body = random_body(1 << 20)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with nodes(None, None) as (client, server):
            port = server.fast.port
            escaped: list[BaseException] = []

            def spy(handler):
                async def wrapped(*args):
                    try:
                        await handler(*args)
                    except BaseException as e:
                        escaped.append(e)
                        raise

                return wrapped

            server.host.set_stream_handler(OFFER_PROTOCOL, spy(server.fast._on_offer_stream))
            server.fast._serve_connection = spy(server.fast._serve_connection)  # type: ignore[method-assign]

            async def send_raw(data: bytes, then_wait: bool) -> None:
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                try:
                    await tcp.send_all(data)
                    if then_wait:
                        with trio.move_on_after(2):
                            while await tcp.receive_some(4096):
                                pass
                except (trio.BrokenResourceError, OSError):
                    pass
                finally:
                    await tcp.aclose()

            garbage = [b"", b"\x16\x03\x01\x02\x00", os.urandom(1), os.urandom(70_000)]
            garbage += [rng.randbytes(rng.randrange(1, 600)) for _ in range(20)]
            # With no offer pending, then with one pending (the TLS path really runs).
            for data in garbage[:4]:
                await send_raw(data, then_wait=False)
            await client.fast._ask(server.id)
            for data in garbage:
                await send_raw(data, then_wait=True)
            # A real ClientHello from a client the server never heard of.
            stranger = libp2p_tls.TlsIdentity.generate(create_new_key_pair())
            with stranger.chain_file() as chain:
                ctx = libp2p_tls.client_context(chain, server.fast.identity.cert_der)  # type: ignore[union-attr]
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            with pytest.raises((ssl.SSLError, trio.BrokenResourceError)):
                stream = TlsStream(tcp, ctx, server_side=False)
                await stream.do_handshake()
                await stream.receive_exactly(1)
            await tcp.aclose()

            # Garbage on the offer protocol, from an authenticated libp2p peer.
            for data in [b"", b"FFP1", b"FFP1\xff\xff", b"FFP1\x00\x05abcde", b"XXXX\x00\x01a"]:
                stream = await client.host.new_stream(server.id, [OFFER_PROTOCOL])
                if data:
                    await stream.write(data)
                await stream.close()
                with trio.move_on_after(2):
                    try:
                        while await stream.read(1024):
                            pass
                    except Exception:  # reset or EOF: either is a refusal
                        pass

            # The server still serves, over TLS, and nothing escaped a handler.
            channel = await client.fast.open(server.id)
            assert channel.fast
            assert await round_trip(channel, body) == body
            assert escaped == []
    refused = server.fast.stats.refused
    assert refused.get("unexpected") == 4 and refused.get("tls", 0) >= 1
    assert {r for _, r in server.rejects} <= {"certificate", "schema", "oversized", "truncated"}


# -- the sans-IO parts ---------------------------------------------------------------


def test_offer_codec_round_trips() -> None:
    cert = libp2p_tls.TlsIdentity.generate(create_new_key_pair()).cert_der
    offer = Offer(4242, bytes(range(TOKEN_BYTES)), cert)
    assert fastpath.decode_reply(fastpath.encode_offer(offer), "p") == offer
    assert fastpath.decode_reply(fastpath.encode_refusal("busy"), "p") == "busy"
    assert fastpath.decode_request(fastpath.encode_request(cert), "p") == cert
    assert len(fastpath.encode_offer(Offer(1, offer.token, b"c" * 4096))) == (
        fastpath.MAX_REPLY_BYTES
    )


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 700), st.integers(0, 700), st.integers(0, 255))
def test_offer_decoding_raises_only_fastpath_error(
    tail: bytes, cut: int, pos: int, flip: int
) -> None:
    samples = [
        fastpath.encode_offer(Offer(1, b"t" * TOKEN_BYTES, CERT)),
        fastpath.encode_refusal("busy"),
        fastpath.encode_request(CERT),
    ]
    for data in samples:
        mutated = bytearray(data[:cut] + tail)
        if mutated:
            mutated[pos % len(mutated)] ^= flip
        for decode in (fastpath.decode_reply, fastpath.decode_request):
            with suppress(FastPathError):
                decode(bytes(mutated), "p")


KEY_PAIR = create_new_key_pair()
CERT = libp2p_tls.TlsIdentity.generate(KEY_PAIR).cert_der


def test_certificate_proves_its_host_key() -> None:
    assert libp2p_tls.verify_certificate(CERT) == ID.from_pubkey(KEY_PAIR.public_key)


def test_certificate_outside_its_validity_is_refused() -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=5000)
    old = libp2p_tls.TlsIdentity.generate(KEY_PAIR, now=past).cert_der
    with pytest.raises(libp2p_tls.CertificateError) as e:
        libp2p_tls.verify_certificate(old)
    assert e.value.reason == "validity"


def test_host_key_signature_over_another_certificate_key_is_refused() -> None:
    # Transplant the libp2p extension of one certificate into another: the host key's
    # signature then covers a certificate key that is not this certificate's.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    ext = x509.load_der_x509_certificate(CERT).extensions.get_extension_for_oid(
        libp2p_tls.LIBP2P_EXTENSION_OID
    )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([])
    now = dt.datetime.now(dt.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(ext.value, critical=True)
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    with pytest.raises(libp2p_tls.CertificateError) as e:
        libp2p_tls.verify_certificate(forged.public_bytes(Encoding.DER))
    assert e.value.reason == "signature"


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(CERT) - 1), st.integers(1, 255), st.integers(0, len(CERT)))
def test_mutated_certificates_raise_only_certificate_error(pos: int, flip: int, cut: int) -> None:
    mutated = bytearray(CERT)
    mutated[pos] ^= flip
    for data in (bytes(mutated), CERT[:cut]):
        try:
            proven = libp2p_tls.verify_certificate(data)
        except libp2p_tls.CertificateError:
            continue
        # A flip that still verifies (e.g. in an unsigned outer field) must prove the same ID.
        assert proven == ID.from_pubkey(KEY_PAIR.public_key)


def test_certificate_key_reaches_openssl_without_touching_a_disk() -> None:
    identity = libp2p_tls.TlsIdentity.generate(KEY_PAIR)
    with identity.chain_file() as chain:
        ctx = libp2p_tls.server_context(chain, [CERT])  # loads key and certificate
        if hasattr(os, "memfd_create"):
            assert str(chain).startswith("/proc/self/fd/")
    assert ctx.cert_store_stats()["x509"] == 1  # the one pinned peer certificate
