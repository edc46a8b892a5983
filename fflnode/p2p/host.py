"""Building the libp2p host: TCP + Noise + yamux only, chosen explicitly, tuned as measured.

Owns every py-libp2p knob fflnode turns, in one place:
* Security and muxing are passed explicitly (`sec_opt`, `muxer_opt`): Noise and yamux,
  nothing else is offered, so a peer cannot negotiate us down to plaintext or mplex.
* yamux tuning (DESIGN.md, measured on this machine): one yamux frame = one Noise message
  (MAX_MESSAGE_SIZE = 65519) and no credit release on partial reads lifts bulk throughput
  from ~250 to ~400 MB/s. Both must be set before any host is built.
* GossipSub heartbeat at 1 s (the library default, 120 s, delays mesh formation by
  minutes) and a spam limit sized to the run (the default 10 msg/s per forwarding peer
  and topic silently drops a mesh's relayed heartbeats once a run has ~10 nodes).
* The library's auto-connector (dial every peerstore peer until (low + high) / 2
  connections, every 30 s) is stopped once the host runs: fflnode dials exactly the
  run's members it learns from heartbeats, and a dead member must not be redialled in
  a loop. ConnectionConfig alone cannot turn it off (its target stays 150).
* Leaving `host.run` does not close the connections (peers keep seeing us for
  seconds); `running_host` closes the host first.
* The `libp2p` logger is routed into the node's logging (it is silent otherwise), its
  warnings and errors at most one line per call site a minute (`LibraryLogLimit`): the
  library writes one per hostile input, and a node's log must stay bounded under attack.
* Reads from the raw connection go through a read-ahead buffer (`_ReadAhead`): Noise
  reads a 2-byte length then its 65535-byte message, each one socket receive and one
  trip through trio; one 256 KiB receive now feeds ~4 messages. Measured with
  tools/bench_bulk.py (256 MiB one way, 5 interleaved repeats, one run): the receiving
  end's CPU fell from 0.87 to 0.64 s, one stream went from 218 (191-312) to 317
  (205-412) MB/s.
* What one peer or address may hold at once is bounded (fflnode.p2p.limits): inbound
  streams in flight per peer and per protocol, handshakes in progress in all and per
  IP; the excess is reset or closed at once and counted, never queued.
* Every connection passes the access gate (fflnode.p2p.gate) at its security upgrade:
  a psk mismatch fails in milliseconds instead of a 10 s timeout, and only allowed,
  unbanned peers get a muxed connection. Pubsub messages whose origin or forwarder the
  gate refuses are ignored before GossipSub validates (and scores) them: see
  `GuardedPubsub.push_msg`.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

# Read by yamux at call time; set before the first host exists (DESIGN.md).
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

import libp2p.identity.identify.identify as _identify  # noqa: E402
import libp2p.identity.identify_push.identify_push as _identify_push  # noqa: E402
import libp2p.pubsub.pubsub as _pubsub_module  # noqa: E402
import libp2p.stream_muxer.yamux.yamux as _yamux  # noqa: E402
import multiaddr  # noqa: E402
import trio  # noqa: E402
from libp2p import new_host  # noqa: E402
from libp2p.abc import IHost, INetStream, IRawConnection, ISecureConn  # noqa: E402
from libp2p.crypto.keys import KeyPair  # noqa: E402
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519  # noqa: E402
from libp2p.exceptions import ParseError  # noqa: E402
from libp2p.io.exceptions import IncompleteReadError  # noqa: E402
from libp2p.network.config import ConnectionConfig  # noqa: E402
from libp2p.network.connection.raw_connection import RawConnection  # noqa: E402
from libp2p.network.stream.exceptions import StreamError  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402
from libp2p.protocol_muxer.exceptions import MultiselectCommunicatorError  # noqa: E402
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator  # noqa: E402
from libp2p.pubsub.gossipsub import GossipSub  # noqa: E402
from libp2p.pubsub.pb import rpc_pb2  # noqa: E402
from libp2p.pubsub.pubsub import Pubsub  # noqa: E402
from libp2p.pubsub.score import ScoreParams, TopicScoreParams  # noqa: E402
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID  # noqa: E402
from libp2p.security.noise.transport import Transport as NoiseTransport  # noqa: E402

from fflnode import __version__  # noqa: E402
from fflnode.errors import error_kind  # noqa: E402
from fflnode.p2p import addrs, records  # noqa: E402
from fflnode.p2p.gate import Gate  # noqa: E402
from fflnode.p2p.limits import INBOUND_UPGRADE_TIMEOUT_S, NEGOTIATE_TIMEOUT_S, Limits  # noqa: E402
from fflnode.p2p.reach import Advertiser  # noqa: E402

# What identify tells other libp2p peers (js, go, py) this node is; the library would
# say "py-libp2p/0.8.1". Read by identify at reply time, so set once, here.
AGENT_VERSION = f"fflnode/{__version__}"
_identify.AGENT_VERSION = AGENT_VERSION
_library_identify_message = _identify._mk_identify_protobuf


def _identify_message(host: IHost, observed: multiaddr.Multiaddr | None) -> Any:
    """py-libp2p's identify reply, minus any unspecified listen address: the library
    falls back to the raw transport addresses (0.0.0.0) when the advertised list is
    empty, which would tell peers to dial their own machine."""
    msg = _library_identify_message(host, observed)
    keep = [a for a in msg.listen_addrs if addrs.scope(_maddr_or_none(a)) != addrs.UNSPECIFIED]
    del msg.listen_addrs[:]
    msg.listen_addrs.extend(keep)
    return msg


def _maddr_or_none(raw: bytes) -> multiaddr.Multiaddr | None:
    try:
        return multiaddr.Multiaddr(raw)
    except Exception:  # multiaddr raises assorted types
        return None


_identify._mk_identify_protobuf = _identify_message
_identify_push._mk_identify_protobuf = _identify_message  # imported by name there

_library_multistream_read = MultiselectCommunicator.read


async def _multistream_read(self: MultiselectCommunicator) -> str:
    """py-libp2p 0.8.1 decodes each multistream line as UTF-8 and lets UnicodeDecodeError
    escape: inbound, out of the stream's task into the connection's nursery, which takes
    the whole swarm down (tools/fuzz_daemon.py --seed 13: one line of garbage on a new
    stream, and the node exited 1); outbound, out of `new_stream` into the caller. Here
    it is the library's own typed error, which both ends already handle (the stream is
    reset, the negotiation fails)."""
    try:
        return await _library_multistream_read(self)
    except UnicodeDecodeError as e:
        raise MultiselectCommunicatorError(f"multistream line is not UTF-8: {e.reason}") from e


MultiselectCommunicator.read = _multistream_read  # type: ignore[method-assign]

# What py-libp2p's own pubsub stream handler catches (and handles) from its reader.
LIBRARY_HANDLED_ERRORS = (StreamError, ParseError, IncompleteReadError)

# 65535-byte Noise messages minus the 16-byte AEAD tag minus yamux's 12-byte header,
# rounded so one yamux frame fits one Noise message exactly.
YAMUX_MAX_MESSAGE_SIZE = 65519
_yamux.MAX_MESSAGE_SIZE = YAMUX_MAX_MESSAGE_SIZE

# One socket receive per this many bytes of Noise traffic: 4 full Noise messages. 64 KiB
# saved half as much CPU; 1 MiB no more than 256 KiB (tools/bench_bulk.py, same run).
READ_AHEAD_BYTES = 256 << 10

# Resetting a stream whose bytes broke the library sends one yamux frame: a peer that does
# not read must not hold the stream's task longer than this.
STREAM_RESET_TIMEOUT_S = 1.0
# Characters of a library exception's message in the line about the peer whose bytes
# raised it: enough for the exception to be recognised (fuzzer findings were shorter).
LIBRARY_ERROR_CHARS = 80
# Closing the host tells peers we are gone; it takes ~0.1 s, never more than this.
HOST_CLOSE_TIMEOUT_S = 2.0
GOSSIPSUB_PROTOCOLS = ["/meshsub/1.1.0", "/meshsub/1.0.0"]
GOSSIP_HEARTBEAT_S = 1  # mesh maintenance period; the library's default is 120 s
# Mesh degree: the usual D=6 (D_lo 4, D_hi 12). Small runs simply have fewer peers.
GOSSIP_D, GOSSIP_D_LO, GOSSIP_D_HI = 6, 4, 12
# Each node publishes at most ~3 messages/s (heartbeat, merge announcements), and a
# forwarding peer relays those of every other node: allow 4 per node of the run, never
# below the library's 10.
# Bursts come on top: every change of a start or merge proposal is announced at once,
# and 16 nodes changing their minds as peers come and go exceeded 4 per node, so
# heartbeats were dropped as a rate violation and peers were suspected.
GOSSIP_MSGS_PER_NODE_PER_S = 8
# Delivered messages wait in the topic's subscription channel until membership reads
# them; py-libp2p drops what does not fit its 32 (a WARNING, and a lost heartbeat).
# 16 nodes publish ~3 a second each and a loaded event loop stalls for seconds: hold
# 10 s of the run's traffic. Bounded: 512 x wire.MAX_PUBSUB_BYTES = 32 MiB at most.
SUBSCRIPTION_CHANNEL_SIZE = 512
_pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = SUBSCRIPTION_CHANNEL_SIZE
# Each sender's signed peer record is verified once per record, not once per RPC.
records.install()
# Eclipse protection and IP colocation, as deployed across hosts (config [pubsub]):
# GossipSub's own default of 3 distinct IPs in a mesh, and 3 peers per IP before their
# score drops. A testnet on one IP sets 1 and a number above its node count.
MIN_MESH_DIVERSITY_IPS = 3
IP_COLOCATION_THRESHOLD = 3


def build_host(
    key_pair: KeyPair,
    *,
    psk: str | None = None,
    gate: Gate | None = None,
    advertiser: Advertiser | None = None,
    limits: Limits | None = None,
    on_hostile: Callable[[str, str, str], None] | None = None,
) -> IHost:
    """A libp2p host offering only Noise and yamux, over TCP, behind an access gate.

    `psk`: the private-network key, 64 hex characters. `gate`: who may connect; the
    default admits everyone but still diagnoses a psk mismatch in milliseconds.
    `advertiser`: what the host announces in identify (and heartbeats read the same);
    the default advertises concrete interface addresses, never a wildcard. `limits`:
    inbound streams and handshakes one peer or address may hold (default: Limits()).
    `on_hostile(peer, reason, detail)` hears of every inbound stream whose negotiation
    or handler raised (the stream is reset; the swarm carries on).
    """
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519().private_key)
    advertiser = advertiser or Advertiser([])
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_ID: noise},
        muxer_opt={_yamux.PROTOCOL_ID: _yamux.Yamux},
        psk=psk,
        connection_config=ConnectionConfig(
            min_connections=0,
            low_watermark=0,
            # Per-connection deadlines fflnode relies on, stated rather than inherited:
            # an inbound handshake (Noise + yamux) and each stream's protocol negotiation.
            inbound_upgrade_timeout=INBOUND_UPGRADE_TIMEOUT_S,
            inbound_stream_protocol_negotiation_timeout=NEGOTIATE_TIMEOUT_S,
        ),
        addrs_factory=advertiser,
    )
    advertiser.bind(host)
    _install_read_ahead(host)  # first: the gate then wraps it and sees the first bytes
    gate = gate or Gate()
    gate.install(host, private=psk is not None)
    _GATES[host] = gate
    _contain_inbound_streams(host, on_hostile or _ignore)
    (limits or Limits()).install(host)  # outside the containment: refusals come first
    return host


def _contain_inbound_streams(host: IHost, on_hostile: Callable[[str, str, str], None]) -> None:
    """Whatever an inbound stream's negotiation or handler raises ends that stream only.

    py-libp2p runs each inbound stream in a task of its connection's nursery: an
    exception that escapes it (a library parser choking on a peer's bytes) takes the
    connection, then the swarm and the node down. fflnode's own handlers contain their
    errors; this is the backstop for the library's (identify, ping, negotiation): the
    stream is reset, and the peer is charged with an offence."""
    swarm = host.get_network()
    handler = swarm.common_stream_handler  # type: ignore[attr-defined]

    async def contained(stream: INetStream) -> None:
        try:
            await handler(stream)
        except Exception as e:  # the peer's bytes made the library raise
            peer = str(stream.muxed_conn.peer_id)
            on_hostile(
                peer,
                "stream",
                f"inbound stream the library chokes on: {error_kind(e, LIBRARY_ERROR_CHARS)}",
            )
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(STREAM_RESET_TIMEOUT_S),
                suppress(Exception),
            ):
                await stream.reset()

    swarm.common_stream_handler = contained  # type: ignore[attr-defined]


# Each host's access gate, for the pubsub built on that host (build_pubsub).
_GATES: weakref.WeakKeyDictionary[IHost, Gate] = weakref.WeakKeyDictionary()


def _install_read_ahead(host: IHost) -> None:
    upgrader = host.get_network().upgrader  # type: ignore[attr-defined]
    upgrade = upgrader.upgrade_security

    async def upgrade_security(
        raw_conn: IRawConnection, is_initiator: bool, peer_id: ID | None = None
    ) -> ISecureConn:
        return await upgrade(_ReadAhead(raw_conn), is_initiator, peer_id)

    upgrader.upgrade_security = upgrade_security


class _ReadAhead(RawConnection):
    """The raw (psk-decrypted) connection, read READ_AHEAD_BYTES at a time.

    Subclasses RawConnection as the gate's wrapper does and delegates everything; writes
    go straight through (a bound method set on the instance). `read(n)` returns at most
    n bytes, from the buffer when it holds any, so a short read is still possible and
    EOF is still b"" (callers loop, as Noise's read_exactly does).
    """

    def __init__(self, conn: IRawConnection) -> None:
        self._conn = conn
        self.is_initiator = getattr(conn, "is_initiator", False)
        self.write = conn.write  # type: ignore[method-assign]
        self._buf = b""
        self._pos = 0

    async def read(self, n: int | None = None) -> bytes:
        if self._pos >= len(self._buf):
            if n is not None and n >= READ_AHEAD_BYTES:
                return await self._conn.read(n)
            data = await self._conn.read(READ_AHEAD_BYTES)
            if n is None or len(data) <= n:
                return data
            self._buf, self._pos = data, 0
        end = len(self._buf) if n is None else min(len(self._buf), self._pos + n)
        out = self._buf[self._pos : end]
        self._pos = end
        if end >= len(self._buf):
            self._buf, self._pos = b"", 0
        return out

    async def close(self) -> None:
        await self._conn.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._conn.get_remote_address()

    def get_transport_addresses(self) -> list[Any]:
        return self._conn.get_transport_addresses()

    def get_connection_type(self) -> Any:
        return self._conn.get_connection_type()


@asynccontextmanager
async def running_host(host: IHost, listen: Sequence[multiaddr.Multiaddr]) -> AsyncIterator[IHost]:
    """`host.run(listen)` with the auto-connector stopped and the host closed on exit."""
    async with host.run(listen):
        await host.get_network().auto_connector.stop()  # type: ignore[attr-defined]
        try:
            yield host
        finally:
            await close_host(host)


async def close_host(host: IHost) -> None:
    """Disconnect every peer and stop listening; bounded, and safe to call twice."""
    with trio.CancelScope(shield=True), trio.move_on_after(HOST_CLOSE_TIMEOUT_S):
        await host.close()


class GuardedPubsub(Pubsub):
    """py-libp2p's Pubsub, made to survive what a peer sends it.

    The library lets a protobuf DecodeError (1 MiB of random bytes on /meshsub/1.1.0),
    and whatever else a peer's RPC makes its parser, signature check or router raise,
    escape its per-stream reader and per-message tasks, which takes the whole swarm down.
    Here any such exception ends only that peer's pubsub stream (reset; the library
    forgets the peer as it does for an oversized RPC) or drops only that message, and is
    reported to `on_hostile(peer, reason, detail)`, which counts it against the peer.
    The library's own handling of closed streams is left as it is.

    Messages whose origin or forwarder `gate` refuses (banned, or not on the allowlist)
    are ignored before the library validates them. A topic validator can only accept or
    reject, and GossipSub charges a rejection to the peer that forwarded the message,
    not to its origin: a peer banned here, still relayed by an honest peer that has not
    banned it (yet), would cost that honest peer 10 points a message, and below -50 its
    own heartbeats are dropped unread. Measured by tools/fuzz_daemon.py in mode "ban": a
    flood banned at different moments by two daemons graylisted each in the other's eyes,
    and their merge timed out with no live member. The library's own blacklist has the
    same "ignore" semantics but is only reachable from the node's wiring; the gate is.
    """

    def __init__(
        self,
        host: IHost,
        router: GossipSub,
        on_hostile: Callable[[str, str, str], None],
        gate: Gate | None = None,
    ) -> None:
        super().__init__(host, router)
        self.on_hostile = on_hostile
        self.gate = gate

    async def continuously_read_stream(self, stream: INetStream) -> None:
        try:
            await super().continuously_read_stream(stream)
        except LIBRARY_HANDLED_ERRORS:
            raise  # stream_handler resets the stream and forgets the peer
        except Exception as e:  # DecodeError and whatever else the peer's bytes caused
            peer = stream.muxed_conn.peer_id
            self.on_hostile(
                str(peer),
                "pubsub",
                f"pubsub RPC the library chokes on: {error_kind(e, LIBRARY_ERROR_CHARS)}",
            )
            with trio.CancelScope(shield=True), suppress(Exception):
                await stream.reset()
            self._handle_dead_peer(peer)

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        if self.gate is not None and not self.gate.validate_announcement(msg_forwarder, msg):
            return  # ignored, never rejected: no score charged to an honest forwarder
        try:
            await super().push_msg(msg_forwarder, msg)
        except Exception as e:  # e.g. a key that fails to deserialize in signature checks
            self.on_hostile(
                str(msg_forwarder),
                "pubsub",
                f"pubsub message the library chokes on: {error_kind(e, LIBRARY_ERROR_CHARS)}",
            )

    async def _replay_recent_messages(self, peer_id: ID, topic: str) -> None:
        """Not done. The library replays its whole message cache of the topic (3
        heartbeats), one RPC per message, to every peer that subscribes or resubscribes
        after a reconnect: ~100 RPCs each time with 16 nodes, 27 % of an idle node's CPU
        in a 16-node testnet on 2 cores (py-spy). fflnode repeats every announcement
        each HEARTBEAT_S until it is moot (heartbeats, start, merge and state proposals
        and hashes), so a newly subscribed peer misses nothing a replay would give it."""
        return None


# Peer scoring (GossipSub v1.1). The library's defaults score nothing and graylist no
# one. Here: each invalid message (our validator's rejections, which the library counts
# per topic) costs 10 points, capped at 100; peers beyond `ip_colocation_threshold` on
# one IP lose 10 x excess^2. Below -10 a peer gets no gossip, below -50 its publishes
# are dropped, below -80 it is ignored: 8 invalid messages, or 3 peers too many on one
# IP, and a peer is out of the mesh (our own gate bans at access.blacklist_after).
INVALID_MESSAGE_PENALTY, INVALID_MESSAGE_CAP = 10.0, 100.0
IP_COLOCATION_WEIGHT = 10.0
GOSSIP_THRESHOLD, PUBLISH_THRESHOLD, GRAYLIST_THRESHOLD = -10.0, -50.0, -80.0


def score_params(ip_colocation_threshold: int) -> ScoreParams:
    return ScoreParams(
        p4_invalid_messages=TopicScoreParams(
            weight=INVALID_MESSAGE_PENALTY, cap=INVALID_MESSAGE_CAP
        ),
        p7_ip_colocation_weight=IP_COLOCATION_WEIGHT,
        p7_ip_colocation_threshold=ip_colocation_threshold,
        publish_threshold=PUBLISH_THRESHOLD,
        gossip_threshold=GOSSIP_THRESHOLD,
        graylist_threshold=GRAYLIST_THRESHOLD,
    )


def build_pubsub(
    host: IHost,
    run_nodes: int,
    on_hostile: Callable[[str, str, str], None] | None = None,
    *,
    mesh_diversity_ips: int = MIN_MESH_DIVERSITY_IPS,
    ip_colocation_threshold: int = IP_COLOCATION_THRESHOLD,
) -> tuple[Pubsub, GossipSub]:
    """Pubsub with GossipSub, tuned for a run of `run_nodes`; `on_hostile(peer, reason,
    detail)` hears of every RPC or message that made the library raise. The defences
    default to production settings (config [pubsub]); a one-IP testnet relaxes them."""
    router = GossipSub(
        GOSSIPSUB_PROTOCOLS,
        degree=GOSSIP_D,
        degree_low=GOSSIP_D_LO,
        degree_high=GOSSIP_D_HI,
        heartbeat_interval=GOSSIP_HEARTBEAT_S,
        max_messages_per_topic_per_second=float(max(10, GOSSIP_MSGS_PER_NODE_PER_S * run_nodes)),
        min_mesh_diversity_ips=mesh_diversity_ips,
        score_params=score_params(ip_colocation_threshold),
    )
    return GuardedPubsub(host, router, on_hostile or _ignore, _GATES.get(host)), router


def _ignore(peer: str, reason: str, detail: str) -> None:
    return None


REDUNDANT_ERROR_LOGGERS = (
    "libp2p.transport.tcp.tcp",
    "libp2p.host.basic_host",
    "libp2p.protocol_muxer.multiselect_client",
)


# py-libp2p logs a WARNING or an ERROR for each hostile input at dozens of call sites (an
# identify push it cannot parse, a pubsub RPC over its size limit, a signed record that
# does not verify, a peer it cannot flush messages to), with or without the peer's ID:
# tools/fuzz_daemon.py measured 1,314 such lines from one attacker in 25 s, 58 per second.
# fflnode promises a bounded log per offending peer (fflnode.p2p.peerlog), so the
# library's lines are limited per call site: its first line, then at most one per window
# saying how many were held back meanwhile. Call sites are a few hundred lines of
# library code, so the table is small and bounded whatever a peer sends.
LIBRARY_LOG_WINDOW_S = 60.0
# ... and in all: one attacker reaches some 15 library call sites (identify, pubsub,
# yamux, swarm), so one line per site a minute was still 15 lines a minute about one peer
# (tools/fuzz_daemon.py, 189 lines in 21 minutes against its bound of 20 + 4 a minute).
# Library lines are diagnostics for fflnode's own per-peer lines (fflnode.p2p.peerlog),
# which name the offence and count it: 3 a window keep the first signs of trouble.
LIBRARY_LINES_PER_WINDOW = 3


class LibraryLogLimit(logging.Filter):
    """A handler filter: py-libp2p records at WARNING and above pass at most once per
    call site (logger, file, line) per `window_s`, and at most `per_window` of them in
    all per `window_s`; the first to pass from a site after being held names how many
    were held back there. Every other record passes untouched."""

    def __init__(
        self,
        window_s: float = LIBRARY_LOG_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        per_window: int = LIBRARY_LINES_PER_WINDOW,
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self.per_window = per_window
        self._sites: dict[tuple[str, str, int], list[float]] = {}  # site -> [last, held]
        self._passed: collections.deque[float] = collections.deque()  # times, last window
        self.held = 0  # records held back in all (for tests)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith("libp2p"):
            return True
        site = (record.name, record.pathname, record.lineno)
        now = self.clock()
        while self._passed and now - self._passed[0] >= self.window_s:
            self._passed.popleft()
        entry = self._sites.get(site)
        site_quiet = entry is not None and entry[0] >= 0 and now - entry[0] < self.window_s
        if site_quiet or len(self._passed) >= self.per_window:
            if entry is None:  # held by the global budget before its first line
                entry = self._sites[site] = [-1.0, 0]
            entry[1] += 1
            self.held += 1
            return False
        held = int(entry[1]) if entry is not None else 0
        self._sites[site] = [now, 0]
        self._passed.append(now)
        if held:
            record.msg = f"{record.msg} ({held} similar lines held back)"
        return True


def route_libp2p_logging(level: int) -> None:
    """Send py-libp2p's own records through the node's handlers, at `level` or above.

    The library logs routine events (every stream opened or reset) at INFO: those are
    shown only when the node runs at debug; its warnings and errors always pass, at most
    one per call site a minute (LibraryLogLimit, added to the root logger's handlers:
    call this after installing them).
    """
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, LibraryLogLimit) for f in handler.filters):
            handler.addFilter(LibraryLogLimit())
    lib_level = level if level <= logging.DEBUG else max(level, logging.WARNING)
    lib = logging.getLogger("libp2p")
    lib.setLevel(lib_level)
    lib.propagate = True
    # Some library modules pin their own logger to INFO at import; bring them in line.
    for name, logger in logging.Logger.manager.loggerDict.items():
        if name.startswith("libp2p.") and isinstance(logger, logging.Logger) and logger.level:
            logger.setLevel(lib_level)
    # A dial to a dead or refusing peer makes these log ERROR lines on every attempt (4 per
    # dial); fflnode reports the failure once, with the peer and the reason, where it acts
    # on it. They stay visible at debug.
    for name in REDUNDANT_ERROR_LOGGERS:
        logging.getLogger(name).setLevel(lib_level if level <= logging.DEBUG else logging.CRITICAL)
