"""The peer book is bounded: free identities cannot grow it past MAX_PEERS."""

from __future__ import annotations

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from fflnode import wire
from fflnode.p2p import membership as membership_mod
from fflnode.p2p.bulk import Traffic
from fflnode.p2p.host import build_host, build_pubsub
from fflnode.p2p.membership import Membership

RUN = "bounds-run"
CAP = 4  # a small book, so the test adds a few identities rather than a thousand


def identity(i: int) -> ID:
    return ID.from_pubkey(create_new_key_pair(bytes([i + 1]) * 32).public_key)


def heartbeat(seq: int) -> wire.Message:
    data = wire.encode("hb", run=RUN, round=0, phase="join", addrs=[], seq=seq, admit={})
    return wire.decode(data, "peer", run=RUN)


async def test_a_full_peer_book_admits_newcomers_only_in_place_of_a_suspect(monkeypatch):
    monkeypatch.setattr(membership_mod, "MAX_PEERS", CAP)
    host = build_host(create_new_key_pair(bytes([99]) * 32))
    pubsub, _ = build_pubsub(host, 2)
    m = Membership(host, pubsub, RUN, Traffic())
    ids = [identity(i) for i in range(CAP + 3)]
    async with trio.open_nursery() as nursery:
        for i, p in enumerate(ids):
            m._heartbeat(p, heartbeat(i + 1), nursery)
        assert list(m.peers) == ids[:CAP]  # newcomers beyond the cap are ignored
        m.suspect(ids[1], "test: went silent")
        m._heartbeat(ids[CAP], heartbeat(100), nursery)
        assert ids[1] not in m.peers and ids[CAP] in m.peers and len(m.peers) == CAP
        assert ids[1] not in m.suspects
        m._heartbeat(ids[0], heartbeat(101), nursery)  # members already known still beat
        assert m.peers[ids[0]].seq == 101
        nursery.cancel_scope.cancel()
