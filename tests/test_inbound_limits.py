"""Inbound limits (fflnode.p2p.limits) on real py-libp2p hosts over 127.0.0.1 sockets: a
peer's streams beyond its limit, in all or on one protocol, are reset at once and
counted (not queued, not offences); connections beyond the handshakes in progress, per
IP or in all, are closed before a byte is read; and whatever was admitted is untouched.
Each test fails without the limit it pins: the refused stream or connection would be
served like the others. And what an inbound stream's negotiation or handler raises on a
peer's bytes ends that stream only (without fflnode.p2p.host's containment the node
exits)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import multiaddr
import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr

from fflnode.p2p.gate import Gate
from fflnode.p2p.host import build_host, running_host
from fflnode.p2p.limits import HANDSHAKES, HANDSHAKES_IP, STREAMS_PEER, STREAMS_PROTOCOL, Limits

HOLD = "/test/hold/1.0.0"
OTHER = "/test/other/1.0.0"
# A refused stream or connection is answered at once; admitted ones are held for the
# test's length. Anything this slow is no "at once", even on a loaded 2-core machine.
AT_ONCE_S = 5.0
TEST_TIMEOUT_S = 60.0


class Holder:
    """A handler that keeps every stream it gets until released (then echoes and ends)."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.held = 0

    async def __call__(self, stream: INetStream) -> None:
        self.held += 1
        await self.release.wait()
        await stream.write(b"done")
        await stream.close()


@asynccontextmanager
async def pair(limits: Limits) -> AsyncIterator[tuple[IHost, IHost, Holder, Gate]]:
    """A server with `limits` and a Holder on HOLD and OTHER, and a client connected to it."""
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with AsyncExitStack() as stack:
        gate = Gate()
        server = build_host(create_new_key_pair(), gate=gate, limits=limits)
        client = build_host(create_new_key_pair())
        await stack.enter_async_context(running_host(server, listen))
        await stack.enter_async_context(running_host(client, listen))
        holder = Holder()
        server.set_stream_handler(HOLD, holder)
        server.set_stream_handler(OTHER, holder)
        await client.connect(info_from_p2p_addr(server.get_addrs()[0]))
        yield server, client, holder, gate


async def open_held(client: IHost, server: IHost, protocol: str, n: int) -> list[INetStream]:
    """n negotiated streams on `protocol`, each written to so the handler has it."""
    out = []
    for _ in range(n):
        s = await client.new_stream(server.get_id(), [protocol])
        await s.write(b"x")
        out.append(s)
    return out


async def refused_at_once(client: IHost, server: IHost, protocol: str) -> None:
    """A new stream on `protocol` is reset (at negotiation or at its first read)."""
    with trio.fail_after(AT_ONCE_S):
        try:
            s = await client.new_stream(server.get_id(), [protocol])
            data = await s.read(4)
        except Exception:  # the reset surfaces as the library's stream or negotiation error
            return
    raise AssertionError(f"the stream beyond the limit was served: read {data!r}")


async def served(client: IHost, server: IHost, protocol: str, holder: Holder) -> None:
    s = await client.new_stream(server.get_id(), [protocol])
    await s.write(b"x")
    holder.release.set()
    with trio.fail_after(AT_ONCE_S):
        assert await s.read(4) == b"done"


async def test_a_peers_streams_beyond_its_limit_are_reset_at_once_and_counted_not_offences():
    limits = Limits(streams_per_peer=4, streams_per_protocol=100)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with pair(limits) as (server, client, holder, gate):
            held = await open_held(client, server, HOLD, 4)
            with trio.fail_after(AT_ONCE_S):
                while holder.held < 4:
                    await trio.sleep(0.01)  # polling the handler's count, under a deadline
            await refused_at_once(client, server, OTHER)  # any protocol: the peer's limit
            assert limits.refused[STREAMS_PEER] == 1
            assert limits.peak["streams-peer"] == 4
            assert not gate.offences and not gate.banned  # a refusal is no offence
            holder.release.set()
            for s in held:  # the admitted streams were left alone
                with trio.fail_after(AT_ONCE_S):
                    assert await s.read(4) == b"done"
            with trio.fail_after(AT_ONCE_S):
                while limits.streams:
                    await trio.sleep(0.01)  # the handlers returning, under a deadline
            holder.release = trio.Event()
            await served(client, server, OTHER, holder)  # slots are given back


async def test_a_peers_streams_beyond_its_limit_on_one_protocol_are_reset_others_served():
    limits = Limits(streams_per_peer=100, streams_per_protocol=3)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with pair(limits) as (server, client, holder, _):
            await open_held(client, server, HOLD, 3)
            await refused_at_once(client, server, HOLD)
            assert limits.refused[STREAMS_PROTOCOL] == 1
            await served(client, server, OTHER, holder)


async def stalled_connections(port: int, n: int) -> list[trio.SocketStream]:
    """n TCP connections that never send a byte: each holds a handshake slot."""
    return [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(n)]


async def closed_at_once(port: int) -> None:
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(AT_ONCE_S):
        try:
            data = await sock.receive_some(100)
        except trio.BrokenResourceError:  # reset rather than closed
            data = b""
    assert data == b"", f"the connection beyond the limit was answered: {data!r}"
    await sock.aclose()


def port_of(host: IHost) -> int:
    return int(host.get_addrs()[0].value_for_protocol("tcp"))


@pytest.mark.parametrize(
    ("sizes", "kind"),
    [
        ({"handshakes": 100, "handshakes_per_ip": 3}, HANDSHAKES_IP),
        ({"handshakes": 3, "handshakes_per_ip": 100}, HANDSHAKES),
    ],
)
async def test_connections_beyond_the_handshakes_in_progress_are_closed_before_a_byte(
    sizes: dict[str, int], kind: str
):
    limits = Limits(**sizes)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with pair(limits) as (server, client, holder, _):
            port = port_of(server)
            stalled = await stalled_connections(port, 3)
            with trio.fail_after(AT_ONCE_S):
                while limits.handshakes < 3:
                    await trio.sleep(0.01)  # the listener accepting them, under a deadline
            await closed_at_once(port)
            assert limits.refused[kind] == 1
            # The established connection and its streams are untouched meanwhile.
            await served(client, server, OTHER, holder)
            for sock in stalled:
                await sock.aclose()
            with trio.fail_after(AT_ONCE_S):
                while limits.handshakes:
                    await trio.sleep(0.01)  # the slots coming back, under a deadline
            # A new peer's dial gets through once the stalled handshakes are gone.
            other = build_host(create_new_key_pair())
            async with running_host(other, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                with trio.fail_after(AT_ONCE_S * 2):
                    await other.connect(info_from_p2p_addr(server.get_addrs()[0]))


# ----------------------------------------------------------------------------- containment
async def raw_stream(client: IHost, server: IHost) -> object:
    """A yamux stream opened by hand, before any multistream negotiation."""
    conn = client.get_network().connections[server.get_id()][0]
    return await conn.muxed_conn.open_stream()


async def test_a_multistream_line_that_is_not_utf8_resets_the_stream_and_the_node_carries_on():
    """py-libp2p decodes multistream lines as UTF-8 and let UnicodeDecodeError escape the
    stream's task, which took the swarm down (found by tools/fuzz_daemon.py --seed 13)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with pair(Limits()) as (server, client, holder, _):
            stream = await raw_stream(client, server)
            line = b"\xff\xfe/fflnode/\x84x\n"
            await stream.write(b"\x13/multistream/1.0.0\n" + bytes([len(line)]) + line)
            with trio.fail_after(AT_ONCE_S * 4):  # the header, then a reset or close
                with contextlib.suppress(Exception):
                    while await stream.read(100):
                        pass
            await served(client, server, OTHER, holder)  # the node is still up


async def test_an_exception_escaping_a_handler_resets_that_stream_and_is_an_offence():
    """The backstop: whatever a library handler raises on a peer's bytes is contained."""
    hostile: list[tuple[str, str]] = []
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]

    async def chokes(stream: INetStream) -> None:
        raise ValueError("a parser choked on the peer's bytes")

    with trio.fail_after(TEST_TIMEOUT_S):
        server = build_host(
            create_new_key_pair(), on_hostile=lambda peer, reason, _: hostile.append((peer, reason))
        )
        client = build_host(create_new_key_pair())
        async with running_host(server, listen), running_host(client, listen):
            holder = Holder()
            server.set_stream_handler(HOLD, chokes)
            server.set_stream_handler(OTHER, holder)
            await client.connect(info_from_p2p_addr(server.get_addrs()[0]))
            await refused_at_once(client, server, HOLD)
            assert hostile == [(str(client.get_id()), "stream")]
            await served(client, server, OTHER, holder)
