"""Signed peer records in pubsub, verified once per record instead of once per RPC.

py-libp2p attaches its signed peer record (an Envelope: the sender's addresses, signed
with its key) to every pubsub RPC it sends, and the receiver consumes it on every RPC:
protobuf parse, an Ed25519 verification, then the peerstore clears the sender's
addresses and adds them back through fflnode's dial policy (fflnode.p2p.reach). Twice
per RPC that carries control messages. With 16 nodes on 2 cores that was a fifth of
every node's CPU (py-spy over a 16-node testnet: `consume_peer_record` 16 %,
`consume_envelope` 4 %), and the starved event loops missed heartbeats.

What this module owns: `consume_once`, installed in place of the library's
`maybe_consume_signed_record` where pubsub calls it. It remembers, per host and per
peer, the exact record bytes it last accepted from that peer, and the peerstore entry
that acceptance made.

Promises:
* Same verdicts as the library. A record is skipped only when it is byte-for-byte the
  one this peer last sent and the library accepted, and the peerstore still holds the
  entry made then (not replaced, nor dropped with the peer's addresses: clearing them
  deletes it); anything else goes to the
  library, which decides. Verification is deterministic, so the same bytes from the same
  authenticated peer get the same verdict; a different record (a newer one, an older
  replay, another peer's) is always checked.
* Addresses stay fresh: an accepted record is consumed again at least every
  RECHECK_S, which renews its addresses' TTL in the peerstore.
* Bounded: at most MAX_REMEMBERED peers per host; the oldest entry goes first.
Must never: accept bytes the library did not accept from that same peer.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libp2p.pubsub.gossipsub as _gossipsub_module
import libp2p.pubsub.pubsub as _pubsub_module
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub import utils as _pubsub_utils

# A record is consumed again after this long even if unchanged: the library gives its
# addresses a 2-hour TTL in the peerstore, so once a minute keeps them well alive while
# a node receiving ~100 RPCs a second from a peer verifies its record once a minute.
RECHECK_S = 60.0
# Peers remembered per host: a run has at most wire.MAX_MEMBERS (256) nodes; twice that
# covers peers that came and went. An entry is ~200 bytes of record plus a reference.
MAX_REMEMBERED = 512


@dataclass(frozen=True)
class _Accepted:
    raw: bytes  # the record's bytes as the peer sent them
    state: object  # the peerstore's entry the acceptance made (compared by identity)
    at: float  # clock() when the library accepted it


Consume = Callable[[Any, IHost, ID], bool]


class RecordMemo:
    """The records one host's library accepted, per peer (see the module doc)."""

    def __init__(self, consume: Consume, clock: Callable[[], float] = time.monotonic) -> None:
        self._consume = consume
        self._clock = clock
        self._accepted: OrderedDict[ID, _Accepted] = OrderedDict()
        self.verified = 0  # records handed to the library
        self.skipped = 0  # records recognised as already accepted

    def __call__(self, msg: Any, host: IHost, peer_id: ID) -> bool:
        if not msg.HasField("senderRecord"):
            return True  # the library's own answer: nothing to consume
        raw = bytes(msg.senderRecord)
        store = host.get_peerstore()
        held = self._accepted.get(peer_id)
        if (
            held is not None
            and held.raw == raw
            and self._clock() - held.at < RECHECK_S
            and _entry(store, peer_id) is held.state
        ):
            self.skipped += 1
            return True
        self.verified += 1
        ok = self._consume(msg, host, peer_id)
        state = _entry(store, peer_id)
        if ok and state is not None:
            self._accepted.pop(peer_id, None)
            self._accepted[peer_id] = _Accepted(raw, state, self._clock())
            while len(self._accepted) > MAX_REMEMBERED:
                self._accepted.popitem(last=False)
        elif held is not None and state is not held.state:
            del self._accepted[peer_id]  # what we remember is no longer what the store holds
        return ok

    def __len__(self) -> int:
        return len(self._accepted)


def _entry(store: Any, peer_id: ID) -> object | None:
    """The peerstore's signed-record entry for `peer_id` (None: none, or a peerstore
    without one, where nothing is ever skipped)."""
    records = getattr(store, "peer_record_map", None)
    return None if records is None else records.get(peer_id)


_LIBRARY_CONSUME: Consume = _pubsub_utils.maybe_consume_signed_record
_MEMOS: weakref.WeakKeyDictionary[IHost, RecordMemo] = weakref.WeakKeyDictionary()


def memo_for(host: IHost) -> RecordMemo:
    """The memo of `host` (made on first use)."""
    memo = _MEMOS.get(host)
    if memo is None:
        memo = _MEMOS[host] = RecordMemo(_LIBRARY_CONSUME)
    return memo


def consume_once(msg: Any, host: IHost, peer_id: ID) -> bool:
    """Drop-in for the library's maybe_consume_signed_record, through `host`'s memo."""
    return memo_for(host)(msg, host, peer_id)


def install() -> None:
    """Route pubsub's record consumption (Pubsub and GossipSub) through `consume_once`."""
    _pubsub_module.maybe_consume_signed_record = consume_once  # type: ignore[attr-defined]
    _gossipsub_module.maybe_consume_signed_record = consume_once  # type: ignore[attr-defined]


__all__ = ["MAX_REMEMBERED", "RECHECK_S", "RecordMemo", "consume_once", "install", "memo_for"]
