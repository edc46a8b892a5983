"""Signed peer records in pubsub RPCs are verified once per record, with the library's
verdicts (fflnode.p2p.records).

The oracle is py-libp2p itself: every sequence of records is also fed to the library's
own `maybe_consume_signed_record` on a second, untouched host, and both must give the
same verdicts and leave the same addresses in the peerstore.
"""

from __future__ import annotations

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.envelope import seal_record
from libp2p.peer.id import ID
from libp2p.peer.peer_record import PeerRecord
from libp2p.pubsub.pb import rpc_pb2

from fflnode.p2p import records
from fflnode.p2p.host import build_host
from tests.p2p_harness import peers

LIBRARY = records._LIBRARY_CONSUME
HEARTBEATS_SEEN = 5  # heartbeats each peer must hear in the live test
LIVE_TIMEOUT_S = 30.0  # bounded wait for them


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Counting:
    """The library's consume, counting the records it was handed."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, msg, host, peer_id) -> bool:  # type: ignore[no-untyped-def]
        self.calls += 1
        return LIBRARY(msg, host, peer_id)


class Sender:
    """A peer identity that signs peer records."""

    def __init__(self) -> None:
        self.keys = create_new_key_pair()
        self.id = ID.from_pubkey(self.keys.public_key)

    def rpc(self, port: int, seq: int, signer: Sender | None = None) -> rpc_pb2.RPC:
        addr = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")
        record = PeerRecord(self.id, [addr], seq=seq)
        envelope = seal_record(record, (signer or self).keys.private_key)
        return rpc_pb2.RPC(senderRecord=envelope.marshal_envelope())


def receiver():  # type: ignore[no-untyped-def]
    return build_host(create_new_key_pair())


def ports(host, peer: ID) -> set[int]:  # type: ignore[no-untyped-def]
    try:
        return {int(a.value_for_protocol("tcp")) for a in host.get_peerstore().addrs(peer)}
    except Exception:  # the library raises when it holds no address for the peer
        return set()


def test_a_repeated_record_is_verified_once_and_keeps_its_addresses():
    b = Sender()
    host, counting = receiver(), Counting()
    memo = records.RecordMemo(counting, Clock())
    rpc = b.rpc(4001, seq=1)
    assert all(memo(rpc, host, b.id) for _ in range(50))
    assert counting.calls == 1
    assert ports(host, b.id) == {4001}


def test_verdicts_and_addresses_match_the_library_on_new_old_and_foreign_records():
    b, c = Sender(), Sender()
    sequence = [
        (b.rpc(4001, seq=1), b.id),
        (b.rpc(4001, seq=1), b.id),  # the same again
        (b.rpc(4002, seq=2), b.id),  # newer: replaces the addresses
        (b.rpc(4001, seq=1), b.id),  # an older replay: refused
        (b.rpc(4002, seq=2), b.id),
        (b.rpc(4002, seq=2), c.id),  # b's record from c: refused
        (c.rpc(5001, seq=7, signer=b), c.id),  # c's record signed by b: refused
        (c.rpc(5001, seq=7), c.id),
        (rpc_pb2.RPC(senderRecord=b"\x0a\x03not an envelope"), b.id),  # garbage: refused
        (rpc_pb2.RPC(), b.id),  # no record: nothing to consume
        (b.rpc(4002, seq=2), b.id),
    ]
    memo_host, plain_host = receiver(), receiver()
    memo = records.RecordMemo(LIBRARY, Clock())
    for rpc, sender in sequence:
        expected = LIBRARY(rpc, plain_host, sender)
        assert memo(rpc, memo_host, sender) == expected
        for peer in (b.id, c.id):
            assert ports(memo_host, peer) == ports(plain_host, peer)
    assert ports(memo_host, b.id) == {4002} and ports(memo_host, c.id) == {5001}
    assert memo.skipped == 3  # a refused replay or garbage leaves what was accepted


def test_a_record_is_verified_again_after_recheck_or_once_the_peerstore_dropped_it():
    b = Sender()
    host, counting, clock = receiver(), Counting(), Clock()
    memo = records.RecordMemo(counting, clock)
    rpc = b.rpc(4001, seq=1)
    memo(rpc, host, b.id)
    clock.t = records.RECHECK_S - 1.0
    memo(rpc, host, b.id)
    assert counting.calls == 1
    clock.t = records.RECHECK_S + 1.0  # stale: consumed again (addresses' TTL renewed)
    memo(rpc, host, b.id)
    assert counting.calls == 2
    host.get_peerstore().clear_addrs(b.id)  # the library drops the record with them
    assert ports(host, b.id) == set()
    assert memo(rpc, host, b.id)
    assert counting.calls == 3 and ports(host, b.id) == {4001}


def test_the_memo_holds_at_most_max_remembered_peers():
    host = receiver()
    memo = records.RecordMemo(LIBRARY, Clock())
    senders = [Sender() for _ in range(records.MAX_REMEMBERED + 8)]
    for s in senders:
        assert memo(s.rpc(4001, seq=1), host, s.id)
    assert len(memo) == records.MAX_REMEMBERED


async def test_live_pubsub_verifies_each_peers_record_once_not_per_rpc():
    """Three real hosts exchanging heartbeats: their pubsub goes through the memo, and
    each receiver verified each sender's record about once, not once per RPC."""
    async with peers(3, "records-run") as group:
        t = trio.current_time()
        with trio.fail_after(LIVE_TIMEOUT_S):
            for p in group:
                for q in group:
                    if p is not q:
                        await p.membership.wait_until(
                            lambda p=p, q=q: p.membership.heard_since(q.id, t + HEARTBEATS_SEEN),
                            LIVE_TIMEOUT_S,
                        )
        for p in group:
            memo = records.memo_for(p.host)
            assert memo.skipped > 2 * HEARTBEATS_SEEN, (memo.skipped, memo.verified)
            # Each peer's record once, plus one per reconnect or re-issued record.
            assert memo.verified <= 4 * (len(group) - 1), (memo.skipped, memo.verified)
