"""In-process libp2p peers for tests: real hosts on 127.0.0.1 sockets, real pubsub."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from fflnode.p2p.bulk import Traffic
from fflnode.p2p.host import build_host, build_pubsub, close_host, running_host
from fflnode.p2p.membership import Membership

MESH_TIMEOUT_S = 30.0  # bounded wait for every peer to hear every other's heartbeat


@dataclass
class Peer:
    host: IHost
    membership: Membership
    traffic: Traffic
    key_pair: KeyPair | None = None  # the host's identity (a FastPath needs it)

    @property
    def id(self) -> ID:
        return self.host.get_id()


@asynccontextmanager
async def peers(n: int, run_id: str = "test-run") -> AsyncIterator[list[Peer]]:
    """n connected peers whose memberships all see each other; torn down on exit."""
    async with AsyncExitStack() as stack:
        out: list[Peer] = []
        for _ in range(n):
            key_pair = create_new_key_pair()
            host = build_host(key_pair)
            pubsub, router = build_pubsub(host, n)
            listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
            await stack.enter_async_context(running_host(host, listen))
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(router))
            stack.push_async_callback(close_host, host)  # first to run on exit
            await pubsub.wait_until_ready()
            traffic = Traffic()
            out.append(Peer(host, Membership(host, pubsub, run_id, traffic), traffic, key_pair))
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        for p in out:
            await nursery.start(p.membership.run)
        for p in out[1:]:  # a star through peer 0; heartbeats make it a full mesh
            await p.host.connect(info_from_p2p_addr(out[0].host.get_addrs()[0]))
        with trio.fail_after(MESH_TIMEOUT_S):
            for p in out:
                ok = await p.membership.wait_until(
                    lambda p=p: len(p.membership.alive()) == n - 1, MESH_TIMEOUT_S
                )
                assert ok, "peers did not discover each other"
        yield out
