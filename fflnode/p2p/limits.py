"""How much of this node one peer, or one address, may hold at once: inbound streams in
flight and handshakes in progress, bounded as go-libp2p's resource manager bounds them.

Owns three counters and the refusals at the points every inbound exchange passes
(`install` wraps them on a py-libp2p host; `build_host` calls it):
* Streams of a peer. Every inbound stream is a task in this node from the moment yamux
  accepts it (multistream negotiation, then the protocol's handler) until its handler
  returns. The swarm's stream handler is wrapped: a peer already holding
  MAX_INBOUND_STREAMS_PER_PEER such tasks has its new stream reset before negotiation.
* Streams of a peer on one protocol. Each protocol's handler is wrapped (those already
  registered and every later one): a peer already holding MAX_INBOUND_STREAMS_PER_PROTOCOL
  streams on that protocol has the new one reset before the handler runs.
* Handshakes. An inbound TCP connection holds a task, a socket and a Noise handshake
  until it is a muxed connection (at most INBOUND_UPGRADE_TIMEOUT_S; each stream's
  multistream negotiation has NEGOTIATE_TIMEOUT_S of its own). At most
  MAX_HANDSHAKES are in progress at once, MAX_HANDSHAKES_PER_IP from one IP address;
  a connection beyond either is closed before a byte of it is read.

py-libp2p 0.8.1 bounds none of these per peer or per address: its resource manager
counts streams only globally (10,000, and waits for a slot rather than refusing), and
inbound connections only in all (300, established ones included).

Promises: a refusal costs a counter update and one reset or close, bounded by
REFUSE_TIMEOUT_S and run in the refused stream's or connection's own task; nothing
waits for a slot (there is no queue to fill). Refusals are counted by kind (`refused`,
exported as metrics) and are never offences: how many of its streams are in flight here
depends on how fast this node finishes them, so a loaded node (or one whose loop
stalled) would otherwise charge an honest peer for its own slowness. The limits sit far
above what an honest node opens (their reasons are beside them), so they refuse only a
flood, and a flood costs its sender as much as us.
Must never: block a caller, or touch a stream or connection it admitted.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import suppress
from typing import Any

import trio
from libp2p.abc import IHost, INetStream, IRawConnection
from libp2p.network.exceptions import SwarmException

log = logging.getLogger(__name__)

# Inbound streams one peer may have in flight here, over all protocols. An honest fflnode
# peer holds about 6 by design (a GossipSub stream, a shard pull, a merge pull, a state
# pull, a ping, an identify exchange), a few more while a slow round overlaps the next;
# go-libp2p allows 256 per peer by default (PeerBaseLimit.StreamsInbound). Measured
# without a limit: a yamux SYN flood (300 stream opens in one write) had 159 streams of
# one peer negotiating in a daemon at once (tools/fuzz_daemon.py --seed 13, load ~15).
# 64 is 10x honest use and bounds what one peer can make this node hold.
MAX_INBOUND_STREAMS_PER_PEER = 64
# ... and on any one protocol: an honest peer pipelines its pulls on one stream a peer
# (fflnode.p2p.bulk), pings one at a time, keeps one GossipSub stream; go-libp2p allows
# 64 (ProtocolPeerBaseLimit.StreamsInbound). 16 leaves room for a slow node whose
# handlers pile up for a deadline while the peer retries.
MAX_INBOUND_STREAMS_PER_PROTOCOL = 16
# Inbound connections still in their handshake (TCP accepted, not yet muxed), in all.
# go-libp2p's transient scope admits 32 at its base (TransientBaseLimit.ConnsInbound),
# more with memory. A run's peers dial once each, and redial with backoff.
MAX_HANDSHAKES = 64
# ... and from one IP address. go-libp2p allows 8 connections per IPv4 address, loopback
# exempt. A testnet of 16 nodes on one address (tools/bench_testnet.py scaling) has 15
# of them dial its bootstrap node at once: 32 holds that, twice over, with no exemption.
MAX_HANDSHAKES_PER_IP = 32
# The deadline of an inbound connection's security and muxer upgrade, and of each inbound
# stream's multistream negotiation (build_host sets both in py-libp2p's ConnectionConfig;
# they are its defaults): a handshake holds its slot, a negotiating stream its task, at
# most this long. 10 s is go-libp2p's negotiation timeout too.
INBOUND_UPGRADE_TIMEOUT_S = 10.0
NEGOTIATE_TIMEOUT_S = 10.0
# A refusal's reset (a yamux RST frame) or close waits at most this long for the
# connection's writer; a peer that does not read must not hold the refusing task.
REFUSE_TIMEOUT_S = 1.0

STREAMS_PEER = "streams-peer"
STREAMS_PROTOCOL = "streams-protocol"
HANDSHAKES = "handshakes"
HANDSHAKES_IP = "handshakes-ip"


class Limits:
    """One node's inbound limits and what they refused (by kind)."""

    def __init__(
        self,
        *,
        streams_per_peer: int = MAX_INBOUND_STREAMS_PER_PEER,
        streams_per_protocol: int = MAX_INBOUND_STREAMS_PER_PROTOCOL,
        handshakes: int = MAX_HANDSHAKES,
        handshakes_per_ip: int = MAX_HANDSHAKES_PER_IP,
    ) -> None:
        self.streams_per_peer = streams_per_peer
        self.streams_per_protocol = streams_per_protocol
        self.max_handshakes = handshakes
        self.handshakes_per_ip = handshakes_per_ip
        self.streams: Counter[Any] = Counter()  # peer -> inbound streams in flight
        self.protocol_streams: Counter[tuple[Any, str]] = Counter()  # (peer, protocol) -> ...
        self.handshakes = 0
        self.handshakes_by_ip: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # kind -> streams or connections refused
        self.peak: Counter[str] = Counter()  # the most ever held: streams of one peer, ...
        self._logged: set[str] = set()

    # -- the counters (pure: no I/O) --
    def admit_stream(self, peer: Any) -> bool:
        if self.streams[peer] >= self.streams_per_peer:
            self.refused[STREAMS_PEER] += 1
            return False
        self.streams[peer] += 1
        self.peak["streams-peer"] = max(self.peak["streams-peer"], self.streams[peer])
        return True

    def release_stream(self, peer: Any) -> None:
        _decrement(self.streams, peer)

    def admit_protocol(self, peer: Any, protocol: str) -> bool:
        key = (peer, protocol)
        if self.protocol_streams[key] >= self.streams_per_protocol:
            self.refused[STREAMS_PROTOCOL] += 1
            return False
        self.protocol_streams[key] += 1
        self.peak["streams-protocol"] = max(
            self.peak["streams-protocol"], self.protocol_streams[key]
        )
        return True

    def release_protocol(self, peer: Any, protocol: str) -> None:
        _decrement(self.protocol_streams, (peer, protocol))

    def admit_handshake(self, ip: str) -> bool:
        if self.handshakes >= self.max_handshakes:
            self.refused[HANDSHAKES] += 1
            return False
        if self.handshakes_by_ip[ip] >= self.handshakes_per_ip:
            self.refused[HANDSHAKES_IP] += 1
            return False
        self.handshakes += 1
        self.handshakes_by_ip[ip] += 1
        self.peak["handshakes"] = max(self.peak["handshakes"], self.handshakes)
        return True

    def release_handshake(self, ip: str) -> None:
        self.handshakes = max(0, self.handshakes - 1)
        _decrement(self.handshakes_by_ip, ip)

    # -- the hooks --
    def install(self, host: IHost) -> None:
        """Wrap `host`'s swarm stream handler, its protocol handlers (now and later) and
        its inbound connection upgrade with these limits."""
        swarm = host.get_network()
        stream_handler = swarm.common_stream_handler  # type: ignore[attr-defined]

        async def limited_stream(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id
            if not self.admit_stream(peer):
                self._log_once(STREAMS_PEER, peer)
                await _reset(stream)
                return
            try:
                await stream_handler(stream)
            finally:
                self.release_stream(peer)

        swarm.common_stream_handler = limited_stream  # type: ignore[attr-defined]

        mux = host.get_mux()
        for protocol, handler in list(mux.handlers.items()):
            mux.handlers[protocol] = self._guard(protocol, handler)
        add_handler = mux.add_handler

        def limited_add_handler(protocol: Any, handler: Any) -> None:
            add_handler(protocol, self._guard(protocol, handler))

        mux.add_handler = limited_add_handler  # type: ignore[method-assign]

        upgrade = swarm.upgrade_inbound_raw_conn  # type: ignore[attr-defined]

        async def limited_upgrade(raw_conn: IRawConnection, maddr: Any) -> Any:
            ip = _ip_of(raw_conn)
            if not self.admit_handshake(ip):
                self._log_once(HANDSHAKES, ip)
                with trio.move_on_after(REFUSE_TIMEOUT_S), suppress(Exception):
                    await raw_conn.close()
                raise SwarmException(f"inbound handshakes in progress at their limit ({ip})")
            try:
                return await upgrade(raw_conn, maddr)
            finally:
                self.release_handshake(ip)

        swarm.upgrade_inbound_raw_conn = limited_upgrade  # type: ignore[attr-defined]

    def _guard(self, protocol: Any, handler: Any) -> Any:
        if handler is None or protocol is None or getattr(handler, "_fflnode_limited", False):
            return handler
        name = str(protocol)

        async def limited(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id
            if not self.admit_protocol(peer, name):
                self._log_once(STREAMS_PROTOCOL, peer, name)
                await _reset(stream)
                return
            try:
                await handler(stream)
            finally:
                self.release_protocol(peer, name)

        limited._fflnode_limited = True  # type: ignore[attr-defined]
        return limited

    def _log_once(self, kind: str, who: Any, protocol: str = "") -> None:
        """One line per kind, the first time: `refused` counts every refusal, and a flood
        must not write a line per refused stream (nor is a refusal an offence)."""
        if kind in self._logged:
            return
        self._logged.add(kind)
        on = f" on {protocol}" if protocol else ""
        log.info(
            "refused an inbound %s from %s%s: at its limit (counted in the metrics; later "
            "refusals are only counted)",
            kind,
            who,
            on,
        )


def _decrement(counter: Counter, key: Any) -> None:
    if counter[key] <= 1:
        counter.pop(key, None)  # keys of gone peers must not accumulate
    else:
        counter[key] -= 1


async def _reset(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(REFUSE_TIMEOUT_S), suppress(Exception):
        await stream.reset()


def _ip_of(conn: IRawConnection) -> str:
    try:
        remote = conn.get_remote_address()
    except Exception:  # transports raise assorted types for a socket already gone
        remote = None
    return str(remote[0]) if remote else "?"


__all__ = ["Limits"]
