"""What a node advertises and whom it dials (issues 10 and 13), on real hosts.

A wildcard listen must never reach a heartbeat or an identify reply as 0.0.0.0; the
agent version names fflnode; addresses learnt from peers enter the address book only
if the dial policy allows them, so a heartbeat naming someone else's address makes the
node open no connection there.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from contextlib import AsyncExitStack

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.identity.identify.identify import _mk_identify_protobuf
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from fflnode import wire
from fflnode.p2p import addrs
from fflnode.p2p.bulk import Traffic
from fflnode.p2p.host import AGENT_VERSION, build_host, build_pubsub, close_host, running_host
from fflnode.p2p.membership import Membership
from fflnode.p2p.reach import AddressGuard, Advertiser, Interfaces

RUN = "reach-run"
FAKE_IFACES = [
    ("lo", ipaddress.ip_address("127.0.0.1")),
    ("eth0", ipaddress.ip_address("198.51.100.7")),
    ("lo", ipaddress.ip_address("::1")),
    ("eth0", ipaddress.ip_address("2001:db8::7")),
    ("eth0", ipaddress.ip_address("fe80::1")),
]


def fake_interfaces() -> Interfaces:
    return Interfaces(read=lambda: list(FAKE_IFACES))


class CapturedPubsub:
    """Stands in for pubsub where a test only reads what membership publishes."""

    def __init__(self) -> None:
        self.published: list[bytes] = []

    async def publish(self, topic: str, data: bytes) -> None:
        self.published.append(data)


async def test_a_wildcard_listen_never_reaches_heartbeats_or_identify_as_unspecified():
    listen = [multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/0"), multiaddr.Multiaddr("/ip6/::/tcp/0")]
    advertiser = Advertiser([], fake_interfaces())
    host = build_host(create_new_key_pair(), advertiser=advertiser)
    async with running_host(host, listen):
        ports = {a.value_for_protocol("tcp") for a in host.get_transport_addrs()}
        pubsub = CapturedPubsub()
        m = Membership(host, pubsub, RUN, Traffic())  # type: ignore[arg-type]
        await m.beat_now()
        hb = wire.decode(pubsub.published[0], "me", run=RUN)
        identify = _mk_identify_protobuf(host, None)
        told = {
            "heartbeat": [multiaddr.Multiaddr(a) for a in hb["addrs"]],
            "identify": [multiaddr.Multiaddr(a) for a in identify.listen_addrs],
            "get_addrs": host.get_addrs(),
        }
        for where, got in told.items():
            scopes = {addrs.scope(a) for a in got}
            assert addrs.UNSPECIFIED not in scopes, (where, got)
            assert addrs.LOOPBACK not in scopes and addrs.LINK_LOCAL not in scopes, (where, got)
            bases = {str(a).split("/p2p/")[0] for a in got}
            want = {f"/ip4/198.51.100.7/tcp/{p}" for p in ports}
            want |= {f"/ip6/2001:db8::7/tcp/{p}" for p in ports}
            assert bases <= want, (where, got)
            assert any("/ip4/198.51.100.7/tcp/" in b for b in bases), (where, got)
            assert any("/ip6/2001:db8::7/tcp/" in b for b in bases), (where, got)
        assert identify.agent_version == AGENT_VERSION and AGENT_VERSION.startswith("fflnode/")
        await close_host(host)


async def test_announce_wins_in_heartbeats_and_identify():
    announce = ["/ip4/203.0.113.5/tcp/4001", "/dns4/node.example.org/tcp/4001"]
    host = build_host(create_new_key_pair(), advertiser=Advertiser(announce, fake_interfaces()))
    async with running_host(host, [multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/0")]):
        pubsub = CapturedPubsub()
        m = Membership(host, pubsub, RUN, Traffic())  # type: ignore[arg-type]
        await m.beat_now()
        hb = wire.decode(pubsub.published[0], "me", run=RUN)
        identify = _mk_identify_protobuf(host, None)
        me = f"/p2p/{host.get_id()}"
        assert hb["addrs"] == [a + me for a in announce]
        assert [str(multiaddr.Multiaddr(a)) for a in identify.listen_addrs] == announce
        await close_host(host)


async def test_addresses_from_peers_enter_the_address_book_only_if_the_policy_allows():
    host = build_host(create_new_key_pair(), advertiser=Advertiser([], fake_interfaces()))
    bootstrap = "/ip4/127.0.0.1/tcp/4001"
    guard = AddressGuard(host, trusted=[bootstrap], interfaces=fake_interfaces())
    peer = ID.from_pubkey(create_new_key_pair().public_key)
    other = ID.from_pubkey(create_new_key_pair().public_key)
    async with running_host(host, [multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/0")]):
        store = host.get_peerstore()
        offered = [
            "/ip4/127.0.0.1/tcp/9",  # loopback: the peer's own machine, refused
            "/ip4/169.254.1.1/tcp/9",  # link-local: refused
            "/ip4/0.0.0.0/tcp/9",  # unspecified: always refused
            "/ip4/224.0.0.1/tcp/9",  # multicast: always refused
            f"/ip4/198.51.100.9/tcp/9/p2p/{other}",  # names another peer: refused
            "/ip4/198.51.100.9/tcp/9",  # documentation range: dialled
            "/ip4/10.1.2.3/tcp/9",  # private: dialled
            bootstrap,  # from the config: trusted as written
        ]
        store.add_addrs(peer, [multiaddr.Multiaddr(a) for a in offered], 600)
        kept = {str(a) for a in store.addrs(peer)}
        assert kept == {"/ip4/198.51.100.9/tcp/9", "/ip4/10.1.2.3/tcp/9", bootstrap}
        assert guard.refused == 5
        await close_host(host)


async def test_a_node_listening_on_loopback_dials_loopback_peers():
    host = build_host(create_new_key_pair())
    guard = AddressGuard(host)
    async with running_host(host, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        peer = ID.from_pubkey(create_new_key_pair().public_key)
        assert [str(a) for a in guard.dialable(peer, ["/ip4/127.0.0.1/tcp/9"])] == [
            "/ip4/127.0.0.1/tcp/9"
        ]
        await close_host(host)


async def test_a_heartbeat_naming_someone_elses_address_opens_no_connection_there(caplog):
    """Dial reflection: an attacker relays heartbeats naming a victim's address. The
    victim here listens on loopback, which the node (on 0.0.0.0) must not dial for a
    peer; the listener counts every connection it accepts."""
    caplog.set_level(logging.INFO, logger="fflnode")
    victim = socket.socket()
    victim.bind(("127.0.0.1", 0))
    victim.listen(64)
    victim.setblocking(False)
    port = victim.getsockname()[1]
    async with AsyncExitStack() as stack:
        traffic = Traffic()
        host = build_host(create_new_key_pair(), advertiser=Advertiser([], fake_interfaces()))
        pubsub, router = build_pubsub(host, 2)
        await stack.enter_async_context(
            running_host(host, [multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/0")])
        )
        await stack.enter_async_context(background_trio_service(pubsub))
        await stack.enter_async_context(background_trio_service(router))
        stack.push_async_callback(close_host, host)
        guard = AddressGuard(host, interfaces=fake_interfaces())
        m = Membership(host, pubsub, RUN, traffic, guard=guard)
        attacker = ID.from_pubkey(create_new_key_pair().public_key)
        async with trio.open_nursery() as nursery:
            for seq in range(1, 21):  # twenty heartbeats, one a second in real life
                hb = wire.decode(
                    wire.encode("hb", run=RUN, round=0, phase="join", seq=seq, admit={},
                                addrs=[f"/ip4/127.0.0.1/tcp/{port}"] * 4),
                    str(attacker), run=RUN,
                )  # fmt: skip
                m._heartbeat(attacker, hb, nursery)
            await trio.sleep(1.0)  # any dial would have connected by now (loopback)
            nursery.cancel_scope.cancel()
    accepted = 0
    try:
        while True:
            victim.accept()[0].close()
            accepted += 1
    except BlockingIOError:
        pass
    victim.close()
    assert accepted == 0
    lines = [r for r in caplog.records if "no address we dial" in r.getMessage()]
    assert len(lines) == 1  # said once, not once per heartbeat


async def test_the_log_says_what_each_peer_advertises_bounded_and_once_a_window(caplog):
    """Across hosts the first question is where each peer told us to dial it: the log
    says so when a peer joins, and when its addresses change, at most once a minute per
    peer, cut to a line and escaped however long and odd the peer made them."""
    caplog.set_level(logging.INFO, logger="fflnode")
    async with AsyncExitStack() as stack:
        host = build_host(create_new_key_pair(), advertiser=Advertiser([], fake_interfaces()))
        pubsub, router = build_pubsub(host, 2)
        await stack.enter_async_context(
            running_host(host, [multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/0")])
        )
        await stack.enter_async_context(background_trio_service(pubsub))
        await stack.enter_async_context(background_trio_service(router))
        stack.push_async_callback(close_host, host)
        # public scope only: the documentation addresses below are logged, never dialled
        guard = AddressGuard(host, scopes=["public"], interfaces=fake_interfaces())
        m = Membership(host, pubsub, RUN, Traffic(), guard=guard)
        peer = ID.from_pubkey(create_new_key_pair().public_key)
        long_odd = "/ip4/198.51.100.99/tcp/9\n" + "x" * (wire.MAX_STR - 30)
        plans = [["/ip4/198.51.100.9/tcp/4001"]] + [[long_odd] * wire.MAX_ADDRS] * 10
        async with trio.open_nursery() as nursery:
            for seq, addrs_ in enumerate(plans, start=1):
                hb = wire.decode(
                    wire.encode("hb", run=RUN, round=0, phase="join", seq=seq, admit={},
                                addrs=addrs_),
                    str(peer), run=RUN,
                )  # fmt: skip
                m._heartbeat(peer, hb, nursery)
            nursery.cancel_scope.cancel()
    said = [r.getMessage() for r in caplog.records if "advertis" in r.getMessage()]
    assert len(said) == 2, said  # the join, then one change; nine more changes held back
    assert said[0].endswith("joined (round 0, join), advertising /ip4/198.51.100.9/tcp/4001")
    assert "now advertises /ip4/198.51.100.99/tcp/9\\n" in said[1]
    assert all("\n" not in line and len(line) < 600 for line in said)
