"""A fuzzer that is not its own oracle: real `fflnode run` daemons under hostile bytes.

Owns one fuzz session end to end: two honest daemons (`python -m fflnode run`, each its
own process, config, data dir, log file and NOTIFY_SOCKET) training a real run (task
digits) over real libp2p connections, and an attacker process, this one, with its own
py-libp2p host (fflnode.p2p.host.build_host: the attacker is only a client) that sends
them structure-aware mutations of valid messages of every kind, on every protocol they
speak, fflnode's and libp2p's own, down to raw TCP bytes before and inside the Noise
handshake.

Theory of operation.
* Inputs come from a seeded generator written here from the protocol's description
  (`Forge` builds valid messages, `Mutator` breaks them): fflnode.wire is never asked
  what is valid, so a validator that wrongly accepts or refuses does not also decide
  what the fuzzer expects. Every input names its protocol, its kind, its mutation and
  the worker, episode and seed that replay it.
* The attacker measures each input from its side: whether the daemon answered (a reply,
  a reset, a close, a refusal) or kept a stream open it may keep open, and how long
  after the input's last byte. An input whose stream neither answers nor closes within
  its handler's documented deadline (the constants under "limits") + SLACK_S is a hang;
  one that answered but is still open then "lingered" (counted with the hangs).
* The attacker is one process and one trio loop, and a loop that runs late adds its
  lateness to every latency it measures. It measures its own lag (a ticker) and reads
  each daemon's (their /metrics), reports both per session and beside every hang, and
  starts no episode while its own loop is over PACE_LAG_S late. Nothing is subtracted
  from a latency and no deadline is shortened: pacing only spends the attacker's CPU on
  fewer inputs, measured on time.
* The oracle watches the processes, not fflnode's opinion of itself: both stay alive
  until they finish; their training rounds keep advancing (STATUS= lines on the notify
  socket); they exit 0 with equal merged hashes (result.json); their peak RSS (VmHWM,
  sampled from /proc) stays under RSS_LIMIT_MB; their logs hold no Traceback and no
  "node crashed", and grow by at most LOG_LINES_PER_PEER_PER_MIN lines a minute (plus
  LOG_LINES_PER_PEER_FIXED) about each offending peer identity, and by at most
  LOG_LINES_OTHER_PER_MIN a minute in all beyond the run's own lines.
* Modes. "outsider": the attacker is no member and blacklist_after is 1,000,000, so it
  keeps reaching every handler. "ban": the default blacklist_after (20); the attacker
  takes a new identity each time both daemons banned the last one, so bans, refused
  dials and the gate are exercised over and over. "insider": run.nodes = 3 and the
  attacker is the third member: it copies the run descriptor from a daemon's heartbeat,
  heartbeats, agrees at the start barrier (fflnode.agreement run on its side), then
  answers the daemons' pulls of its Delta with hostile bulk answers (templates pulled
  from the daemons themselves, so lossy-codec bodies are real holo/topk/sketch layouts)
  and sends member requests; it goes silent a few rounds before the end so the two
  daemons merge between themselves (what this mode leaves out: see `Insider`). A second,
  outsider identity fuzzes the rest meanwhile.

Must never: kill a process it did not start, wait without a deadline, or loop without a
bound (every loop ends at its budget, its deadline or its session's end).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.pb import rpc_pb2

from fflnode import metrics as fmetrics
from fflnode.p2p import bulk as fbulk
from fflnode.p2p import fastpath as ffast
from fflnode.p2p import libp2p_tls as ftls
from fflnode.p2p import streams as fstreams
from fflnode.p2p.gate import refusal
from fflnode.p2p.host import build_host, running_host
from fflnode.p2p.membership import PING_TIMEOUT_S

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- limits
# A loaded 2-core machine (two daemons training, the attacker at full speed) delays any
# answer by scheduling alone: seconds, measured up to ~6 s for a reset in the first long
# runs. A handler later than its documented deadline plus this is a hang.
SLACK_S = 15.0
# Peak RSS (VmHWM) each daemon must stay under. A 2-node digits run peaks at ~465 MB
# without any attacker (measured on this machine); 1 GiB leaves room for the library's
# per-connection state under attack and catches any per-input leak worth the name.
RSS_LIMIT_MB = 1024
# Log lines a daemon may write about one offending identity: what fflnode.p2p.peerlog
# promises (one line per peer per minute) plus the few one-off lines each identity earns
# (joined, banned, refused at the gate, refused as a member), with room.
LOG_LINES_PER_PEER_FIXED = 20
LOG_LINES_PER_PEER_PER_MIN = 4
# Log lines beyond the run's own that name no peer (the library's lines about addresses,
# a refusal keyed by IP): a bounded trickle, never one per input.
LOG_LINES_OTHER_FIXED = 40
LOG_LINES_OTHER_PER_MIN = 10
# A daemon whose round counter does not move for this long while it trains is stalled.
# An insider that stalls an answer holds a round up to the body deadline (~15 s), and
# the machine is loaded: 120 s is far beyond anything honest.
ROUND_STALL_LIMIT_S = 120.0
STARTUP_TIMEOUT_S = 120.0  # torch + libp2p imports on a loaded 2-core machine
FINISH_TIMEOUT_S = 600.0  # after fuzzing stops: the remaining rounds and the merge
RSS_SAMPLE_S = 0.5  # VmHWM is a high-water mark: sampling often only adds detail
# Each daemon's /metrics is read this often for its event-loop lag and open streams
# (the daemon keeps its worst lag over 10 s, so nothing between two reads is lost).
SCRAPE_S = 2.0
# The attacker's own loop lag is kept this long, to say how late the attacker itself
# was while an input hung (a hang lasts its deadline + SLACK_S, at most ~150 s).
ATTACKER_LAG_KEEP_S = 300.0
NOTIFY_BUFFER_BYTES = 4 << 20

# What the daemon waits for before it gives up on us, per handler (their documentation):
# fflnode's stream handlers (fflnode.p2p.streams, fflnode.p2p.bulk, membership), then
# py-libp2p 0.8.1's: identify/push reads one message under a 10 s fail_after, ping waits
# RESP_TIMEOUT = 10 s for 32 bytes, inbound multistream negotiation and the inbound
# security + muxer upgrade each have a 10 s timeout (ConnectionConfig defaults).
MESSAGE_S = fstreams.MESSAGE_STALL_S
IDLE_S = fbulk.SERVE_IDLE_TIMEOUT_S
FPING_S = PING_TIMEOUT_S
IDPUSH_S = 10.0
LPING_S = 10.0
NEGOTIATE_S = 10.0
UPGRADE_S = 10.0
# exchange.round_timeout_s in the daemons' config. A member's pull of a round waits this
# long for the round; a daemon pulling from a member allows it this long before its first
# answer (bulk.pull's wait_s), on top of the transfer's own deadline.
ROUND_TIMEOUT_S = 20.0
# The daemon's documented deadline for a member's pull of our Delta, or ours of theirs:
# the round's wait plus the transfer deadline of 1 MiB (a digits pull, state parts
# included, is smaller).
MEMBER_SHARD_S = fstreams.deadline_s(1 << 20, ROUND_TIMEOUT_S)
# Streams that may legitimately stay open as long as the connection does: GossipSub's
# streams are long-lived by design (a peer sends RPCs on one for hours), and a yamux
# frame that began and stopped holds only the attacker's own connection.
LONG_LIVED = None

PROTO_SHARD = "/fflnode/shard/1.0.0"
PROTO_MERGE = "/fflnode/merge/1.0.0"
PROTO_STATE = "/fflnode/state/1.0.0"
PROTO_FPING = "/fflnode/ping/1.0.0"
PROTO_ID = "/ipfs/id/1.0.0"
PROTO_IDPUSH = "/ipfs/id/push/1.0.0"
PROTO_LPING = "/ipfs/ping/1.0.0"
PROTO_FASTOFFER = ffast.OFFER_PROTOCOL
PROTO_FASTFALLBACK = ffast.FALLBACK_PROTOCOL
FASTTLS = "fastpath-tls"  # the fast path's TCP port: the stats' name for it
# The offer stream's and the TLS port's deadlines (fflnode.p2p.fastpath).
FASTOFFER_S = ffast.OFFER_TIMEOUT_S
FASTTLS_S = ffast.HANDSHAKE_TIMEOUT_S
PROTO_MESH11 = "/meshsub/1.1.0"
PROTO_MESH10 = "/meshsub/1.0.0"
MULTISTREAM = b"/multistream/1.0.0\n"
PUBSUB_PREFIX = b"libp2p-pubsub:"

# How often each family is picked (relative). Pubsub RPCs are cheap for both sides and
# reach the most code (signature check, validators, every announcement kind); each
# stream-protocol input costs a stream (a handshake of two round trips), raw TCP and
# Noise inputs a connection.
FAMILY_WEIGHTS = {
    "shard": 16,
    "merge": 10,
    "state": 2,
    "fping": 6,
    "meshsub": 26,
    "identify": 2,
    "idpush": 6,
    "lping": 5,
    "multistream": 7,
    "tcp": 5,
    "secure": 4,
    # The bulk fast path `fflnode run` serves by default: its offer protocol, its TLS
    # port (each input there costs a TLS handshake) and its libp2p fallback.
    "fastoffer": 4,
    "fasttls": 4,
    "fastfallback": 3,
}
# RPCs one pubsub stream carries before the episode ends it with garbage. GossipSub
# scores each invalid message -10 and drops a publisher's messages below -50 before
# validation, so about 6 hostile publishes a stream reach fflnode's validator (the rest,
# and the control and subscription RPCs, reach the library's RPC handling); ending the
# stream with an RPC the library refuses makes it forget (and re-score) us.
PUBSUB_BATCH = (2, 12)
# Concurrent fuzzing tasks, and how many of them may hold a stalled stream at once (a
# stall occupies its task for the handler's whole deadline).
WORKERS = 24
STALL_SLOTS = 12
# Stall fraction of stream inputs; and the share of the insider's stalling answers it
# keeps (2 of its 22 kinds stall; each holds a round of both daemons for a body deadline,
# ~15 s, so ~1 % of answers stall and rounds keep moving).
STALL_P = 0.04
INSIDER_STALL_SHARE = 0.1
# A worker starts no episode while the attacker's own event loop runs later than PACE_LAG_S
# (its worst lag over the last PACE_WINDOW_S). One process cannot keep WORKERS episodes
# going on a loaded machine, and a loop that runs late adds its lateness to every latency
# it measures: at load ~15, the fuzz on one core, the attacker's loop was 14 s late while
# the daemons' were under 3 s (tools/fuzz_daemon.py --seed 13, insider, holo). Pacing
# spends the attacker's CPU on fewer inputs, measured on time; it never shortens a wait.
PACE_LAG_S = 0.5
PACE_WINDOW_S = 2.0
PACE_POLL_S = 0.2  # how often a paced worker looks again


# ----------------------------------------------------------------------------- records
@dataclass
class Outcome:
    """What one input got from the daemon, seen from the attacker."""

    # reply | reset | close | refused: the daemon answered; open: it kept a stream that
    # may stay open; lingered: it answered but kept the stream past the deadline; hang.
    answer: str
    latency_s: float  # from the input's last byte to that answer
    deadline_s: float | None  # the handler's documented deadline (None: may stay open)


@dataclass
class Slowest:
    latency_s: float = 0.0
    label: str = ""


@dataclass
class Stats:
    """Every input tried and what it got, by protocol, kind and mutation."""

    tried: Counter = field(default_factory=Counter)  # (protocol, kind) -> inputs
    mutations: Counter = field(default_factory=Counter)  # mutation -> inputs
    answers: Counter = field(default_factory=Counter)  # (protocol, answer) -> inputs
    hangs: list[str] = field(default_factory=list)
    slowest: dict[str, Slowest] = field(default_factory=dict)  # protocol -> slowest
    slowest_complete: Slowest = field(default_factory=Slowest)  # of inputs owed no wait
    slowest_any: Slowest = field(default_factory=Slowest)
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    identities: int = 0  # attacker identities used
    refused_dials: int = 0
    # Exceptions of the attacker's own tooling (not the daemons'): counted, never fatal;
    # the first traceback of each kind is kept for the report.
    attacker_errors: Counter = field(default_factory=Counter)
    attacker_tracebacks: dict[str, str] = field(default_factory=dict)
    # A security promise broken (a channel for a stranger, a wrong or a reused token):
    # each fails the run, like a hang.
    violations: list[str] = field(default_factory=list)
    # The attacker's own event-loop lag (the session's meter), and the daemons' as read
    # from their /metrics: a slow answer is only the daemon's if the attacker was on time.
    lag: fmetrics.LoopLag | None = None
    daemon_lag: Callable[[float, float], list[float]] | None = None
    attacker_lag_max_s: float = 0.0
    paced_s: float = 0.0  # worker-seconds spent waiting for the attacker's loop (pace)

    def record(
        self, protocol: str, kind: str, mutation: str, out: Outcome, label: str, waited: bool
    ) -> None:
        """One input's outcome; `waited`: the input put the handler in a documented wait
        (a stall, or a member's request waiting for a round or an agreement)."""
        self.total += 1
        self.tried[(protocol, kind)] += 1
        self.mutations[mutation] += 1
        self.answers[(protocol, out.answer)] += 1
        text = f"{protocol} {kind}/{mutation} [{label}]"
        slow = self.slowest.setdefault(protocol, Slowest())
        if out.latency_s > slow.latency_s:
            slow.latency_s, slow.label = out.latency_s, text
        if out.latency_s > self.slowest_any.latency_s:
            self.slowest_any = Slowest(out.latency_s, text)
        if not waited and out.latency_s > self.slowest_complete.latency_s:
            self.slowest_complete = Slowest(out.latency_s, text)
        if out.answer in ("hang", "lingered") and len(self.hangs) < 100:
            what = "no answer" if out.answer == "hang" else "still open"
            self.hangs.append(
                f"{text}: {what} after {out.deadline_s} + {SLACK_S} s{self.lag_during(out)}"
            )

    def lag_during(self, out: Outcome) -> str:
        """How late the attacker's and the daemons' loops ran while `out` waited."""
        if self.lag is None:
            return ""
        now = trio.current_time()
        t0 = now - out.latency_s
        mine = self.lag.worst_between(t0, now)
        theirs = self.daemon_lag(t0, now) if self.daemon_lag is not None else []
        return (
            f" (meanwhile loop lag: attacker {mine:.1f} s, daemons "
            f"{', '.join(f'{x:.1f}' for x in theirs)} s)"
        )

    @property
    def hang_count(self) -> int:
        return sum(n for (_, a), n in self.answers.items() if a in ("hang", "lingered"))


class Budget:
    """Inputs left to try; shared by every task of a session (and across sessions)."""

    def __init__(self, total: int) -> None:
        self.left = total

    def take(self, n: int = 1) -> int:
        got = min(n, self.left)
        self.left -= got
        return got

    @property
    def spent(self) -> bool:
        return self.left <= 0


# ----------------------------------------------------------------------------- generator
def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def frame(body: bytes) -> bytes:
    """fflnode's stream framing: a 4-byte big-endian length, then the message."""
    return struct.pack(">I", len(body)) + body


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def raw_map(items: list[tuple[bytes, bytes]]) -> bytes:
    """A msgpack map from already-packed keys and values (duplicate keys allowed)."""
    n = len(items)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(k + v for k, v in items)


def nested(depth: int, leaf: bytes = b"\xc0") -> bytes:
    """`depth` nested one-element arrays around `leaf`: 1,000 levels are ~1 KB."""
    return b"\x91" * depth + leaf


HUGE_INTS = (
    -1,
    -(1 << 31),
    1 << 31,
    (1 << 31) - 1,
    1 << 32,
    1 << 48,
    (1 << 53) + 1,
    (1 << 63) - 1,
    -(1 << 63),
    (1 << 64) - 1,
)
ODD_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1.5,
    "",
    "x",
    b"",
    b"\x00" * 8,
    [],
    [1, 2],
    {},
    {"k": 1},
    msgpack.ExtType(5, b"ext"),
    msgpack.Timestamp(1, 2),
)
FLOAT_SPECIALS = (float("nan"), float("inf"), float("-inf"), -0.0, 1e308, 5e-324)
BAD_UTF8 = b"\xa4\xff\xfe\xc0\x80"  # a 4-byte msgpack str that is not UTF-8


class Forge:
    """Valid messages of every kind, built from the protocol's description (the schema
    table in DESIGN.md and fflnode/wire.py's docstring), never from its validators.

    `peers` are the run's honest peer IDs (base58), `me` the attacker's."""

    WHAT_SHARD = ("delta", "weights")
    WHAT_MERGE = ("premerge", "merged")
    PHASES = ("join", "train", "merge", "done")
    STAGES = ("propose", "lock", "commit")

    def __init__(self, rng: random.Random, run: str, peers: list[str], me: str) -> None:
        self.rng, self.run, self.peers, self.me = rng, run, peers, me
        self.round = 0  # the run's round as far as the attacker knows (daemons' STATUS)
        self.codec = "none"
        self.numel = 1024
        self.admit: dict[str, bytes] = {}

    def _round(self) -> int:
        r = self.rng
        return max(0, self.round + r.choice((-3, -1, 0, 0, 1, 2, 3, 5)))

    def get(self, protocol: str) -> dict[str, Any]:
        r = self.rng
        lo = r.choice((0, 0, r.randrange(max(1, self.numel))))
        hi = min(self.numel, lo + r.choice((1, 256, 1024, self.numel)))
        if protocol == PROTO_MERGE:
            what, rnd, codec = r.choice(self.WHAT_MERGE), r.choice((0, 0, 1, 2)), "none"
        elif protocol == PROTO_STATE:
            what, rnd, codec = "state", self._round(), "ssd-state/1"
        else:
            what, rnd = r.choice(self.WHAT_SHARD), self._round()
            codec = self.codec if what == "delta" else "none"
        return {
            "v": 1,
            "kind": "get",
            "run": self.run,
            "round": rnd,
            "what": what,
            "index": r.choice((0, 0, 0, 1, 2)),
            "lo": lo,
            "hi": hi,
            "codec": codec,
        }

    def ack(self, ok: bool | None = None) -> dict[str, Any]:
        ok = self.rng.random() < 0.5 if ok is None else ok
        doc: dict[str, Any] = {"v": 1, "kind": "ack", "ok": ok}
        if not ok or self.rng.random() < 0.3:
            doc["reason"] = self.rng.choice(("hash", "digest", "", "x" * 200))
        return doc

    def ping(self) -> dict[str, Any]:
        return {"v": 1, "kind": "ping", "run": self.run, "nonce": self.rng.randrange(1 << 48)}

    def members(self) -> list[str]:
        ms = {self.me, *self.rng.sample(self.peers, k=self.rng.randint(1, len(self.peers)))}
        return sorted(ms)

    def hb(self) -> dict[str, Any]:
        admit = dict(self.admit) or {
            g: self.rng.randbytes(8) for g in ("seed", "size", "task", "layout")
        }
        return {
            "v": 1,
            "kind": "hb",
            "run": self.run,
            "round": self._round(),
            "phase": self.rng.choice(self.PHASES),
            "addrs": [f"/ip4/127.0.0.1/tcp/{self.rng.randint(1024, 65535)}"],
            "seq": time.time_ns() // 1_000_000 + self.rng.randrange(1000),
            "admit": admit,
        }

    def start_ready(self) -> dict[str, Any]:
        return {
            "v": 1,
            "kind": "start.ready",
            "run": self.run,
            "members": self.members(),
            "stage": self.rng.choice(self.STAGES),
        }

    def merge_ready(self) -> dict[str, Any]:
        members = self.members()
        doc = {
            "v": 1,
            "kind": "merge.ready",
            "run": self.run,
            "members": members,
            "shards": len(members),
            "stage": self.rng.choice(self.STAGES),
        }
        if self.rng.random() < 0.5:
            doc["attempt"] = 0
        if self.rng.random() < 0.5:
            doc["fp"] = struct.pack("<4f", *(self.rng.gauss(0, 1) for _ in range(4))) * 64
        return doc

    def merge_hash(self) -> dict[str, Any]:
        doc = {
            "v": 1,
            "kind": "merge.hash",
            "run": self.run,
            "hash": self.rng.randbytes(32).hex(),
            "digest": self.rng.randbytes(32).hex(),
        }
        if self.rng.random() < 0.5:
            doc["attempt"] = 0
        return doc

    def state_ready(self) -> dict[str, Any]:
        doc = {
            "v": 1,
            "kind": "state.ready",
            "run": self.run,
            "context": self.rng.randrange(64),
            "round": self._round(),
        }
        if self.rng.random() < 0.5:
            doc["count"] = self.rng.randint(1, 8)
        return doc

    def announcement(self) -> tuple[str, dict[str, Any]]:
        kind = self.rng.choice(("hb", "start.ready", "merge.ready", "merge.hash", "state.ready"))
        make = {
            "hb": self.hb,
            "start.ready": self.start_ready,
            "merge.ready": self.merge_ready,
            "merge.hash": self.merge_hash,
            "state.ready": self.state_ready,
        }[kind]
        return kind, make()

    def other_kind(self) -> dict[str, Any]:
        """A valid message of some kind, for the wrong place."""
        return self.rng.choice(
            (
                self.get(PROTO_SHARD),
                self.ack(),
                self.ping(),
                {"v": 1, "kind": "pong", "run": self.run, "nonce": 1},
                {"v": 1, "kind": "error", "code": "gone", "reason": "r"},
                self.hb(),
                self.merge_hash(),
                self.state_ready(),
            )
        )


class Mutator:
    """Hostile message bodies from valid documents: every operator returns the name of
    what it did and msgpack bytes (the body of one frame, or one pubsub payload)."""

    def __init__(self, rng: random.Random, forge: Forge) -> None:
        self.rng, self.forge = rng, forge
        self.ops: list[tuple[str, Callable[[dict[str, Any]], bytes]], ...] = [
            ("valid", pack),
            ("bit-flips", self.bit_flips),
            ("cut-msgpack", self.cut),
            ("type-swap", self.type_swap),
            ("float-for-int", self.float_for_int),
            ("nan-inf", self.nan_inf),
            ("huge-int", self.huge_int),
            ("deep-nesting", self.deep_nesting),
            ("duplicate-key", self.duplicate_key),
            ("unknown-key", self.unknown_key),
            ("missing-key", self.missing_key),
            ("wrong-kind", self.wrong_kind),
            ("wrong-run", self.wrong_run),
            ("wrong-numbers", self.wrong_numbers),
            ("bad-version", self.bad_version),
            ("oversized-field", self.oversized_field),
            ("bad-utf8", self.bad_utf8),
            ("ext-value", self.ext_value),
            ("trailing-bytes", lambda d: pack(d) + self.rng.randbytes(self.rng.randint(1, 9))),
            ("not-a-map", self.not_a_map),
            ("random-body", lambda d: self.rng.randbytes(self.rng.randint(1, 400))),
            ("list-tricks", self.list_tricks),
        ]

    def __call__(self, doc: dict[str, Any], valid_p: float = 0.05) -> tuple[str, bytes]:
        if self.rng.random() < valid_p:
            return "valid", pack(doc)
        name, op = self.rng.choice(self.ops[1:])
        return name, op(dict(doc))

    def _key(self, doc: dict[str, Any], *, fields_only: bool = True) -> str:
        keys = [k for k in doc if not fields_only or k not in ("v", "kind")]
        return self.rng.choice(keys or list(doc))

    def bit_flips(self, doc: dict[str, Any]) -> bytes:
        b = bytearray(pack(doc))
        for _ in range(self.rng.randint(1, 8)):
            i = self.rng.randrange(len(b) * 8)
            b[i // 8] ^= 1 << (i % 8)
        return bytes(b)

    def cut(self, doc: dict[str, Any]) -> bytes:
        b = pack(doc)
        return b[: self.rng.randrange(1, len(b))]

    def type_swap(self, doc: dict[str, Any]) -> bytes:
        doc[self._key(doc, fields_only=self.rng.random() < 0.8)] = self.rng.choice(ODD_VALUES)
        return pack(doc)

    def float_for_int(self, doc: dict[str, Any]) -> bytes:
        ints = [k for k, v in doc.items() if isinstance(v, int) and not isinstance(v, bool)]
        k = self.rng.choice(ints or list(doc))
        doc[k] = float(doc[k]) if isinstance(doc[k], int) else 1.0
        return pack(doc)

    def nan_inf(self, doc: dict[str, Any]) -> bytes:
        k = self._key(doc)
        value = self.rng.choice(FLOAT_SPECIALS)
        if self.rng.random() < 0.5:  # as a float32 on the wire
            items = [(pack(a), pack(b)) for a, b in doc.items() if a != k]
            f32 = struct.pack(">f", value if abs(value) < 3e38 or math.isnan(value) else math.inf)
            items.append((pack(k), b"\xca" + f32))
            return raw_map(items)
        doc[k] = value
        return pack(doc)

    def huge_int(self, doc: dict[str, Any]) -> bytes:
        doc[self._key(doc)] = self.rng.choice(HUGE_INTS)
        return pack(doc)

    def deep_nesting(self, doc: dict[str, Any]) -> bytes:
        depth = self.rng.choice((5, 64, 1000, 1000, 1000, 5000))
        shape = self.rng.random()
        if shape < 0.4:  # a field's value nested `depth` deep
            k = self._key(doc)
            items = [(pack(a), pack(b)) for a, b in doc.items() if a != k]
            return raw_map([*items, (pack(k), nested(depth))])
        if shape < 0.7:  # maps in maps
            return b"\x81\xa1k" * depth + b"\xc0"
        return nested(depth)  # the whole message

    def duplicate_key(self, doc: dict[str, Any]) -> bytes:
        items = [(pack(a), pack(b)) for a, b in doc.items()]
        k = self._key(doc, fields_only=False)
        items.append((pack(k), pack(self.rng.choice(ODD_VALUES[:8]))))
        self.rng.shuffle(items)
        return raw_map(items)

    def unknown_key(self, doc: dict[str, Any]) -> bytes:
        for i in range(self.rng.choice((1, 1, 3, 40))):
            doc[self.rng.choice(("extra", "from", "peer", f"k{i}", "kind2"))] = i
        if self.rng.random() < 0.2:
            doc[7] = "int key"  # a map key that is not a string
        return pack(doc)

    def missing_key(self, doc: dict[str, Any]) -> bytes:
        del doc[self._key(doc, fields_only=self.rng.random() < 0.8)]
        return pack(doc)

    def wrong_kind(self, doc: dict[str, Any]) -> bytes:
        if self.rng.random() < 0.5:
            other = self.forge.other_kind()
            return pack(other)
        doc["kind"] = self.rng.choice(
            ("hb", "get", "bulk", "ack", "pong", "nope", "", "GET", None, 1, ["get"], {"k": 1})
        )
        return pack(doc)

    def wrong_run(self, doc: dict[str, Any]) -> bytes:
        run = self.forge.run
        doc["run"] = self.rng.choice(
            ("other", "", run + "\x00", run.upper(), run * 40, "é" * 30, None, 7)
        )
        return pack(doc)

    def wrong_numbers(self, doc: dict[str, Any]) -> bytes:
        nums = [k for k, v in doc.items() if isinstance(v, int) and not isinstance(v, bool)]
        nums = [k for k in nums if k != "v"] or ["round"]
        for k in self.rng.sample(nums, k=self.rng.randint(1, len(nums))):
            doc[k] = self.rng.choice((*HUGE_INTS, 0, 1, 2, 63, 64, 65, 1024, 65536, 65537))
        if "lo" in doc and self.rng.random() < 0.3:
            doc["lo"], doc["hi"] = min(doc["hi"] + 1, (1 << 64) - 1), doc["lo"]  # reversed
        return pack(doc)

    def bad_version(self, doc: dict[str, Any]) -> bytes:
        doc["v"] = self.rng.choice((0, 2, -1, "1", True, 1.0, None, (1 << 64) - 1, [1]))
        return pack(doc)

    def oversized_field(self, doc: dict[str, Any]) -> bytes:
        k = self._key(doc)
        doc[k] = self.rng.choice(
            (
                "s" * 5000,
                "é" * 3000,
                b"b" * 20000,
                list(range(2000)),
                ["x"] * 1025,
                {f"k{i}": i for i in range(40)},
                "s" * 70000,
            )
        )
        return pack(doc)

    def bad_utf8(self, doc: dict[str, Any]) -> bytes:
        k = self._key(doc)
        items = [(pack(a), pack(b)) for a, b in doc.items() if a != k]
        return raw_map([*items, (pack(k), BAD_UTF8)])

    def ext_value(self, doc: dict[str, Any]) -> bytes:
        k = self._key(doc)
        items = [(pack(a), pack(b)) for a, b in doc.items() if a != k]
        ext = self.rng.choice(
            (
                b"\xd7\xff" + b"\x00" * 8,  # the timestamp extension (type -1)
                b"\xc7\x05\x80" + b"x" * 5,  # type -128
                b"\xc8\x01\x2c\x7f" + b"x" * 300,  # type 127, 300 bytes
            )
        )
        return raw_map([*items, (pack(k), ext)])

    def not_a_map(self, doc: dict[str, Any]) -> bytes:
        return pack(self.rng.choice((list(doc.items()), 1, "get", None, b"\x00", [doc])))

    def list_tricks(self, doc: dict[str, Any]) -> bytes:
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        k = self.rng.choice(lists or [self._key(doc)])
        base = doc.get(k) if isinstance(doc.get(k), list) and doc.get(k) else ["x"]
        doc[k] = self.rng.choice(
            (
                list(reversed(base)) + base,  # unsorted, duplicated
                [*base, ""],
                [*base, None],
                [*base, "not-a-peer-id!"],
                [b"bytes"] * 3,
                [[1]] * 3,
                [self.forge.run] * 1024,
                [],
            )
        )
        return pack(doc)


def framings(rng: random.Random, body: bytes) -> tuple[str, bytes, bool]:
    """How a body goes on a stream: (name, bytes, whether the bytes end mid-frame)."""
    x = rng.random()
    if x < 0.70:
        return "framed", frame(body), False
    if x < 0.78:  # the prefix claims more than follows: the handler waits for the rest
        extra = rng.choice((1, 7, 1000, 100_000))
        return "long-prefix", struct.pack(">I", len(body) + extra) + body, True
    if x < 0.83:  # claims less: the rest is read as the next frame
        return "short-prefix", struct.pack(">I", max(1, len(body) // 2)) + body, False
    if x < 0.88:
        n = rng.choice(((256 << 10) + 1, 1 << 24, 1 << 31, 0xFFFFFFFF))
        return "huge-prefix", struct.pack(">I", n) + body[:64], False
    if x < 0.91:
        return "zero-prefix", b"\x00\x00\x00\x00" + body[:16], False
    if x < 0.96:
        f = frame(body)
        cut = rng.randrange(1, len(f))
        return "cut-frame", f[:cut], True
    return "raw-bytes", rng.randbytes(rng.choice((1, 2, 3, 5, 64, 900))), False


def ends_mid_frame(data: bytes, limit: int = 256 << 10) -> bool:
    """Whether fflnode's framing (4-byte length, then the message) leaves `data` in the
    middle of a frame: the handler then waits for the rest (its message deadline). A
    length of 0 or above the documented 256 KiB is refused at once, not waited on."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            return True
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        if n == 0 or n > limit:
            return False
        if len(data) - pos - 4 < n:
            return True
        pos += 4 + n
    return False


# ----------------------------------------------------------------------------- daemons
@dataclass
class Honest:
    """One `fflnode run` process and what the oracle sees of it."""

    index: int
    root: Path
    proc: subprocess.Popen | None = None
    log_file: Any = None
    notify_path: Path | None = None
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    port: int = 0
    rounds_done: int = 0
    rounds_planned: int = 0
    last_advance: float = 0.0
    longest_stall_s: float = 0.0
    statuses: deque = field(default_factory=lambda: deque(maxlen=20))
    vmhwm_kb: int = 0
    exit_code: int | None = None
    exited_at: float | None = None
    ready: trio.Event = field(default_factory=trio.Event)
    rounds_at_fuzz_start: int = 0
    rounds_at_fuzz_end: int = 0
    metrics_port: int = 0
    # From /metrics every SCRAPE_S: (read at, worst loop lag over the daemon's last 10 s).
    lag_reads: deque = field(default_factory=lambda: deque(maxlen=1000))
    loop_lag_max_s: float = 0.0
    streams_peer_max: int = 0  # the most streams one peer held open, at any read
    streams_top: dict[str, int] = field(default_factory=dict)  # its streams, by protocol

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "node.log"

    @property
    def config_path(self) -> Path:
        return self.root / "node.toml"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def result(self) -> dict[str, Any]:
        try:
            return json.loads((self.data_dir / "result.json").read_text())
        except (OSError, ValueError):
            return {}


def daemon_config(
    h: Honest,
    *,
    run_id: str,
    nodes: int,
    rounds: int,
    codec: str,
    bootstrap: list[str],
    blacklist_after: int,
    seed: int,
) -> str:
    """The TOML of one honest daemon: a real digits run on 127.0.0.1, the testnet's
    pubsub settings (one IP: no diversity to ask for), and the access policy of the mode."""
    boot = ", ".join(json.dumps(b) for b in bootstrap)
    return f"""
[node]
data_dir = {json.dumps(str(h.data_dir))}
listen = ["/ip4/127.0.0.1/tcp/0"]
bootstrap = [{boot}]
metrics = "127.0.0.1:0"
log_level = "info"

[run]
run_id = {json.dumps(run_id)}
seed = {seed}
nodes = {nodes}
rounds = {rounds}
start_timeout_s = {STARTUP_TIMEOUT_S * 2}

[train]
task = "digits"
partition_index = {h.index}
eval_every = {max(1, rounds)}
checkpoint_every = 50
{LOSSY_RECIPE if codec != "none" else ""}

[exchange]
codec = {json.dumps(codec)}
ratio = 0.05
round_timeout_s = {ROUND_TIMEOUT_S}

[merge]
timeout_s = 120.0

[pubsub]
mesh_diversity_ips = 1
ip_colocation_threshold = 1024

[access]
blacklist_after = {blacklist_after}
"""


async def _notify_reader(h: Honest, sock: trio.socket.SocketType) -> None:
    """STATUS= lines from the daemon: its round counter (rounds advancing is the oracle)."""
    pattern = re.compile(r"^round (\d+)/(\d+) ")
    while True:
        data = await sock.recv(4096)
        for line in data.decode("utf-8", "replace").splitlines():
            if line.startswith("READY=1"):
                h.ready.set()
            if line.startswith("STATUS="):
                status = line[len("STATUS=") :]
                h.statuses.append(status)
                m = pattern.match(status)
                if m:
                    now = trio.current_time()
                    if h.last_advance:
                        h.longest_stall_s = max(h.longest_stall_s, now - h.last_advance)
                    h.rounds_done, h.rounds_planned = int(m.group(1)), int(m.group(2))
                    h.last_advance = now


def read_vmhwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


async def _sample_rss(h: Honest) -> None:
    while h.alive:
        assert h.proc is not None
        h.vmhwm_kb = max(h.vmhwm_kb, read_vmhwm_kb(h.proc.pid))
        await trio.sleep(RSS_SAMPLE_S)  # a sampling period, not synchronisation


async def start_daemon(h: Honest, config: str, nursery: trio.Nursery) -> None:
    """Start `fflnode run` for `h` and wait (bounded) until it wrote node.json."""
    h.root.mkdir(parents=True, exist_ok=True)
    h.config_path.write_text(config)
    h.notify_path = h.root / "notify.sock"
    with contextlib.suppress(FileNotFoundError):
        h.notify_path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    # A daemon never blocks on its notifications: if this socket's buffer is full when
    # the attacker's loop is busy, STATUS lines are lost. Room for thousands of them.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NOTIFY_BUFFER_BYTES)
    await sock.bind(str(h.notify_path))
    nursery.start_soon(_notify_reader, h, sock)
    h.log_file = h.log_path.open("ab")
    env = dict(os.environ, NOTIFY_SOCKET=str(h.notify_path), PYTHONUNBUFFERED="1")
    env.pop("WATCHDOG_USEC", None)
    # Started from this (the loop's) thread, so that the daemon's parent-death signal is
    # tied to the fuzzer's lifetime (trio's open_process starts it from a worker thread).
    h.proc = subprocess.Popen(
        [sys.executable, "-m", "fflnode", "run", "--config", str(h.config_path)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=h.log_file,
        stderr=h.log_file,
        preexec_fn=_die_with_parent,
    )
    nursery.start_soon(_sample_rss, h)
    nursery.start_soon(_scrape, h)
    node_json = h.data_dir / "node.json"
    with trio.fail_after(STARTUP_TIMEOUT_S):
        while not (node_json.exists() and h.ready.is_set()):
            if not h.alive:
                raise RuntimeError(f"daemon {h.index} exited at start: see {h.log_path}")
            await trio.sleep(0.05)  # polling a file the daemon writes, under a deadline
    doc = json.loads(node_json.read_text())
    h.peer_id, h.addrs = doc["peer_id"], doc["addrs"]
    h.metrics_port = int(str(doc.get("metrics") or ":0").rsplit(":", 1)[1])
    h.port = int(multiaddr.Multiaddr(h.addrs[0]).value_for_protocol("tcp"))
    h.last_advance = trio.current_time()


async def _scrape(h: Honest) -> None:
    """The daemon's own view of its event loop and streams, from its /metrics."""
    while True:
        await trio.sleep(SCRAPE_S)  # a sampling period, not synchronisation
        if not h.metrics_port:
            continue
        try:
            doc = fmetrics.parse(await fmetrics.fetch("127.0.0.1", h.metrics_port))
        except (OSError, trio.TooSlowError, ValueError):
            continue  # a busy or exiting daemon: the next read will do
        lags = {k.get("window"): v for k, v in doc.get("fflnode_loop_lag_seconds", [])}
        streams = {k.get("scope"): v for k, v in doc.get("fflnode_streams_open", [])}
        if "recent" in lags:
            h.lag_reads.append((trio.current_time(), lags["recent"]))
        h.loop_lag_max_s = max(h.loop_lag_max_s, lags.get("max", 0.0))
        if int(streams.get("peer_max", 0)) > h.streams_peer_max:
            h.streams_peer_max = int(streams["peer_max"])
            h.streams_top = {k[4:]: int(v) for k, v in streams.items() if k.startswith("top:")}


def _daemon_lag(honest: list[Honest]) -> Callable[[float, float], list[float]]:
    """Each daemon's worst loop lag reported over [t0, t1] (+ the daemon's 10 s window)."""

    def worst(t0: float, t1: float) -> list[float]:
        end = t1 + fmetrics.LOOP_LAG_WINDOW_S
        return [max((v for t, v in h.lag_reads if t0 <= t <= end), default=0.0) for h in honest]

    return worst


def _die_with_parent() -> None:
    """In the daemon's child process: SIGKILL it when the thread that started it (the
    fuzzer's main thread) dies, even by SIGKILL, so no daemon outlives its session."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


async def wait_exit(h: Honest, timeout_s: float) -> None:
    assert h.proc is not None
    with trio.move_on_after(timeout_s):
        while h.proc.poll() is None:
            await trio.sleep(0.2)  # polling the process's state, under a deadline
        h.exit_code = h.proc.returncode
        h.exited_at = h.exited_at or trio.current_time()


def stop_daemon(h: Honest) -> None:
    """SIGKILL a daemon this session started that is still running (after a failure)."""
    if h.proc is not None and h.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(h.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            h.proc.wait(timeout=5)  # reap it


# ----------------------------------------------------------------------------- log oracle
@dataclass
class LogVerdict:
    lines: int  # lines written during the session
    per_peer: dict[str, int]  # offending identity -> lines naming it
    other: int  # lines naming no attacker identity, beyond the run's own
    tracebacks: int
    crashed: bool
    problems: list[str]


# Lines every run writes whatever the attacker does (start, barrier, rounds at eval,
# merge): they are not charged to anyone.
RUN_OWN_LINE = re.compile(
    r"metrics on |listening on |joined \(round|run starts with|mixing with|connected to "
    r"bootstrap|round \d+/\d+ |merge[: ]|merged |not every member|received SIG|resumed"
)


def judge_log(path: Path, attackers: list[str], honest: list[str], minutes: float) -> LogVerdict:
    """Count a daemon's log lines by who they are about (an identity's last 6 base58
    characters appear in full IDs and in fflnode's short form alike) against the bounds
    stated at the top of this module."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    lines = text.splitlines()
    tails = {a[-6:]: a for a in attackers}
    honest_tails = {p[-6:] for p in honest}
    per_peer: Counter = Counter()
    other = 0
    for line in lines:
        hit = next((a for t, a in tails.items() if t in line), None)
        if hit is not None:
            per_peer[hit] += 1
        elif RUN_OWN_LINE.search(line) or any(t in line for t in honest_tails):
            continue
        else:
            other += 1
    problems = []
    peer_cap = LOG_LINES_PER_PEER_FIXED + LOG_LINES_PER_PEER_PER_MIN * math.ceil(minutes)
    for peer, n in per_peer.items():
        if n > peer_cap:
            problems.append(f"{n} lines about {peer[-6:]} (bound {peer_cap})")
    other_cap = LOG_LINES_OTHER_FIXED + LOG_LINES_OTHER_PER_MIN * math.ceil(minutes)
    if other > other_cap:
        problems.append(f"{other} lines about no known peer (bound {other_cap})")
    tracebacks = text.count("Traceback")
    crashed = "node crashed" in text
    if tracebacks:
        problems.append(f"{tracebacks} Traceback(s)")
    if crashed:
        problems.append('"node crashed"')
    return LogVerdict(len(lines), dict(per_peer), other, tracebacks, crashed, problems)


# ----------------------------------------------------------------------------- streams
class Ended(Exception):
    """The daemon ended the stream: `how` is "reset" or "close"."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


def ended_how(error: BaseException) -> str | None:
    """'reset' or 'close' for the ways a libp2p stream or a socket reports its end."""
    name = type(error).__name__
    if "Reset" in name or isinstance(error, ConnectionResetError):
        return "reset"
    if "Incomplete" in name:  # a secure session whose peer closed mid-message
        return "close"
    if isinstance(error, EOFError | trio.ClosedResourceError | trio.BrokenResourceError):
        return "close"
    if isinstance(error, OSError) or any(w in name for w in ("Closed", "EOF", "Conn", "Stream")):
        return "close"
    return None


async def read_some(stream: Any, n: int = 65536) -> bytes:
    """One read from a libp2p stream or a raw connection; raises Ended at its end."""
    try:
        data = await stream.read(n)
    except trio.TooSlowError:
        raise
    except Exception as e:
        how = ended_how(e)
        if how is None:
            raise
        raise Ended(how) from None
    if not data:
        raise Ended("close")
    return bytes(data)


async def write_all(stream: Any, data: bytes, rng: random.Random | None = None) -> None:
    """Write `data`, sometimes in small pieces (every split of a prefix and a message)."""
    try:
        if rng is not None and len(data) <= 512 and rng.random() < 0.2:
            step = rng.choice((1, 2, 3, 7))
            for i in range(0, len(data), step):
                await stream.write(data[i : i + step])
            return
        await stream.write(data)
    except Exception as e:
        how = ended_how(e)
        if how is None:
            raise
        raise Ended(how) from None


async def half_close(stream: Any) -> None:
    with contextlib.suppress(Exception):
        await stream.close()


async def abandon(stream: Any) -> None:
    """Reset a stream the attacker is done with (bounded: never hold a task on it)."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0), contextlib.suppress(Exception):
        await stream.reset()


async def until_end(stream: Any, deadline_s: float | None, hold_s: float = 0.0) -> Outcome:
    """Read until the daemon ends the stream. The latency is that of its first answer (a
    reply, a reset, a close); a stream that neither answers nor ends within the deadline
    + SLACK_S is a hang, and one that answered but was still open then "lingered". With
    no documented deadline (a long-lived stream) look for `hold_s` and call it open."""
    t0 = trio.current_time()
    first: float | None = None
    limit = (deadline_s + SLACK_S) if deadline_s is not None else hold_s
    with trio.move_on_after(limit):
        try:
            while True:
                await read_some(stream)
                first = trio.current_time() - t0 if first is None else first
        except Ended as e:
            if first is not None:
                return Outcome("reply", first, deadline_s)
            return Outcome(e.how, trio.current_time() - t0, deadline_s)
    if deadline_s is None:
        return Outcome("reply" if first is not None else "open", first or 0.0, deadline_s)
    if first is not None:
        return Outcome("lingered", first, deadline_s)
    return Outcome("hang", trio.current_time() - t0, deadline_s)


class FrameReader:
    """fflnode frames off a stream, bulk bodies skipped, parsed here (not by fflnode)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = b""

    async def _need(self, n: int) -> None:
        while len(self.buf) < n:
            self.buf += await read_some(self.stream)

    async def frame(self) -> dict[str, Any] | None:
        """The next message (a dict, or None if it is not a msgpack map); a bulk header's
        body is read and kept as doc["_body"]."""
        await self._need(4)
        (n,) = struct.unpack(">I", self.buf[:4])
        if n > 1 << 20:
            raise Ended("close")  # no honest frame is this large: treat as broken
        await self._need(4 + n)
        body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
        try:
            doc = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception:
            return None
        if not isinstance(doc, dict):
            return None
        if doc.get("kind") == "bulk" and isinstance(doc.get("nbytes"), int):
            nbytes = doc["nbytes"]
            if nbytes > 64 << 20:
                raise Ended("close")
            await self._need(nbytes)
            doc["_body"], self.buf = self.buf[:nbytes], self.buf[nbytes:]
        return doc


def quiet_attacker_logs() -> None:
    """The attacker's own py-libp2p logs every refused stream on stderr: silence them."""
    import logging

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)


# ----------------------------------------------------------------------------- pubsub bits
def signed_message(key_pair: Any, me: ID, topic: str, data: bytes, seqno: int) -> rpc_pb2.Message:
    msg = rpc_pb2.Message(
        data=data, topicIDs=[topic], from_id=me.to_bytes(), seqno=seqno.to_bytes(8, "big")
    )
    msg.signature = key_pair.private_key.sign(PUBSUB_PREFIX + msg.SerializeToString())
    msg.key = key_pair.public_key.serialize()
    return msg


def rpc_bytes(rpc: rpc_pb2.RPC) -> bytes:
    body = rpc.SerializeToString()
    return varint(len(body)) + body


class Tail:
    """The end every episode shares, in one place: the inputs still owed an answer
    (`pending`), sending the last input and waiting for the daemon's answer (`last`),
    and what is recorded when the stream ends early or times out (`settle`).

    Made by `Attacker.episode`, which also gives back the stall slot and lets go of the
    stream (reset, or `close`) however the episode ends."""

    def __init__(
        self,
        attacker: Attacker,
        label: str,
        stream: Any,
        protocol: str,
        deadline_s: float | None,
        since: float | None,
        half: Callable[[Any], Awaitable[None]],
    ) -> None:
        self.attacker, self.label, self.stream, self.half = attacker, label, stream, half
        self.protocol, self.deadline_s, self.since = protocol, deadline_s, since
        self.pending: list[tuple[str, str]] = []  # (kind, mutation) sent, not yet answered
        self.stalled = False  # holds a stall slot: the last input is left open on purpose

    def stall(self, rng: random.Random, p: float = STALL_P) -> bool:
        """Whether the last input stalls (takes one of the attacker's stall slots)."""
        self.stalled = self.attacker.stall_wanted(rng, p)
        return self.stalled

    def record(self, kind: str, mutation: str, out: Outcome, waited: bool = False) -> None:
        self.attacker.record(self.protocol, kind, mutation, out, self.label, waited)

    async def last(
        self,
        kind: str,
        mutation: str,
        data: bytes,
        deadline_s: float | None,
        *,
        rng: random.Random | None = None,
        hold_s: float = 0.0,
        waited: bool = False,
        end_write: bool = True,
    ) -> None:
        """Send the episode's last input, half-close unless it stalls, and record what
        the daemon did within `deadline_s` (+ SLACK_S) with every input still pending;
        `end_write=False` leaves the write side open (the daemon is to end it)."""
        self.pending.append((kind, mutation))
        if data:
            await write_all(self.stream, data, rng)
        if end_write and not self.stalled:
            await self.half(self.stream)
        out = await until_end(self.stream, deadline_s, hold_s)
        *before, _ = self.pending
        self.pending = []
        for k, m in before:  # sent on a stream that stays open: answered by not ending
            self.record(k, m, Outcome("open", 0.0, deadline_s))
        self.record(kind, mutation, out, self.stalled or waited)

    def settle(self, answer: str) -> None:
        """The stream ended ("reset", "close") or timed out ("hang") with inputs pending."""
        if answer == "hang":
            deadline = self.deadline_s or 0.0
            out = Outcome("hang", deadline + SLACK_S, self.deadline_s)
        else:
            since = self.since
            out = Outcome(answer, 0.0 if since is None else trio.current_time() - since,
                          self.deadline_s)  # fmt: skip
        pending, self.pending = self.pending, []
        for kind, mutation in pending:
            self.record(kind, mutation, out)


# ----------------------------------------------------------------------------- attacker
class OutOfBudget(Exception):
    """The session's input budget is spent: the episode stops where it is."""


class Refused(Exception):
    """A stream or connection the daemon would not open for us (with the reason)."""


@dataclass
class Target:
    name: str
    peer: ID
    maddr: multiaddr.Multiaddr
    port: int


@dataclass
class Worker:
    index: int
    rng: random.Random
    forge: Forge
    mut: Mutator
    seed: int
    session: int
    episode: int = 0

    def label(self) -> str:
        return f"seed {self.seed} session {self.session} worker {self.index} ep {self.episode}"


class Attacker:
    """One attacker identity (a libp2p host with its own key) and its fuzzing episodes.

    Every episode sends one or more inputs to one daemon and records, per input, the
    daemon's answer and its latency. `member` marks the insider's identity: its `get`s
    are served (they may wait for a round: `member_wait_s`)."""

    def __init__(
        self,
        host: IHost,
        key_pair: Any,
        targets: list[Target],
        run_id: str,
        stats: Stats,
        budget: Budget,
        *,
        member: bool = False,
        member_wait_s: dict[str, float] | None = None,
        topics: list[str] | None = None,
    ) -> None:
        self.host, self.key_pair, self.targets = host, key_pair, targets
        self.me = host.get_id()
        self.run_id, self.stats, self.budget = run_id, stats, budget
        self.member = member
        self.member_wait_s = member_wait_s or {}
        self.topics = topics or []
        self.banned_by: set[str] = set()
        self.stall_slots = trio.Semaphore(STALL_SLOTS)
        self.seqno = int.from_bytes(os.urandom(4), "big") << 24
        self.round = 0  # the daemons' round, fed by the session
        self.codec = "none"
        self.numel = 1024
        # The fast path: our libp2p-TLS identity, a stranger's (a certificate no offer
        # named), and per daemon the client contexts pinning its certificate.
        self.tls: ftls.TlsIdentity | None = None
        self.stranger: ftls.TlsIdentity | None = None
        self.tls_contexts: dict[tuple[str, bytes], ssl.SSLContext] = {}
        self.tls_made = trio.Lock()  # made once: every offer names the same certificate

    # -- bookkeeping --
    def take(self) -> None:
        if not self.budget.take(1):
            raise OutOfBudget

    def take_up_to(self, n: int) -> int:
        """Between 1 and n inputs from the budget (all sent by the caller)."""
        got = self.budget.take(n)
        if not got:
            raise OutOfBudget
        return got

    def record(
        self,
        protocol: str,
        kind: str,
        mutation: str,
        out: Outcome,
        label: str,
        waited: bool = False,
    ) -> None:
        self.stats.record(protocol, kind, mutation, out, label, waited)

    def stall_wanted(self, rng: random.Random, p: float = STALL_P) -> bool:
        if rng.random() >= p:
            return False
        try:
            self.stall_slots.acquire_nowait()
        except trio.WouldBlock:
            return False
        return True

    @contextlib.asynccontextmanager
    async def episode(
        self,
        w: Worker | str,
        stream: Any,
        protocol: str,
        deadline_s: float | None,
        *,
        since: float | None = None,
        half: Callable[[Any], Awaitable[None]] = half_close,
        close: Callable[[Any], Awaitable[None]] = abandon,
    ) -> AsyncIterator[Tail]:
        """An episode's inputs on `stream`: every path records each pending input once
        (the stream ended early: its end, at `since`'s latency or 0; a deadline passed: a
        hang), gives back the stall slot and lets go of the stream (`close`)."""
        label = w if isinstance(w, str) else w.label()
        tail = Tail(self, label, stream, protocol, deadline_s, since, half)
        try:
            yield tail
        except Ended as e:
            tail.settle(e.how)
        except trio.TooSlowError:
            tail.settle("hang")
        finally:
            if tail.stalled:
                self.stall_slots.release()
            await close(stream)

    # -- connections --
    async def ensure(self, t: Target) -> None:
        net = self.host.get_network()
        if net.connections.get(t.peer):  # type: ignore[attr-defined]
            return
        net.unblock_peer(t.peer)  # type: ignore[attr-defined]
        try:
            with trio.fail_after(UPGRADE_S + SLACK_S):
                await self.host.connect(PeerInfo(t.peer, [t.maddr]))
        except Exception as e:
            self._refused(t, e)
            raise Refused(f"connect: {type(e).__name__}") from None

    def _refused(self, t: Target, e: BaseException) -> None:
        r = refusal(e)
        if r is not None and r.cause in ("remote", "banned"):
            self.banned_by.add(t.name)

    async def open(self, t: Target, protocol: str) -> INetStream:
        await self.ensure(t)
        try:
            with trio.fail_after(NEGOTIATE_S + SLACK_S):
                return await self.host.new_stream(t.peer, [protocol])
        except Exception as e:
            self._refused(t, e)
            raise Refused(f"{protocol}: {type(e).__name__}") from None

    async def opened(self, w: Worker, t: Target, protocol: str, kind: str) -> INetStream | None:
        """A negotiated stream, or None. The open is an input of its own (a valid
        negotiation, answered by the stream or by a refusal), recorded here."""
        self.take()
        t0 = trio.current_time()
        try:
            stream = await self.open(t, protocol)
        except Refused as e:
            out = Outcome("refused", trio.current_time() - t0, NEGOTIATE_S)
            self.record(protocol, kind, f"open:{str(e).split(': ', 1)[-1]}", out, w.label())
            return None
        out = Outcome("open", trio.current_time() - t0, NEGOTIATE_S)
        self.record(protocol, kind, "valid", out, w.label())
        return stream

    # -- fflnode's request/response protocols (bulk.serve) --
    def get_wait_s(self, protocol: str) -> float:
        return self.member_wait_s.get(protocol, 0.0) if self.member else 0.0

    async def ep_serve(self, w: Worker, t: Target, protocol: str, served: str = "") -> None:
        """Valid requests and ack floods first (they keep the stream), then one hostile
        message that ends it (or stalls it open). `served`: the bulk protocol behind
        `protocol` when they differ (the fast path's fallback serves merge requests)."""
        stream = await self.opened(w, t, protocol, "open")
        if stream is None:
            return
        await self.serve_inputs(w, stream, protocol, served or protocol)

    async def serve_inputs(self, w: Worker, stream: Any, protocol: str, served: str) -> None:
        """ep_serve's inputs on an open stream (libp2p, or a fast-path TLS channel)."""
        rng, forge = w.rng, w.forge
        async with self.episode(w, stream, protocol, MESSAGE_S) as tail:
            reader = FrameReader(stream)
            wait = self.get_wait_s(served)
            for _ in range(rng.choice((0, 1, 2, 4, 8))):
                # An ack flood and a get that proves the handler read it, or gets alone,
                # pipelined (the handler reads several per stream); taken from the budget
                # at once, so that whatever is taken is sent.
                acks = rng.choice((2, 8, 32)) if rng.random() < 0.35 else 0
                gets = 1 if acks else rng.choice((1, 2, 4))
                granted = self.take_up_to(acks + gets)
                gets = min(gets, granted)
                acks = granted - gets
                tail.pending = [("ack", "ack-flood")] * acks + [("get", "valid")] * gets
                data = b"".join(frame(pack(forge.ack(ok=rng.random() < 0.15))) for _ in range(acks))
                data += b"".join(frame(pack(forge.get(served))) for _ in range(gets))
                await write_all(stream, data)
                t1 = trio.current_time()
                with trio.fail_after(MESSAGE_S + gets * wait + SLACK_S):
                    for _ in range(gets):
                        await reader.frame()
                dt = trio.current_time() - t1
                pending, tail.pending = tail.pending, []
                for kind, how in pending:
                    answer = "reply" if kind == "get" else "open"
                    tail.record(kind, how, Outcome(answer, dt, MESSAGE_S + gets * wait), wait > 0)
            x = rng.random()
            kind, doc = (
                ("get", forge.get(served))
                if x < 0.6
                else (("ack", forge.ack()) if x < 0.8 else ("other", forge.other_kind()))
            )
            mutation, body = w.mut(doc)
            how, data, _ = framings(rng, body)
            stalled = tail.stall(rng)
            self.take()
            deadline = (MESSAGE_S if ends_mid_frame(data) else IDLE_S) if stalled else MESSAGE_S
            await tail.last(kind, f"{mutation}/{how}", data, deadline + wait, rng=rng,
                            waited=wait > 0)  # fmt: skip

    async def ep_fping(self, w: Worker, t: Target) -> None:
        rng = w.rng
        stream = await self.opened(w, t, PROTO_FPING, "open")
        if stream is None:
            return
        async with self.episode(w, stream, PROTO_FPING, FPING_S) as tail:
            mutation, body = w.mut(w.forge.ping(), valid_p=0.2)
            how, data, _ = framings(rng, body)
            self.take()
            tail.stall(rng)
            await tail.last("ping", f"{mutation}/{how}", data, FPING_S, rng=rng)

    # -- libp2p's own protocols --
    async def ep_lping(self, w: Worker, t: Target) -> None:
        """/ipfs/ping/1.0.0: 32-byte payloads echoed; short, long and stalled ones."""
        rng = w.rng
        stream = await self.opened(w, t, PROTO_LPING, "open")
        if stream is None:
            return
        async with self.episode(w, stream, PROTO_LPING, LPING_S) as tail:
            for _ in range(rng.choice((0, 1, 3))):  # honest pings first: each is echoed
                self.take()
                tail.pending = [("ping", "valid")]
                payload = rng.randbytes(32)
                await write_all(stream, payload)
                t1 = trio.current_time()
                echo = b""
                with trio.fail_after(LPING_S + SLACK_S):
                    while len(echo) < 32:
                        echo += await read_some(stream, 32 - len(echo))
                tail.pending = []
                kind = "ping" if echo == payload else "ping-wrong-echo"
                tail.record(kind, "valid", Outcome("reply", trio.current_time() - t1, LPING_S))
            size = rng.choice((0, 1, 16, 31, 33, 64, 4096, 70000))
            if size % 32:
                tail.stall(rng, 0.15)
            self.take()
            # Each whole 32 bytes is one ping, echoed under its own RESP_TIMEOUT.
            await tail.last("ping", f"{size}-bytes", rng.randbytes(size),
                            LPING_S * (size // 32 + 1), rng=rng)  # fmt: skip

    async def ep_identify(self, w: Worker, t: Target) -> None:
        """/ipfs/id/1.0.0: the daemon writes its identify record and closes; garbage
        written at it must change nothing."""
        rng = w.rng
        stream = await self.opened(w, t, PROTO_ID, "open")
        if stream is None:
            return
        async with self.episode(w, stream, PROTO_ID, NEGOTIATE_S) as tail:
            self.take()
            mutation = "valid"
            if rng.random() < 0.5:
                mutation = "garbage-written"
                with contextlib.suppress(Ended):
                    await write_all(stream, rng.randbytes(rng.choice((1, 100, 5000))))
            await tail.last("identify", mutation, b"", NEGOTIATE_S, end_write=False)

    def _identify_record(self, rng: random.Random) -> tuple[str, bytes]:
        from libp2p.identity.identify.pb import identify_pb2

        msg = identify_pb2.Identify(
            protocol_version="ipfs/0.1.0",
            agent_version="fuzz/1",
            public_key=self.key_pair.public_key.serialize(),
            listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/1").to_bytes()],
            observed_addr=multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/2").to_bytes(),
            protocols=[PROTO_SHARD],
        )
        what = rng.choice(
            (
                "valid",
                "garbage-addrs",
                "many-protocols",
                "bad-key",
                "bad-record",
                "huge-agent",
                "random",
                "other-key",
            )
        )
        if what == "garbage-addrs":
            del msg.listen_addrs[:]
            msg.listen_addrs.extend(rng.randbytes(rng.randint(0, 40)) for _ in range(50))
            msg.observed_addr = rng.randbytes(9)
        elif what == "many-protocols":
            msg.protocols.extend(f"/p/{i}/" + "x" * rng.randint(0, 200) for i in range(3000))
        elif what == "bad-key":
            msg.public_key = rng.randbytes(rng.choice((0, 5, 36, 300)))
        elif what == "bad-record":
            msg.signedPeerRecord = rng.randbytes(rng.choice((1, 64, 4000)))
        elif what == "huge-agent":
            msg.agent_version = "a" * 500_000
        elif what == "other-key":
            msg.public_key = create_new_key_pair().public_key.serialize()
        body = msg.SerializeToString() if what != "random" else rng.randbytes(rng.randint(1, 999))
        return what, body

    async def ep_idpush(self, w: Worker, t: Target) -> None:
        """/ipfs/id/push/1.0.0: one varint-prefixed Identify, mutated or lying."""
        rng = w.rng
        stream = await self.opened(w, t, PROTO_IDPUSH, "open")
        if stream is None:
            return
        async with self.episode(w, stream, PROTO_IDPUSH, IDPUSH_S) as tail:
            what, body = self._identify_record(rng)
            x = rng.random()
            if x < 0.7:
                how, data = "framed", varint(len(body)) + body
            elif x < 0.8:
                how, data = "long-prefix", varint(len(body) + 1000) + body
            elif x < 0.88:
                how, data = "huge-prefix", varint(rng.choice(((1 << 20) + 1, 1 << 40))) + body[:9]
            elif x < 0.94:
                how, data = "bad-varint", b"\xff" * rng.choice((3, 10, 11)) + body[:9]
            else:
                how, data = "cut", (varint(len(body)) + body)[: rng.randint(1, 8)]
            if how in ("long-prefix", "cut"):
                tail.stall(rng, 0.3)
            self.take()
            await tail.last("identify", f"{what}/{how}", data, IDPUSH_S, rng=rng)

    async def ep_multistream(self, w: Worker, t: Target) -> None:
        """Multistream-select on a fresh yamux stream, by hand: unknown protocols (each
        answered "na"), `ls`, broken headers, lying lengths, stalls mid-negotiation."""
        rng = w.rng
        self.take()
        t0 = trio.current_time()
        try:
            await self.ensure(t)
            conns = self.host.get_network().connections.get(t.peer) or []  # type: ignore[attr-defined]
            if not conns:
                raise Refused("no connection")
            with trio.fail_after(NEGOTIATE_S + SLACK_S):
                stream = await conns[0].muxed_conn.open_stream()
        except (Refused, Exception) as e:
            out = Outcome("refused", trio.current_time() - t0, NEGOTIATE_S)
            self.record("multistream", "open", type(e).__name__, out, w.label())
            return
        line = lambda s: varint(len(s) + 1) + s + b"\n"  # noqa: E731
        async with self.episode(w, stream, "multistream", NEGOTIATE_S) as tail:
            header = line(MULTISTREAM[:-1])
            x = rng.random()
            if x < 0.35:  # a good header, then protocols this node does not speak
                tail.pending = [("propose", "header")]  # the input taken before the open
                await write_all(stream, header)
                for i in range(rng.choice((1, 4, 10))):
                    if i:
                        self.take()
                    proto = rng.choice(
                        (b"/nope/1.0.0", b"ls", b"/fflnode/shard/9.9.9", b"/" + b"x" * 2000, b"")
                    )
                    tail.pending = [("propose", proto[:12].decode("latin1"))]
                    await write_all(stream, line(proto))
                    t1 = trio.current_time()
                    with trio.fail_after(NEGOTIATE_S + SLACK_S):
                        await read_some(stream)  # "na" (after the header, the first time)
                    dt = trio.current_time() - t1
                    (kind, mutation), tail.pending = tail.pending[0], []
                    tail.record(kind, mutation, Outcome("reply", dt, NEGOTIATE_S))
                self.take()
                await tail.last("eof-after-na", "valid", b"", NEGOTIATE_S)
                return
            variants = {
                "garbage": lambda: rng.randbytes(rng.randint(1, 300)),
                "bad-header": lambda: line(b"/multistream/2.0.0") + line(PROTO_SHARD.encode()),
                "no-newline": lambda: varint(19) + MULTISTREAM[:-1] + b"X",
                "huge-varint": lambda: (
                    varint(rng.choice((1 << 16, 1 << 32, (1 << 63) - 1))) + b"/x"
                ),
                "bad-varint": lambda: b"\xff" * 11,
                "long-proto": lambda: header + line(b"/" + b"p" * 70000),
                "cut-header": lambda: header[: rng.randint(1, len(header) - 1)],
                "cut-proto": lambda: header + line(PROTO_SHARD.encode())[:5],
                "nul-proto": lambda: header + line(b"/fflnode/shard/1.0.0\x00"),
            }
            name = rng.choice(list(variants))
            data = variants[name]()
            if name.startswith("cut"):
                tail.stall(rng, 0.3)
            await tail.last("negotiate", name, data, NEGOTIATE_S, rng=rng)

    # -- GossipSub, raw RPCs on /meshsub --
    def _rpc(self, w: Worker) -> tuple[str, str, bytes]:
        """One RPC: (kind, mutation, varint-framed bytes)."""
        rng, forge = w.rng, w.forge
        rpc = rpc_pb2.RPC()
        x = rng.random()
        if x < 0.72:
            kind, doc = forge.announcement()
            mutation, payload = w.mut(doc, valid_p=0.08)
            topic = (
                self.topics[0] if rng.random() < 0.85 or len(self.topics) < 2 else self.topics[1]
            )
            if rng.random() < 0.03:
                topic = "/fflnode/other/announce/1"
            self.seqno += 1
            msg = signed_message(self.key_pair, self.me, topic, payload, self.seqno)
            y = rng.random()
            if y < 0.03:
                msg.signature = bytes(b ^ 1 for b in msg.signature)
                mutation += "/bad-signature"
            elif y < 0.05:
                msg.from_id = create_new_key_pair().public_key.serialize()[:20]
                mutation += "/foreign-from"
            elif y < 0.06:
                msg.ClearField("signature")
                mutation += "/unsigned"
            elif y < 0.07:
                msg.topicIDs.extend(f"/t/{i}" for i in range(200))
                mutation += "/many-topics"
            elif y < 0.08:
                msg.key = rng.randbytes(rng.choice((0, 7, 300)))
                mutation += "/bad-key"
            rpc.publish.append(msg)
            if rng.random() < 0.02:
                rpc.senderRecord = rng.randbytes(rng.choice((1, 100)))
                mutation += "/bad-sender-record"
            return f"publish:{kind}", mutation, rpc_bytes(rpc)
        if x < 0.86:
            ctl = rpc.control
            what = rng.choice(("ihave", "iwant", "graft", "prune", "idontwant"))
            n = rng.choice((1, 10, 1000, 5000))
            topic = rng.choice((*self.topics, "/nope", "x" * 2000))
            if what == "ihave":
                ctl.ihave.add(topicID=topic, messageIDs=[rng.randbytes(20) for _ in range(n)])
            elif what == "iwant":
                ctl.iwant.add(messageIDs=[rng.randbytes(20) for _ in range(n)])
            elif what == "graft":
                for _ in range(min(n, 50)):
                    ctl.graft.add(topicID=topic)
            elif what == "prune":
                p = ctl.prune.add(topicID=topic, backoff=rng.choice((0, 1, (1 << 64) - 1)))
                for _ in range(min(n, 100)):
                    p.peers.add(peerID=rng.randbytes(38), signedPeerRecord=rng.randbytes(30))
            else:
                ctl.idontwant.add(messageIDs=[rng.randbytes(20) for _ in range(n)])
            return "control", f"{what}-{n}", rpc_bytes(rpc)
        if x < 0.95:
            n = rng.choice((1, 5, 100, 300))
            for i in range(n):
                rpc.subscriptions.add(
                    subscribe=rng.random() < 0.7,
                    topicid=rng.choice((*self.topics, f"/t/{i}", "", "\x00" * 40)),
                )
            return "subscriptions", f"subs-{n}", rpc_bytes(rpc)
        rpc.senderRecord = rng.randbytes(rng.choice((1, 64, 2000)))
        return "sender-record", "garbage", rpc_bytes(rpc)

    async def ep_meshsub(self, w: Worker, t: Target) -> None:
        """A batch of RPCs on a GossipSub stream (publishes of every announcement kind,
        mutated; control floods; subscription floods), then garbage that ends it."""
        rng = w.rng
        proto = PROTO_MESH11 if rng.random() < 0.75 else PROTO_MESH10
        stream = await self.opened(w, t, proto, "open")
        if stream is None:
            return
        async with self.episode(w, stream, proto, LONG_LIVED) as tail:
            batch = self.take_up_to(rng.randint(*PUBSUB_BATCH) + 1) - 1  # and the ending
            for _ in range(batch):
                kind, mutation, data = self._rpc(w)
                tail.pending.append((kind, mutation))
                await write_all(stream, data)
            body = rpc_bytes(
                rpc_pb2.RPC(subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=True, topicid="/x")])
            )
            ending = rng.choice(
                ("decode-error", "too-large", "bad-varint", "cut-eof", "cut-stall", "eof")
            )
            data = {
                "decode-error": lambda: varint(40) + rng.randbytes(40),
                "too-large": lambda: (
                    varint(rng.choice(((1 << 20) + 1, 1 << 30))) + rng.randbytes(50)
                ),
                "bad-varint": lambda: b"\xff" * 11,
                "cut-eof": lambda: body[: rng.randint(1, len(body) - 1)],
                "cut-stall": lambda: body[: rng.randint(1, len(body) - 1)],
                "eof": lambda: b"",
            }[ending]()
            if ending == "cut-stall" and not tail.stall(rng, 0.5):
                ending = "cut-eof"
            # GossipSub streams are long-lived: no deadline applies, only a look.
            hold = rng.choice((2.0, 5.0)) if tail.stalled else 0.5
            await tail.last("rpc-end", ending, data, LONG_LIVED, rng=rng, hold_s=hold)

    # -- below libp2p: raw TCP, the Noise handshake, and inside the secure channel --
    async def ep_tcp(self, w: Worker, t: Target) -> None:
        """Raw bytes on a new TCP connection: before multistream, in the security
        negotiation, inside the Noise handshake (a real first message, then a broken
        third), with lying Noise lengths and stalls."""
        rng = w.rng
        self.take()
        line = lambda s: varint(len(s) + 1) + s + b"\n"  # noqa: E731
        header = line(MULTISTREAM[:-1])
        variant = rng.choice(
            (
                "garbage",
                "garbage",
                "header-garbage",
                "wrong-security",
                "noise-short",
                "noise-lying-length",
                "noise-msg3-garbage",
                "noise-msg3-garbage",
                "noise-msg3-cut",
                "cut-header",
                "eof",
            )
        )
        t0 = trio.current_time()
        try:
            with trio.fail_after(UPGRADE_S + SLACK_S):
                sock = SockStream(await trio.open_tcp_stream("127.0.0.1", t.port))
        except (OSError, trio.TooSlowError) as e:
            self.record(
                "tcp",
                "connect",
                type(e).__name__,
                Outcome("refused", trio.current_time() - t0, UPGRADE_S),
                w.label(),
            )
            return
        async with self.episode(w, sock, "tcp", UPGRADE_S, since=t0, half=SockStream.close_write,
                                close=SockStream.aclose) as tail:  # fmt: skip
            tail.pending = [("handshake", variant)]
            if variant == "garbage":
                data = rng.randbytes(rng.choice((1, 19, 20, 21, 500, 2000)))
                if data[:1] == b"\x13":
                    data = b"\x00" + data[1:]
                await write_all(sock, data)
            elif variant == "header-garbage":
                await write_all(sock, header + rng.randbytes(rng.randint(1, 300)))
            elif variant == "wrong-security":
                proto = rng.choice(
                    (b"/tls/1.0.0", b"/plaintext/2.0.0", b"/noise/9", b"/secio/1.0.0")
                )
                await write_all(sock, header + line(proto))
            elif variant == "cut-header":
                await write_all(sock, header[: rng.randint(1, len(header) - 1)])
                tail.stall(rng, 0.3)
            elif variant != "eof":
                await write_all(sock, header + line(b"/noise"))
                await read_upto(sock, len(header) + len(line(b"/noise")), UPGRADE_S + SLACK_S)
                if variant == "noise-short":
                    await write_all(sock, struct.pack(">H", 5) + rng.randbytes(5))
                elif variant == "noise-lying-length":
                    await write_all(sock, b"\xff\xff" + rng.randbytes(rng.randint(0, 40)))
                    tail.stall(rng, 0.5)
                else:  # a valid first message (an X25519 public key is any 32 bytes)
                    await write_all(sock, struct.pack(">H", 32) + rng.randbytes(32))
                    head = await read_upto(sock, 2, UPGRADE_S + SLACK_S)
                    (n,) = struct.unpack(">H", head[:2])
                    await read_upto(sock, 2 + n, UPGRADE_S + SLACK_S, head)
                    msg3 = rng.randbytes(rng.choice((0, 16, 48, 64, 200, 1000)))
                    if variant == "noise-msg3-cut":
                        await write_all(sock, struct.pack(">H", len(msg3) + 50) + msg3)
                        tail.stall(rng, 0.5)
                    else:
                        await write_all(sock, struct.pack(">H", len(msg3)) + msg3)
            tail.pending = []
            await tail.last("handshake", variant, b"", UPGRADE_S)

    async def ep_secure(self, w: Worker, t: Target) -> None:
        """A real Noise handshake, then garbage where multistream and yamux belong:
        broken muxer negotiation, and mutated yamux frames."""
        rng = w.rng
        self.take()
        t0 = trio.current_time()
        upgrader = self.host.get_network().upgrader  # type: ignore[attr-defined]
        try:
            with trio.fail_after(UPGRADE_S + SLACK_S):
                tcp = await trio.open_tcp_stream("127.0.0.1", t.port)
                raw = RawConnection(TrioTCPStream(tcp), True)
                secure = await upgrader.upgrade_security(raw, True, t.peer)
        except Exception as e:
            self._refused(t, e)
            out = Outcome("refused", trio.current_time() - t0, UPGRADE_S)
            self.record("secure", "handshake", type(e).__name__, out, w.label())
            return
        line = lambda s: varint(len(s) + 1) + s + b"\n"  # noqa: E731
        header = line(MULTISTREAM[:-1])
        variant = rng.choice(("garbage", "wrong-muxer", "yamux", "yamux", "yamux", "yamux"))
        deadline: float | None = UPGRADE_S
        async with self.episode(w, secure, "secure", UPGRADE_S, since=t0,
                                close=close_secure) as tail:  # fmt: skip
            tail.pending = [("frames", variant)]
            if variant == "garbage":
                await write_all(secure, rng.randbytes(rng.randint(1, 500)))
            elif variant == "wrong-muxer":
                await write_all(secure, header + line(rng.choice((b"/mplex/6.7.0", b"/x"))))
            else:
                await write_all(secure, header + line(b"/yamux/1.0.0"))
                await read_upto(
                    secure, len(header) + len(line(b"/yamux/1.0.0")), UPGRADE_S + SLACK_S
                )
                variant, frames = yamux_garbage(rng)
                tail.pending = [("frames", variant)]
                await write_all(secure, frames)
                deadline = tail.deadline_s = LONG_LIVED  # a live connection: it may stay
            tail.pending = []
            hold = rng.choice((0.5, 2.0))
            await tail.last("frames", variant, b"", deadline, hold_s=hold, end_write=False)

    # -- the fast path (fflnode.p2p.fastpath) --
    async def identities(self) -> tuple[ftls.TlsIdentity, ftls.TlsIdentity]:
        """Ours and the stranger's, made by the first worker that asks. Made twice, an
        offer could name one certificate of ours and the channel present the other."""
        async with self.tls_made:
            if self.tls is None or self.stranger is None:
                stranger_keys = create_new_key_pair(os.urandom(32))
                make = ftls.TlsIdentity.generate
                self.tls = await trio.to_thread.run_sync(make, self.key_pair)
                self.stranger = await trio.to_thread.run_sync(make, stranger_keys)
        return self.tls, self.stranger

    def tls_context(self, who: ftls.TlsIdentity, server_cert: bytes) -> ssl.SSLContext:
        """A client context presenting `who`'s certificate, pinning the daemon's."""
        key = (str(who.peer_id), server_cert)
        ctx = self.tls_contexts.get(key)
        if ctx is None:
            with who.chain_file() as chain:
                ctx = ftls.client_context(chain, server_cert)
            self.tls_contexts[key] = ctx
        return ctx

    def offer_request(self, rng: random.Random, cert: bytes, other: bytes) -> tuple[str, bytes]:
        """A request for an offer: ours, or one of the ways to get it wrong."""
        what = rng.choice(
            ("valid", "valid", "other-peer-cert", "flipped-cert", "bad-magic", "garbage",
             "length-over", "length-under", "length-huge", "cut", "empty", "oversized",
             "trailing")
        )  # fmt: skip
        n = ffast.U16.pack
        if what == "valid":
            return what, ffast.encode_request(cert)
        if what == "other-peer-cert":  # a valid certificate proving another peer ID
            return what, ffast.encode_request(other)
        if what == "flipped-cert":
            raw = bytearray(cert)
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            return what, ffast.encode_request(bytes(raw))
        if what == "bad-magic":
            return what, b"FFP2" + n(len(cert)) + cert
        if what == "garbage":
            return what, rng.randbytes(rng.choice((1, 5, 64, 1000)))
        if what == "length-over":
            return what, ffast.MAGIC + n(len(cert) + 1) + cert
        if what == "length-under":
            return what, ffast.MAGIC + n(len(cert) - 1) + cert
        if what == "length-huge":
            return what, ffast.MAGIC + n(0xFFFF) + cert
        if what == "cut":
            data = ffast.encode_request(cert)
            return what, data[: rng.randrange(1, len(data))]
        if what == "empty":
            return what, b""
        if what == "oversized":
            return what, ffast.MAGIC + n(0xFFFF) + rng.randbytes(ffast.MAX_REQUEST_BYTES + 100)
        return what, ffast.encode_request(cert) + rng.randbytes(rng.choice((1, 100)))

    async def ep_fastoffer(self, w: Worker, t: Target) -> None:
        """/fflnode/fastpath/1.0.0: one request (honest, or mutated), then the daemon's
        offer, refusal or reset; stalled requests wait out the offer deadline."""
        rng = w.rng
        ours, stranger = await self.identities()
        stream = await self.opened(w, t, PROTO_FASTOFFER, "open")
        if stream is None:
            return
        async with self.episode(w, stream, PROTO_FASTOFFER, FASTOFFER_S) as tail:
            what, data = self.offer_request(rng, ours.cert_der, stranger.cert_der)
            self.take()
            tail.stall(rng)
            await tail.last("request", what, data, FASTOFFER_S, rng=rng)

    async def ask_offer(self, w: Worker, t: Target) -> ffast.Offer | None:
        """An honest request for an offer (an input, recorded): the daemon's offer, or
        None when it refused (busy: this identity holds its live offers) or failed."""
        ours, _ = await self.identities()
        stream = await self.opened(w, t, PROTO_FASTOFFER, "open")
        if stream is None:
            return None
        self.take()
        t0 = trio.current_time()
        answer, offer = "reply", None
        try:
            with trio.fail_after(FASTOFFER_S + SLACK_S):
                await write_all(stream, ffast.encode_request(ours.cert_der))
                await half_close(stream)
                data = b""
                with contextlib.suppress(Ended):
                    while len(data) <= ffast.MAX_REPLY_BYTES:
                        data += await read_some(stream)
            reply = ffast.decode_reply(data, str(t.peer)) if data else None
            offer = reply if isinstance(reply, ffast.Offer) else None
            answer = "reply" if data else "close"
        except trio.TooSlowError:
            answer = "hang"
        except ffast.FastPathError:
            answer = "reply"  # answered; not ours to judge (the oracle is the daemon's)
        finally:
            await abandon(stream)
        out = Outcome(answer, trio.current_time() - t0, FASTOFFER_S)
        self.record(PROTO_FASTOFFER, "request", "valid", out, w.label())
        return offer

    async def ep_fasttls(self, w: Worker, t: Target) -> None:
        """The fast path's TLS port, reached with a real offer: garbage, a stalled or
        broken TLS handshake, a stranger's certificate, a wrong or reused token, TLS
        records torn by raw bytes, and a real channel carrying hostile merge requests."""
        rng = w.rng
        offer = await self.ask_offer(w, t)
        if offer is None:
            return
        ours, stranger = await self.identities()
        variant = rng.choice(
            ("garbage", "stall", "client-hello-cut", "stranger-cert", "wrong-token",
             "token-cut", "torn-records", "channel", "channel", "reuse-token")
        )  # fmt: skip
        uses = 2 if variant == "reuse-token" else 1
        for use in range(uses):
            kind = "reuse" if use else variant
            tcp = await self.tls_connect(w, offer.port, kind)
            if tcp is None:
                return
            await self.tls_input(w, tcp, offer, kind, ours, stranger)

    async def tls_connect(self, w: Worker, port: int, kind: str) -> trio.SocketStream | None:
        self.take()
        t0 = trio.current_time()
        try:
            with trio.fail_after(FASTTLS_S + SLACK_S):
                return await trio.open_tcp_stream("127.0.0.1", port)
        except (OSError, trio.TooSlowError) as e:
            out = Outcome("refused", trio.current_time() - t0, FASTTLS_S)
            self.record(FASTTLS, kind, f"connect:{type(e).__name__}", out, w.label())
            return None

    async def tls_input(
        self,
        w: Worker,
        tcp: trio.SocketStream,
        offer: ffast.Offer,
        kind: str,
        ours: ftls.TlsIdentity,
        stranger: ftls.TlsIdentity,
    ) -> None:
        """One input on a fresh TCP connection to the TLS port (its budget taken). A
        stranger's certificate, a wrong token or a reused one must never be ACCEPTed:
        that is a violation (Stats.violations), whatever else the daemon does."""
        rng = w.rng
        sock = SockStream(tcp)
        t0 = trio.current_time()
        who = stranger if kind == "stranger-cert" else ours
        close = SockStream.aclose
        half = SockStream.close_write
        async with self.episode(
            w, sock, FASTTLS, FASTTLS_S, since=t0, half=half, close=close
        ) as tail:
            tail.pending = [("connection", kind)]
            if kind == "garbage":
                await write_all(sock, rng.randbytes(rng.choice((1, 5, 300, 5000))))
            elif kind == "stall":
                tail.stall(rng, 1.0)
            elif kind == "client-hello-cut":  # a TLS record header promising more
                header = b"\x16\x03\x01\x02\x00"
                await write_all(sock, header + rng.randbytes(rng.randint(0, 100)))
                tail.stall(rng, 0.5)
            else:
                ctx = self.tls_context(who, offer.cert)
                channel = ffast.FastChannel(tcp, ctx, server_side=False)
                try:
                    with trio.fail_after(FASTTLS_S + SLACK_S):
                        await channel.do_handshake()
                except (ssl.SSLError, trio.BrokenResourceError):
                    raise Ended("close") from None  # the daemon refused the handshake
                channel.peer_id = self.me
                stream = ffast.ChannelStream(channel)
                token = offer.token
                if kind == "wrong-token":
                    token = rng.randbytes(ffast.TOKEN_BYTES)
                elif kind == "token-cut":
                    token = token[: rng.randrange(ffast.TOKEN_BYTES)]
                    tail.stall(rng, 1.0)
                if kind == "torn-records":  # raw bytes where TLS records belong
                    await write_all(sock, rng.randbytes(rng.choice((5, 64, 2000))))
                else:
                    await write_all(stream, token)
                if kind in ("stranger-cert", "wrong-token", "reuse"):
                    tail.pending = []
                    out = await until_end(stream, FASTTLS_S)
                    if out.answer in ("reply", "lingered"):
                        self.stats.violations.append(
                            f"{FASTTLS} {kind}: the daemon ACCEPTed a channel [{w.label()}]"
                        )
                    tail.record("connection", kind, out, tail.stalled)
                    return
                if kind == "channel":  # the merge's channel: its bulk protocol, attacked
                    answer = await read_upto(stream, len(ffast.ACCEPT), FASTTLS_S + SLACK_S)
                    tail.pending = []
                    ok = "accepted" if answer == ffast.ACCEPT else "wrong-answer"
                    tail.record(kind, ok, Outcome("reply", trio.current_time() - t0, FASTTLS_S))
                    await self.serve_inputs(w, stream, FASTTLS, PROTO_MERGE)
                    return
            tail.pending = []
            await tail.last("connection", kind, b"", FASTTLS_S)


async def close_secure(secure: Any) -> None:
    """Close a secure session the attacker is done with (bounded)."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0), contextlib.suppress(Exception):
        await secure.close()


YAMUX_HEADER = struct.Struct(">BBHII")  # version, type, flags, stream id, length


def yamux_garbage(rng: random.Random) -> tuple[str, bytes]:
    """Mutated yamux frames (spec: 12-byte header; types data 0, window update 1, ping 2,
    go away 3; flags SYN 1, ACK 2, FIN 4, RST 8)."""
    h = YAMUX_HEADER.pack
    variants: dict[str, Callable[[], bytes]] = {
        "random-headers": lambda: rng.randbytes(12 * rng.randint(1, 20)),
        "data-lying-length": lambda: h(0, 0, 1, 1, 1000) + rng.randbytes(10),
        "data-huge-length": lambda: h(0, 0, 1, 1, 20 << 20) + rng.randbytes(100),
        "window-huge": lambda: h(0, 1, 1, 1, 0xFFFFFFFF) + h(0, 1, 0, 1, 0xFFFFFFFF),
        "ping-flood": lambda: b"".join(h(0, 2, 1, 0, i) for i in range(500)),
        "go-away": lambda: h(0, 3, 0, 0, rng.choice((0, 1, 2, 0xFFFFFFFF))),
        "bad-version": lambda: h(rng.choice((1, 2, 255)), 0, 1, 1, 4) + b"abcd",
        "bad-type": lambda: h(0, rng.choice((4, 9, 255)), 1, 1, 4) + b"abcd",
        "even-stream-syn": lambda: h(0, 1, 1, 2, 0),
        "stream-zero-data": lambda: h(0, 0, 0, 0, 4) + b"abcd",
        "data-unopened": lambda: h(0, 0, 0, 777, 8) + rng.randbytes(8),
        "rst-unknown": lambda: h(0, 1, 8, 999, 0),
        "syn-flood": lambda: b"".join(h(0, 1, 1, 2 * i + 1, 0) for i in range(300)),
        "all-flags": lambda: h(0, 0, 0xFFFF, 1, 4) + b"abcd",
        "cut-header": lambda: h(0, 0, 1, 1, 4)[: rng.randint(1, 11)],
    }
    name = rng.choice(list(variants))
    return name, variants[name]()


class SockStream:
    """A raw trio TCP stream with the read/write/close interface the episodes use."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def read(self, n: int = 65536) -> bytes:
        return await self.stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close_write(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.send_eof()

    async def close(self) -> None:
        await self.aclose()

    async def reset(self) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self.stream.aclose()


async def read_upto(stream: Any, n: int, timeout_s: float, have: bytes = b"") -> bytes:
    """At least `n` bytes (with `have` first); raises Ended or TooSlowError."""
    data = have
    with trio.fail_after(timeout_s):
        while len(data) < n:
            data += await read_some(stream, max(1, n - len(data)))
    return data


EPISODES: dict[str, Callable[[Attacker, Worker, Target], Awaitable[None]]] = {
    "shard": lambda a, w, t: a.ep_serve(w, t, PROTO_SHARD),
    "merge": lambda a, w, t: a.ep_serve(w, t, PROTO_MERGE),
    "state": lambda a, w, t: a.ep_serve(w, t, PROTO_STATE),
    "fping": Attacker.ep_fping,
    "meshsub": Attacker.ep_meshsub,
    "identify": Attacker.ep_identify,
    "idpush": Attacker.ep_idpush,
    "lping": Attacker.ep_lping,
    "multistream": Attacker.ep_multistream,
    "tcp": Attacker.ep_tcp,
    "secure": Attacker.ep_secure,
    "fastoffer": Attacker.ep_fastoffer,
    "fasttls": Attacker.ep_fasttls,
    "fastfallback": lambda a, w, t: a.ep_serve(w, t, PROTO_FASTFALLBACK, PROTO_MERGE),
}


# ----------------------------------------------------------------------------- insider
# The insider goes silent this many rounds before the run's end, so the two daemons
# merge between themselves (its heartbeats stop; they call it dead after 5 s).
LEAVE_BEFORE_END_ROUNDS = 40
SERVED = "/fflnode/shard/1.0.0 (served)"


def _body_views(header: dict[str, Any], body: bytes) -> list[tuple[str, str, list[int], bytes]]:
    """A bulk body cut into its parts: (name, dtype, shape, bytes), by the header's
    announced layout (the layout the protocol describes: parts back to back)."""
    sizes = {"f32": 4, "f16": 2, "bf16": 2, "u8": 1, "i8": 1, "i16": 2, "i32": 4, "u32": 4}
    out, pos = [], 0
    for name, dtype, shape in header.get("parts", []):
        n = math.prod(shape) * sizes.get(dtype, 1)
        out.append((name, dtype, list(shape), body[pos : pos + n]))
        pos += n
    return out


def _digest(body: bytes) -> bytes:
    import hashlib

    return hashlib.blake2b(body, digest_size=16).digest()


def hostile_answer(
    rng: random.Random, mut: Mutator, request: dict[str, Any], template: tuple[dict, bytes] | None
) -> tuple[str, bytes, bytes, bool]:
    """A hostile answer to a daemon's `get`: (mutation, header bytes, body bytes, stall).

    Built from `template`, a real answer pulled from a daemon for the same kind of
    request (so lossy-codec bodies have the real holo/topk/sketch parts and shapes),
    with the request's round and index, then broken in one way."""
    if template is None:
        head = {
            "v": 1,
            "kind": "bulk",
            "run": request.get("run"),
            "round": request.get("round"),
            "what": request.get("what"),
            "index": request.get("index"),
            "codec": request.get("codec"),
            "parts": [["values", "f32", [4]]],
            "meta": {"start": rng.randrange(1 << 62)},
        }
        body = struct.pack("<4f", 0.5, -0.5, 1.0, 0.0)
    else:
        head = {k: v for k, v in template[0].items() if k != "_body"}
        head.update(round=request.get("round"), index=request.get("index"))
        head["meta"] = dict(head.get("meta") or {})
        head["meta"]["start"] = rng.randrange(1 << 62)  # never the daemons' own state
        body = template[1]
    parts = _body_views(head, body)
    stall = False

    def seal(h: dict[str, Any], b: bytes) -> tuple[bytes, bytes]:
        h = dict(h, nbytes=len(b), blake2b=_digest(b))
        return frame(pack(h)), b

    name = rng.choice(
        (
            "valid-shape-random-start",
            "digest-mismatch",
            "nan-inf-body",
            "random-part-bytes",
            "short-body-close",
            "short-body-stall",
            "nbytes-mismatch",
            "part-names",
            "part-dtype",
            "part-shape",
            "extra-part",
            "many-parts",
            "wrong-round",
            "wrong-index",
            "wrong-codec",
            "wrong-what",
            "meta-odd",
            "error-reply",
            "header-mutated",
            "garbage",
            "huge-nbytes-stall",
            "trailing-frames",
        )
    )
    if name == "valid-shape-random-start":
        h, b = seal(head, body)
        return name, h, b, stall
    if name == "digest-mismatch":
        h, _ = seal(head, body)
        b = bytearray(body)
        if b:
            b[rng.randrange(len(b))] ^= 0x40
        return name, h, bytes(b), stall
    if name == "nan-inf-body":
        floats = [p for p in parts if p[1] in ("f32", "f16")] or parts
        target = rng.choice(floats)
        b = bytearray(body)
        start = body.find(target[3]) if target[3] else 0
        special = struct.pack("<f", rng.choice((float("nan"), float("inf"), float("-inf"))))
        if target[1] == "f16":
            special = b"\x00\x7e"
        if len(target[3]) >= len(special):
            k = rng.randrange(len(target[3]) // len(special)) * len(special)
            b[start + k : start + k + len(special)] = special
        h, bb = seal(head, bytes(b))
        return name, h, bb, stall
    if name == "random-part-bytes":  # right layout, random content: codec validation
        target = rng.choice(parts) if parts else None
        b = bytearray(body)
        if target is not None and target[3]:
            start = body.find(target[3])
            b[start : start + len(target[3])] = rng.randbytes(len(target[3]))
        h, bb = seal(head, bytes(b))
        return name + (f":{target[0]}" if target else ""), h, bb, stall
    if name in ("short-body-close", "short-body-stall"):
        h, _ = seal(head, body)
        return name, h, body[: rng.randrange(max(1, len(body)))], name.endswith("stall")
    if name == "nbytes-mismatch":
        h = frame(
            pack(
                dict(
                    head,
                    nbytes=len(body) + rng.choice((-4, -1, 1, 4, 1 << 20)),
                    blake2b=_digest(body),
                )
            )
        )
        return name, h, body, stall
    hp = dict(head)
    if name == "part-names":
        hp["parts"] = [
            [rng.choice(("", "x" * 65, "values", "codes", "a")), d, s] for _, d, s in head["parts"]
        ]
    elif name == "part-dtype":
        hp["parts"] = [
            [n, rng.choice(("f64", "i64", "bool", "", "F32", 7)), s] for n, _, s in head["parts"]
        ]
    elif name == "part-shape":
        hp["parts"] = [
            [
                n,
                d,
                rng.choice(
                    ([*s, 1], [-1], [s[0] + 1] if s else [1], [1, 1, 1, 1, 1], [1 << 40], [])
                ),
            ]
            for n, d, s in head["parts"]
        ]
    elif name == "extra-part":
        hp["parts"] = [*head["parts"], ["extra", "u8", [4]]]
        body = body + b"\x00" * 4
    elif name == "many-parts":
        hp["parts"] = [[f"p{i}", "u8", [1]] for i in range(9)]
        body = b"\x00" * 9
    elif name == "wrong-round":
        hp["round"] = rng.choice(
            (request.get("round", 0) + 1, request.get("round", 0) - 1, 1 << 31, -1)
        )
    elif name == "wrong-index":
        hp["index"] = rng.choice((request.get("index", 0) + 1, 1 << 31, -1))
    elif name == "wrong-codec":
        hp["codec"] = rng.choice(("none", "holo", "topk", "sketch", "", "x" * 100))
    elif name == "wrong-what":
        hp["what"] = rng.choice(("weights", "merged", "premerge", "state", "nope"))
    elif name == "meta-odd":
        hp["meta"] = rng.choice(
            (
                {},
                {"start": 1.5},
                {"start": float("nan")},
                {"start": (1 << 64) - 1},
                {"start": -1},
                {f"k{i}": i for i in range(40)},
                {"start": 1, "x" * 100: 1},
            )
        )
    elif name == "error-reply":
        doc = {
            "v": 1,
            "kind": "error",
            "code": rng.choice(("gone", "", "x" * 5000)),
            "reason": rng.choice(("r", "\x00\x1b[31m", "é" * 2000)),
        }
        return name, frame(pack(doc)), b"", stall
    elif name == "header-mutated":
        mutation, raw = mut(dict(head, nbytes=len(body), blake2b=_digest(body)), valid_p=0.0)
        return f"header-{mutation}", frame(raw), body, stall
    elif name == "garbage":
        return name, rng.randbytes(rng.choice((1, 4, 64, 2000))), b"", stall
    elif name == "huge-nbytes-stall":
        n = rng.choice((1 << 20, 64 << 20))
        hp["parts"] = [["values", "f32", [n // 4]]]
        h = frame(pack(dict(hp, nbytes=n, blake2b=b"\x00" * 16)))
        return name, h, b"\x00" * 1000, True
    elif name == "trailing-frames":
        h, b = seal(dict(hp, meta={"start": 1}), body)
        return name, h, b + rng.randbytes(64), stall
    h, b = seal(hp, body)
    return name, h, b, stall


class Insider:
    """The attacker as the run's third member (mode "insider").

    What it does: joins (a heartbeat with the run descriptor copied from a daemon's
    heartbeat), agrees at the start barrier, answers every pull of its Delta with a
    hostile answer (`hostile_answer`), sends member requests from `attacker` (its gets
    are served), and goes silent LEAVE_BEFORE_END_ROUNDS before the end.
    What it leaves out, on purpose: hostile answers to merge pulls (it leaves before
    the merge: a member that serves broken shards fails the merge by design, MergeError
    after PULL_ATTEMPTS), and announcements that lie within the schema (a heartbeat
    claiming a round far ahead, a commitment of another member set, a merge attempt
    far ahead): those are Byzantine-member attacks on agreement, not hostile input, and
    the daemons follow them by design (the report lists what they do)."""

    def __init__(
        self,
        host: IHost,
        pubsub: Any,
        attacker: Attacker,
        targets: list[Target],
        run_id: str,
        rounds: int,
        seed: int,
    ) -> None:
        self.host, self.pubsub, self.attacker = host, pubsub, attacker
        self.targets, self.run_id, self.rounds = targets, run_id, rounds
        self.rng = random.Random(f"insider/{seed}")
        self.forge = Forge(self.rng, run_id, [str(t.peer) for t in targets], str(host.get_id()))
        self.mut = Mutator(self.rng, self.forge)
        self.admit: dict[str, bytes] = {}
        self.admitted = trio.Event()
        self.committed = trio.Event()
        self.left = trio.Event()
        self.honest_round = 0
        self.honest_phase: dict[str, str] = {}
        self.templates: dict[tuple[str, int], tuple[dict, bytes]] = {}
        self.seq = time.time_ns() // 1_000_000
        self.served = 0
        self.topic = f"/fflnode/{run_id}/announce/1"
        from fflnode.agreement import Agreement

        me = str(host.get_id())
        known = {me, *(str(t.peer) for t in targets)}
        self.agreement = Agreement(
            me,
            quorum=len(known),
            size=len(known),
            rank=lambda m: ID.from_base58(m).to_bytes(),
            eligible=known.__contains__,
        )

    # -- membership --
    async def receive(self) -> None:
        sub = await self.pubsub.subscribe(self.topic)
        while True:
            msg = await sub.get()
            try:
                doc = msgpack.unpackb(msg.data, raw=False, strict_map_key=False)
                sender = str(ID(msg.from_id))
            except Exception:
                continue
            if not isinstance(doc, dict) or sender == str(self.host.get_id()):
                continue
            kind = doc.get("kind")
            if kind == "hb" and isinstance(doc.get("admit"), dict):
                if not self.admit:
                    self.admit = dict(doc["admit"])
                    self.forge.admit = self.admit
                    self.admitted.set()
                if isinstance(doc.get("round"), int):
                    self.honest_round = max(self.honest_round, doc["round"])
                self.honest_phase[sender] = str(doc.get("phase"))
            elif kind == "start.ready" and isinstance(doc.get("members"), list):
                self.agreement.heard(
                    sender, [str(m) for m in doc["members"]], str(doc.get("stage"))
                )

    async def heartbeat(self) -> None:
        """One heartbeat a second, as a member does, until it is time to leave."""
        await self.admitted.wait()
        addrs = [str(a) for a in self.host.get_addrs()][:4]
        while not self.left.is_set():
            self.seq = max(self.seq + 1, time.time_ns() // 1_000_000)
            phase = "train" if self.committed.is_set() else "join"
            doc = {
                "v": 1,
                "kind": "hb",
                "run": self.run_id,
                "round": self.honest_round,
                "phase": phase,
                "addrs": addrs,
                "seq": self.seq,
                "admit": self.admit,
            }
            await self.pubsub.publish(self.topic, pack(doc))
            if self.honest_round >= self.rounds - LEAVE_BEFORE_END_ROUNDS or any(
                p in ("merge", "done") for p in self.honest_phase.values()
            ):
                self.left.set()
            await trio.sleep(1.0)  # the heartbeat period, not synchronisation

    async def barrier(self) -> None:
        """Agree on the start set as a member does (fflnode.agreement on our side)."""
        await self.admitted.wait()
        with trio.move_on_after(STARTUP_TIMEOUT_S * 2):
            while True:
                alive = [str(t.peer) for t in self.targets]
                decision = self.agreement.decide(alive)
                doc = {
                    "v": 1,
                    "kind": "start.ready",
                    "run": self.run_id,
                    "members": list(decision.members),
                    "stage": decision.stage,
                }
                await self.pubsub.publish(self.topic, pack(doc))
                if decision.committed:
                    self.committed.set()
                    for _ in range(10):  # keep the commitment visible, as members do
                        await trio.sleep(1.0)  # the announcement period
                        await self.pubsub.publish(self.topic, pack(doc))
                    return
                await trio.sleep(0.5)  # the announcement period while agreeing

    # -- templates and serving --
    async def template(
        self, what: str, index: int, request: dict[str, Any]
    ) -> tuple[dict, bytes] | None:
        """A real answer to the same kind of request, pulled from a daemon as a member."""
        key = (what, index)
        if key in self.templates:
            return self.templates[key]
        for t in self.targets:
            stream = None
            try:
                with trio.move_on_after(MESSAGE_S):
                    stream = await self.host.new_stream(t.peer, [PROTO_SHARD])
                    await write_all(stream, frame(pack(dict(request, kind="get", v=1))))
                    doc = await FrameReader(stream).frame()
                    if doc and doc.get("kind") == "bulk" and "_body" in doc:
                        self.templates[key] = (doc, doc["_body"])
                        return self.templates[key]
            except (Ended, Exception):
                pass
            finally:
                if stream is not None:
                    await abandon(stream)
        return None

    async def serve(self, stream: INetStream) -> None:
        """Answer a daemon's pulls of our Delta, each answer hostile in one way."""
        reader = FrameReader(stream)
        label = f"insider serve {self.served + 1}"
        async with self.attacker.episode(label, stream, SERVED, MESSAGE_S) as tail:
            for _ in range(16):  # a pull asks for a handful of chunks at most
                with trio.move_on_after(IDLE_S):
                    doc = await reader.frame()
                if not isinstance(doc, dict) or doc.get("kind") != "get":
                    continue
                if not self.attacker.budget.take(1):
                    return
                what = doc.get("what") if isinstance(doc.get("what"), str) else "delta"
                index = doc.get("index") if isinstance(doc.get("index"), int) else 0
                template = await self.template(what, index, doc)
                mutation, head, body, stall = hostile_answer(self.rng, self.mut, doc, template)
                if stall and self.rng.random() >= INSIDER_STALL_SHARE:
                    mutation, body, stall = "short-body-close", body[: len(body) // 2], False
                self.served += 1
                # A stalled answer holds the daemon's pull until its deadline (the round's
                # wait and the transfer's), not the short body's.
                deadline = MEMBER_SHARD_S if stall else MESSAGE_S
                # A stall here takes no stall slot: the daemon pulls, no worker waits.
                await tail.last(f"bulk:{what}", mutation, head + body, deadline,
                                waited=stall, end_write=not stall)  # fmt: skip
                return

    async def pong(self, stream: INetStream) -> None:
        """Answer membership pings honestly: a member that does not is disconnected."""
        answered = False
        try:
            with trio.move_on_after(FPING_S):
                doc = await FrameReader(stream).frame()
                if isinstance(doc, dict) and doc.get("kind") == "ping":
                    pong = {"v": 1, "kind": "pong", "run": self.run_id, "nonce": doc.get("nonce")}
                    await write_all(stream, frame(pack(pong)))
                    await half_close(stream)
                    answered = True
        except Ended:
            pass
        finally:
            if not answered:  # a reset could drop a pong still in flight
                await abandon(stream)

    async def merge_refusal(self, stream: INetStream) -> None:
        """Merge pulls get an `error`: the insider takes no part in the merge."""
        with contextlib.suppress(Ended):
            doc = {"v": 1, "kind": "error", "code": "not-member", "reason": "left"}
            await write_all(stream, frame(pack(doc)))
        await abandon(stream)


# ----------------------------------------------------------------------------- fuzzing
async def fuzz(
    attacker: Attacker,
    *,
    seed: int,
    session: int,
    stop: trio.Event,
    families: dict[str, int],
    workers: int,
    first_worker: int = 0,
    until: Callable[[], bool] = lambda: False,
) -> None:
    """`workers` concurrent tasks running episodes until `stop`, the budget, or `until()`
    (e.g. this identity is banned everywhere); then every episode is cancelled."""
    names, weights = list(families), list(families.values())
    peers = [str(t.peer) for t in attacker.targets]

    async def worker(w: Worker) -> None:
        while not (stop.is_set() or attacker.budget.spent or until()):
            await pace(attacker.stats)
            w.episode += 1
            w.forge.round, w.forge.codec, w.forge.numel = (
                attacker.round,
                attacker.codec,
                attacker.numel,
            )
            live = [t for t in attacker.targets if t.name not in attacker.banned_by]
            target = w.rng.choice(live or attacker.targets)
            family = w.rng.choices(names, weights)[0]
            try:
                await EPISODES[family](attacker, w, target)
            except OutOfBudget:
                return
            except Exception as e:  # the attacker's own tooling: counted, never fatal
                key = f"{family}: {type(e).__name__}"
                attacker.stats.attacker_errors[key] += 1
                if key not in attacker.stats.attacker_tracebacks:
                    import traceback

                    attacker.stats.attacker_tracebacks[key] = traceback.format_exc()[-3000:]
                await trio.sleep(0.01)  # a failing episode must not spin the loop
            await trio.sleep(0)

    with trio.CancelScope() as session_end:

        async def watch() -> None:
            # Only the session's end cancels episodes: one under way when the budget or
            # `until` ends the fuzzing still records its inputs (none takes a new one).
            await stop.wait()
            session_end.cancel()

        async with trio.open_nursery() as watcher:
            watcher.start_soon(watch)
            async with trio.open_nursery() as nursery:
                for i in range(workers):
                    k = first_worker + i
                    rng = random.Random(f"{seed}/{session}/{k}")
                    forge = Forge(rng, attacker.run_id, peers, str(attacker.me))
                    w = Worker(k, rng, forge, Mutator(rng, forge), seed, session)
                    nursery.start_soon(worker, w)
            watcher.cancel_scope.cancel()


async def pace(stats: Stats) -> None:
    """Wait (bounded by the session's end) while the attacker's own loop runs late."""
    lag = stats.lag
    if lag is None:
        return
    while True:
        now = trio.current_time()
        if lag.worst_between(now - PACE_WINDOW_S, now) <= PACE_LAG_S:
            return
        stats.paced_s += PACE_POLL_S
        await trio.sleep(PACE_POLL_S)  # a polling period while the loop catches up


def new_identity(seed: int, session: int, n: int) -> Any:
    """A reproducible Ed25519 key pair: identity n of a session."""
    return create_new_key_pair(random.Random(f"id/{seed}/{session}/{n}").randbytes(32))


@dataclass
class Plan:
    """One session: which mode, which codec, how many rounds, where its files go."""

    mode: str  # outsider | ban | insider
    codec: str
    rounds: int
    seed: int
    index: int
    out: Path
    workers: int = WORKERS
    families: dict[str, int] = field(default_factory=lambda: dict(FAMILY_WEIGHTS))

    @property
    def run_id(self) -> str:
        return f"fuzz-{self.seed}-{self.index}"


@dataclass
class Verdict:
    """What the oracle found in one session."""

    plan: Plan
    problems: list[str]
    inputs: int
    fuzz_seconds: float
    rounds_during_fuzz: list[int]
    rounds_completed: list[int]
    exit_codes: list[int | None]
    merged_hashes: list[str | None]
    vmhwm_mb: list[float]
    log_lines: list[int]
    log_per_peer_max: list[int]
    log_other: list[int]
    longest_round_stall_s: list[float]
    honest_missing_rounds: list[int]
    identities: int
    insider_served: int = 0
    attacker_lag_max_s: float = 0.0  # the attacker's own event loop, worst lateness
    daemon_lag_max_s: list[float] = field(default_factory=list)  # each daemon's, worst
    streams_peer_max: list[int] = field(default_factory=list)  # most streams one peer held
    streams_top: list[dict[str, int]] = field(default_factory=list)  # those, by protocol

    @property
    def ok(self) -> bool:
        return not self.problems


async def _watch_daemons(honest: list[Honest], stop: trio.Event, problems: list[str]) -> None:
    """Stop the session at the first daemon death or stalled training; and once both
    finished their run (exited), since nothing is left to attack."""
    while True:
        now = trio.current_time()
        for h in honest:
            assert h.proc is not None
            code = h.proc.poll()
            if code is not None and h.exit_code is None:
                h.exit_code, h.exited_at = code, now
                if code != 0:
                    problems.append(f"daemon {h.index} exited with code {code} (see {h.log_path})")
                    stop.set()
            training = h.exit_code is None and h.rounds_done < (h.rounds_planned or 1)
            if training and now - h.last_advance > ROUND_STALL_LIMIT_S:
                problems.append(
                    f"daemon {h.index} completed no round for {now - h.last_advance:.0f} s "
                    f"(at round {h.rounds_done})"
                )
                h.last_advance = now  # report a stall once
                stop.set()
        if all(h.exit_code is not None for h in honest):
            stop.set()
            return
        await trio.sleep(0.5)  # a polling period for process state, not synchronisation


async def _attack(
    plan: Plan,
    targets: list[Target],
    honest: list[Honest],
    budget: Budget,
    stats: Stats,
    stop: trio.Event,
    identities: list[str],
) -> int:
    """Run the mode's attacker(s) until `stop` or the budget; returns insider answers."""
    from fflnode.p2p.membership import announce_topic
    from fflnode.ssm.federation import state_topic

    topics = [announce_topic(plan.run_id), state_topic(plan.run_id)]
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]

    async def follow(attacker: Attacker) -> None:
        while True:
            attacker.round = max(h.rounds_done for h in honest)
            await trio.sleep(0.5)  # the forge's idea of the round: a period

    if plan.mode in ("outsider", "ban"):
        n = 0
        while not (stop.is_set() or budget.spent):
            key = new_identity(plan.seed, plan.index, n)
            host = build_host(key)
            identities.append(str(host.get_id()))
            stats.identities += 1
            async with running_host(host, listen), trio.open_nursery() as nursery:
                a = Attacker(host, key, targets, plan.run_id, stats, budget, topics=topics)
                a.codec = plan.codec
                nursery.start_soon(follow, a)
                banned = lambda a=a: len(a.banned_by) == len(targets)  # noqa: E731
                await fuzz(
                    a,
                    seed=plan.seed,
                    session=plan.index * 1000 + n,
                    stop=stop,
                    families=plan.families,
                    workers=plan.workers,
                    until=banned if plan.mode == "ban" else (lambda: False),
                )
                stats.refused_dials += len(a.banned_by)
                nursery.cancel_scope.cancel()
            n += 1
        return 0
    return await _attack_insider(plan, targets, honest, budget, stats, stop, identities, topics)


async def _attack_insider(
    plan: Plan,
    targets: list[Target],
    honest: list[Honest],
    budget: Budget,
    stats: Stats,
    stop: trio.Event,
    identities: list[str],
    topics: list[str],
) -> int:
    from libp2p.tools.anyio_service import background_trio_service

    from fflnode.p2p.host import build_pubsub

    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    mkey, okey = new_identity(plan.seed, plan.index, 0), new_identity(plan.seed, plan.index, 1)
    member, outsider = build_host(mkey), build_host(okey)
    identities += [str(member.get_id()), str(outsider.get_id())]
    stats.identities += 2
    pubsub, router = build_pubsub(member, 3, mesh_diversity_ips=1, ip_colocation_threshold=1024)
    async with (
        running_host(member, listen),
        running_host(outsider, listen),
        background_trio_service(pubsub),
        background_trio_service(router),
        trio.open_nursery() as nursery,
    ):
        await pubsub.wait_until_ready()
        # The member's gets wait as a member's do: a round (exchange.round_timeout_s 20 s,
        # then the body), an agreement (merge.timeout_s 120 s).
        waits = {PROTO_SHARD: MEMBER_SHARD_S, PROTO_MERGE: 120.0}
        m = Attacker(member, mkey, targets, plan.run_id, stats, budget, member=True,
                     member_wait_s=waits, topics=topics)  # fmt: skip
        o = Attacker(outsider, okey, targets, plan.run_id, stats, budget, topics=topics)
        m.codec = o.codec = plan.codec
        insider = Insider(member, pubsub, m, targets, plan.run_id, plan.rounds, plan.seed)
        member.set_stream_handler(PROTO_SHARD, insider.serve)
        member.set_stream_handler(PROTO_MERGE, insider.merge_refusal)
        member.set_stream_handler(PROTO_FPING, insider.pong)
        for t in targets:
            await connect_with_retries(member, t)
        nursery.start_soon(insider.receive)
        nursery.start_soon(insider.heartbeat)
        nursery.start_soon(insider.barrier)

        async def follow() -> None:
            while True:
                m.round = o.round = max(h.rounds_done for h in honest)
                await trio.sleep(0.5)  # a period

        nursery.start_soon(follow)
        member_families = {"shard": 10, "merge": 1, "fping": 2, "fasttls": 1}
        outsider_families = {k: v for k, v in plan.families.items() if k not in ("shard", "merge")}
        async with trio.open_nursery() as fuzzers:
            fuzzers.start_soon(
                functools.partial(
                    fuzz, o, seed=plan.seed, session=plan.index, stop=stop,
                    families=outsider_families, workers=max(1, plan.workers - 6), first_worker=100,
                )
            )  # fmt: skip

            async def as_member() -> None:
                with trio.move_on_after(STARTUP_TIMEOUT_S * 2):
                    await insider.committed.wait()
                await fuzz(m, seed=plan.seed, session=plan.index, stop=stop,
                           families=member_families, workers=6,
                           until=insider.left.is_set)  # fmt: skip

            fuzzers.start_soon(as_member)
        # The budget's end must not look like a member's death (before the start barrier
        # it would leave the daemons one member short): the member stays until it leaves
        # as planned, or the session ends.
        await first_of(insider.left, stop)
        nursery.cancel_scope.cancel()
    return insider.served


async def first_of(*events: trio.Event) -> None:
    """Return when any of `events` is set."""
    async with trio.open_nursery() as nursery:

        async def one(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(one, event)


# Dials a loaded machine may need: a daemon still loading its model answers a dial late,
# and py-libp2p's own dial timeout is 10 s.
CONNECT_ATTEMPTS = 5


async def connect_with_retries(host: IHost, t: Target) -> None:
    """Connect `host` to a daemon, retrying (bounded) past dial timeouts under load."""
    for attempt in range(CONNECT_ATTEMPTS):
        host.get_network().unblock_peer(t.peer)  # type: ignore[attr-defined]
        try:
            with trio.fail_after(UPGRADE_S + SLACK_S):
                await host.connect(PeerInfo(t.peer, [t.maddr]))
            return
        except Exception:
            if attempt == CONNECT_ATTEMPTS - 1:
                raise
            await trio.sleep(1.0)  # back-off between dials


async def run_session(
    plan: Plan, budget: Budget, stats: Stats, say: Callable[[str], None] = print
) -> Verdict:
    """Start the daemons, attack them until the budget is spent or their run ended,
    let them finish, and judge them."""
    nodes = 3 if plan.mode == "insider" else 2
    blacklist = 20 if plan.mode == "ban" else 1_000_000
    honest = [Honest(i, plan.out / f"session{plan.index}" / f"node{i}") for i in range(2)]
    problems: list[str] = []
    identities: list[str] = []
    stop = trio.Event()
    inputs_before = stats.total
    t_fuzz0 = t_fuzz1 = 0.0
    served = 0
    t_start = trio.current_time()
    lag = fmetrics.LoopLag(window_s=ATTACKER_LAG_KEEP_S)
    stats.lag, stats.daemon_lag = lag, _daemon_lag(honest)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lag.run)
            for h in honest:
                boot = [honest[0].addrs[0]] if h.index else []
                cfg = daemon_config(h, run_id=plan.run_id, nodes=nodes, rounds=plan.rounds,
                                    codec=plan.codec, bootstrap=boot,
                                    blacklist_after=blacklist, seed=plan.seed)  # fmt: skip
                await start_daemon(h, cfg, nursery)
            say(f"session {plan.index}: {plan.mode}, codec {plan.codec}, {plan.rounds} rounds; "
                f"daemons {', '.join(h.peer_id[-6:] for h in honest)}")  # fmt: skip
            targets = [
                Target(f"node{h.index}", ID.from_base58(h.peer_id),
                       multiaddr.Multiaddr(h.addrs[0]).decapsulate_code(421), h.port)
                for h in honest
            ]  # fmt: skip
            nursery.start_soon(_watch_daemons, honest, stop, problems)
            for h in honest:
                h.rounds_at_fuzz_start = h.rounds_done
            t_fuzz0 = trio.current_time()
            try:
                served = await _attack(plan, targets, honest, budget, stats, stop, identities)
            except Exception as e:  # the attacker's failure is reported, never hidden
                import traceback

                problems.append(f"the attacker failed (not a daemon): {type(e).__name__}: {e}")
                stats.attacker_tracebacks["session"] = traceback.format_exc()[-3000:]
                stop.set()
            t_fuzz1 = trio.current_time()
            for h in honest:
                h.rounds_at_fuzz_end = h.rounds_done
            for h in honest:
                await wait_exit(h, FINISH_TIMEOUT_S)
                if h.exit_code is None:
                    problems.append(f"daemon {h.index} did not finish within {FINISH_TIMEOUT_S} s")
            nursery.cancel_scope.cancel()
    finally:
        for h in honest:
            stop_daemon(h)
            if h.log_file is not None:
                h.log_file.close()
    minutes = (trio.current_time() - t_start) / 60
    stats.lag = stats.daemon_lag = None
    stats.attacker_lag_max_s = max(stats.attacker_lag_max_s, lag.max_s)
    verdict = judge(plan, honest, problems, stats.total - inputs_before, t_fuzz1 - t_fuzz0,
                    identities, minutes, served)  # fmt: skip
    verdict.attacker_lag_max_s = lag.max_s
    return verdict


def judge(
    plan: Plan,
    honest: list[Honest],
    problems: list[str],
    inputs: int,
    fuzz_s: float,
    identities: list[str],
    minutes: float,
    served: int,
) -> Verdict:
    results = [h.result() for h in honest]
    hashes = [r.get("merged_hash") for r in results]
    for h, r in zip(honest, results, strict=True):
        if h.exit_code != 0:
            problems.append(f"daemon {h.index} exit code {h.exit_code}: {r.get('error')}")
    if not hashes[0] or hashes[0] != hashes[1]:
        problems.append(f"merged hashes differ or are missing: {hashes}")
    completed, missing = [], []
    for h, r in zip(honest, results, strict=True):
        rounds = r.get("rounds") or []
        completed.append(len(rounds))
        others = {x.peer_id for x in honest if x is not h}
        missing.append(sum(1 for x in rounds if others & set(x.get("missing") or [])))
        if r and len(rounds) != plan.rounds:
            problems.append(
                f"daemon {h.index} ran {len(rounds)} of {plan.rounds} rounds "
                f"(catch-up jumps {r.get('catch_up_jumps')})"
            )
        if missing[-1] > max(2, plan.rounds // 100):
            problems.append(f"daemon {h.index} lost its honest peer in {missing[-1]} rounds")
        mb = h.vmhwm_kb / 1024
        if mb > RSS_LIMIT_MB:
            problems.append(f"daemon {h.index} peak RSS {mb:.0f} MB > {RSS_LIMIT_MB} MB")
        if h.longest_stall_s > ROUND_STALL_LIMIT_S:
            problems.append(f"daemon {h.index} stalled {h.longest_stall_s:.0f} s between rounds")
    verdicts = [
        judge_log(h.log_path, identities, [x.peer_id for x in honest], minutes) for h in honest
    ]
    for h, v in zip(honest, verdicts, strict=True):
        problems += [f"daemon {h.index} log: {p}" for p in v.problems]
    return Verdict(
        plan=plan,
        problems=problems,
        inputs=inputs,
        fuzz_seconds=fuzz_s,
        rounds_during_fuzz=[h.rounds_at_fuzz_end - h.rounds_at_fuzz_start for h in honest],
        rounds_completed=completed,
        exit_codes=[h.exit_code for h in honest],
        merged_hashes=hashes,
        vmhwm_mb=[h.vmhwm_kb / 1024 for h in honest],
        log_lines=[v.lines for v in verdicts],
        log_per_peer_max=[max(v.per_peer.values(), default=0) for v in verdicts],
        log_other=[v.other for v in verdicts],
        longest_round_stall_s=[h.longest_stall_s for h in honest],
        honest_missing_rounds=missing,
        identities=len(identities),
        insider_served=served,
        daemon_lag_max_s=[h.loop_lag_max_s for h in honest],
        streams_peer_max=[h.streams_peer_max for h in honest],
        streams_top=[h.streams_top for h in honest],
    )


# ----------------------------------------------------------------------------- campaign
MODES = ("outsider", "insider", "ban")
# A lossy codec trains only with a non-adaptive outer step (fflnode.config refuses it
# with outer Adam): the DiLoCo outer optimizer, in the daemons' [train] table.
LOSSY_RECIPE = 'outer_optimizer = "sgd"\nouter_lr = 0.7\nouter_momentum = 0.9\n'
# sketch is refused at config load (it does not train), so no daemon runs it.
CODECS = ("none", "holo", "topk")


def schedule(index: int, modes: tuple[str, ...], codecs: tuple[str, ...]) -> tuple[str, str]:
    """Session `index`'s mode and codec: with 3 modes and 4 codecs every pair comes up
    within 12 sessions."""
    return modes[index % len(modes)], codecs[index % len(codecs)]


async def campaign(
    inputs: int,
    seed: int,
    out: Path,
    *,
    rounds: int,
    modes: tuple[str, ...] = MODES,
    codecs: tuple[str, ...] = CODECS,
    workers: int = WORKERS,
    families: dict[str, int] | None = None,
    max_sessions: int = 100,
    say: Callable[[str], None] = print,
) -> tuple[Stats, list[Verdict]]:
    """Sessions one after another until `inputs` inputs were tried (or a session fails:
    the campaign stops there, with the evidence in `out`)."""
    stats, verdicts = Stats(), []
    for index in range(max_sessions):
        if stats.total >= inputs:
            break
        mode, codec = schedule(index, modes, codecs)
        plan = Plan(mode, codec, rounds, seed, index, out, workers)
        if families is not None:
            plan.families = dict(families)
        verdict = await run_session(plan, Budget(inputs - stats.total), stats, say)
        verdicts.append(verdict)
        rate = verdict.inputs / max(verdict.fuzz_seconds, 1e-9)
        say(
            f"session {index} {'ok' if verdict.ok else 'FAILED'}: {verdict.inputs:,} inputs "
            f"in {verdict.fuzz_seconds:.0f} s ({rate:.0f}/s), rounds during fuzzing "
            f"{verdict.rounds_during_fuzz}, peak RSS "
            f"{', '.join(f'{m:.0f}' for m in verdict.vmhwm_mb)} MB; loop lag attacker "
            f"{verdict.attacker_lag_max_s:.1f} s, daemons "
            f"{', '.join(f'{x:.1f}' for x in verdict.daemon_lag_max_s)} s; total {stats.total:,}"
        )
        for problem in verdict.problems:
            say(f"  problem: {problem}")
        if not verdict.ok or verdict.inputs == 0:
            break
    return stats, verdicts


def summary(stats: Stats, verdicts: list[Verdict], wall_s: float) -> str:
    """The campaign's table: inputs by protocol and kind, answers, the oracle's figures."""
    rows = []
    by_proto: dict[str, Counter] = defaultdict(Counter)
    for (proto, answer), n in stats.answers.items():
        by_proto[proto][answer] += n
    answers = ("reply", "reset", "close", "open", "refused", "lingered", "hang")
    head = f"{'protocol':34} {'kind':22} {'inputs':>10}"
    rows.append(head)
    for (proto, kind), n in sorted(stats.tried.items()):
        rows.append(f"{proto:34} {kind:22} {n:>10,}")
    rows.append("")
    rows.append(f"{'protocol':34} " + " ".join(f"{a:>9}" for a in answers) + f" {'slowest ms':>11}")
    for proto in sorted(by_proto):
        slow = stats.slowest.get(proto, Slowest())
        cells = " ".join(f"{by_proto[proto][a]:>9,}" for a in answers)
        rows.append(f"{proto:34} {cells} {slow.latency_s * 1000:>11,.0f}")
    valid = stats.mutations.get("valid", 0)
    rows.append("")
    top = ", ".join(f"{m} {n:,}" for m, n in stats.mutations.most_common(12))
    rows.append(f"mutations ({len(stats.mutations)} kinds; valid inputs {valid:,}): {top}, ...")
    crashed = [v for v in verdicts if any(c not in (0, None) for c in v.exit_codes)]
    tracebacks = sum(1 for v in verdicts for p in v.problems if "Traceback" in p or "crashed" in p)
    rate = stats.total / max(sum(v.fuzz_seconds for v in verdicts), 1e-9)
    peak_rss = max((m for v in verdicts for m in v.vmhwm_mb), default=0.0)
    per_peer = max((m for v in verdicts for m in v.log_per_peer_max), default=0)
    rows += [
        "",
        f"inputs: {stats.total:,} in {sum(v.fuzz_seconds for v in verdicts):,.0f} s of fuzzing "
        f"({rate:,.0f} inputs/s), {wall_s:,.0f} s wall, {len(verdicts)} sessions "
        f"({', '.join(f'{m} {sum(v.plan.mode == m for v in verdicts)}' for m in MODES)}), "
        f"{stats.identities} attacker identities",
        f"crashes: {len(crashed)} sessions with a daemon exit other than 0; "
        f"tracebacks or 'node crashed': {tracebacks}",
        f"hangs: {stats.hang_count} (no answer, or still open, {SLACK_S:.0f} s past the "
        f"handler's documented deadline)",
        f"security violations (a fast channel for a stranger, a wrong or a reused token): "
        f"{len(stats.violations)}",
        f"slowest handler: {stats.slowest_any.latency_s * 1000:,.0f} ms "
        f"({stats.slowest_any.label})",
        f"slowest answer to an input that owed no wait (no stall, no member's wait): "
        f"{stats.slowest_complete.latency_s * 1000:,.0f} ms ({stats.slowest_complete.label})",
        f"honest rounds completed while fuzzing: "
        f"{sum(min(v.rounds_during_fuzz) for v in verdicts):,} "
        f"(per session {[v.rounds_during_fuzz for v in verdicts]}); rounds where an honest "
        f"peer's contribution was missing: {[v.honest_missing_rounds for v in verdicts]}",
        f"peak RSS (VmHWM): max {peak_rss:.0f} MB (bound {RSS_LIMIT_MB} MB)",
        f"event-loop lag, worst: attacker {[round(v.attacker_lag_max_s, 1) for v in verdicts]} s, "
        f"daemons {[[round(x, 1) for x in v.daemon_lag_max_s] for v in verdicts]} s; most "
        f"streams one peer held open at a daemon {[v.streams_peer_max for v in verdicts]}; "
        f"workers paced {stats.paced_s:,.0f} worker-s (attacker's loop over {PACE_LAG_S} s late)",
        f"log growth per daemon and session: lines {[v.log_lines for v in verdicts]}; most about "
        f"one attacker identity {per_peer} (bound {LOG_LINES_PER_PEER_FIXED} + "
        f"{LOG_LINES_PER_PEER_PER_MIN}/min); naming no peer "
        f"{max((m for v in verdicts for m in v.log_other), default=0)} "
        f"(bound {LOG_LINES_OTHER_FIXED} + {LOG_LINES_OTHER_PER_MIN}/min)",
        f"merged hashes equal in every session: "
        f"{all(v.merged_hashes[0] and len(set(v.merged_hashes)) == 1 for v in verdicts)}; "
        f"insider answers served: {sum(v.insider_served for v in verdicts):,}",
    ]
    if stats.attacker_errors:
        rows.append(f"attacker-side tool errors (not the daemons'): {dict(stats.attacker_errors)}")
    for v in verdicts:
        for p in v.problems:
            rows.append(f"PROBLEM session {v.plan.index} ({v.plan.mode}): {p}")
    for h in stats.hangs[:10]:
        rows.append(f"HANG {h}")
    for x in stats.violations[:10]:
        rows.append(f"VIOLATION {x}")
    return "\n".join(rows)


def summary_json(stats: Stats, verdicts: list[Verdict], wall_s: float) -> dict[str, Any]:
    return {
        "inputs": stats.total,
        "wall_s": wall_s,
        "fuzz_s": sum(v.fuzz_seconds for v in verdicts),
        "hangs": stats.hang_count,
        "paced_s": stats.paced_s,
        "hang_examples": stats.hangs,
        "violations": stats.violations,
        "tried": {f"{p} {k}": n for (p, k), n in stats.tried.items()},
        "answers": {f"{p} {a}": n for (p, a), n in stats.answers.items()},
        "mutations": dict(stats.mutations),
        "slowest": {p: [s.latency_s, s.label] for p, s in stats.slowest.items()},
        "slowest_any": [stats.slowest_any.latency_s, stats.slowest_any.label],
        "slowest_complete": [stats.slowest_complete.latency_s, stats.slowest_complete.label],
        "identities": stats.identities,
        "attacker_errors": dict(stats.attacker_errors),
        "attacker_tracebacks": stats.attacker_tracebacks,
        "sessions": [
            {
                "mode": v.plan.mode,
                "codec": v.plan.codec,
                "rounds": v.plan.rounds,
                "ok": v.ok,
                "problems": v.problems,
                "inputs": v.inputs,
                "fuzz_s": v.fuzz_seconds,
                "rounds_during_fuzz": v.rounds_during_fuzz,
                "rounds_completed": v.rounds_completed,
                "exit_codes": v.exit_codes,
                "merged_hashes": v.merged_hashes,
                "vmhwm_mb": v.vmhwm_mb,
                "log_lines": v.log_lines,
                "log_per_peer_max": v.log_per_peer_max,
                "log_other": v.log_other,
                "longest_round_stall_s": v.longest_round_stall_s,
                "honest_missing_rounds": v.honest_missing_rounds,
                "identities": v.identities,
                "insider_served": v.insider_served,
                "attacker_lag_max_s": v.attacker_lag_max_s,
                "daemon_lag_max_s": v.daemon_lag_max_s,
                "streams_peer_max": v.streams_peer_max,
                "streams_top": v.streams_top,
            }
            for v in verdicts
        ],
    }
