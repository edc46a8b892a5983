"""The final global merge over libp2p: agree, reduce-scatter, all-gather, verify.

Theory of operation.
1. Agree on participants (fflnode.agreement, two phases: propose, lock, commit). Each
   node proposes the run members it sees alive (itself included) in `merge.ready`
   announcements, re-sent every heartbeat; once its view has been stable for
   AGREE_SETTLE_S and every member of it proposes the same, it locks that set, and it
   commits once every member has locked it. A node locks one set only, so two nodes
   can never merge different sets (a proposal alone could: a member that matched a
   peer's view and committed, while that peer's view changed, split a merge on a loaded
   2-core testnet). Fewer than `quorum` members, a set committed without this node, or
   no agreement by the deadline, is a MergeError. Each proposal carries the fingerprint
   of its sender's premerge weights; on agreement every member drops the outliers by
   one rule (fflnode.merge.fingerprint) and the rest merge. An excluded node learns it
   the same way and stops with MergeExcluded.
   A member lost after agreement (killed, frozen) fails the shards that needed it; the
   node then starts attempt k + 1 (node.py, up to MERGE_ATTEMPTS): every message and
   request names its attempt, older ones are ignored or refused, a node that hears of a
   newer attempt joins it, and the new agreement leaves the lost member out, so its
   shards get new owners.
2. Plan. Every participant computes the same plan (fflnode.merge.plan): M shards of the
   flat vector (merge.shards, or one per agreed member), no member owning more than
   ceil(M / N), owners anchored on the run's members so survivors keep theirs.
3. Reduce-scatter, streamed. An owner walks the pieces of its shards in order and asks
   every member for each piece in canonical order (ascending peer-ID bytes), itself
   included (its own premerge file). Requests go out on one pipelined link per member
   (fflnode.p2p.bulk.Link), each granted only while the reduce window has room, so the
   pieces requested or held never exceed it; a piece's float64 accumulator lives only
   from its first contribution to its last (fflnode.merge.reduce), and at most
   LIVE_PIECES pieces are in progress. A reduced piece goes into the owner's result
   buffer (its shards, |theta|/N with M = N) and its merged file at once, and peers may
   fetch it from then on. A member that cannot deliver fails the merge loudly.
4. All-gather, overlapped with 3. Every node pulls the pieces of every other shard from
   its owner, round robin over owners, within its gather window, and writes each at its
   place in merged.safetensors (atomic: temp file, fsync, rename).
5. Verify. Each node hashes its merged file, announces the hash with the digest of the
   member list, and waits for every member's. Any difference is a MergeError.

Transport. With a FastPath (fflnode.p2p.fastpath) a link is an authenticated TLS 1.3
channel beside libp2p (586 MB/s against 208 for one py-libp2p stream, tools/bench_bulk.py),
or a libp2p stream where a peer has no fast path; without one, a libp2p stream on
MERGE_PROTOCOL. The bulk protocol (get, bulk, ack) is the same on all three.

Memory. Aggregation holds the results of the owned shards (|theta|/N), one reduce
window (granted pieces plus LIVE_PIECES float64 accumulators) and one gather window
(granted pieces): a window is merge.window x merge.piece_elems float32 values. Serving
holds one piece per inbound link while it is sent, plus Prism's slot pools.

Premerge pieces are read from the node's premerge file through Prism (io_uring into a
bounded slot pool). The merged file, just written and so in the page cache, is hashed
back in a worker thread (`hash_file`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from fflnode import wire
from fflnode.agreement import COMMIT, LOCK, Agreement, Decision
from fflnode.errors import FflError, MergeError, WireError, short_peer
from fflnode.merge import fingerprint
from fflnode.merge.plan import Shard, canonical_members, plan
from fflnode.merge.reduce import CanonicalReducer
from fflnode.p2p import bulk, fastpath, streams
from fflnode.p2p.membership import HEARTBEAT_S, MEMBER_TIMEOUT_S, Membership
from fflnode.prism.store import MAX_IDLE_STREAMS, TensorStore, read_header
from fflnode.prism.writer import AtomicSafetensorsWriter
from fflnode.tensors import FlatLayout, ModelHasher, canonical_names

log = logging.getLogger(__name__)

MERGE_PROTOCOL = "/fflnode/merge/1.0.0"
# A member's merged hash, asked of it directly (wire kinds hash.get, merge.hash, error).
MERGE_HASH_PROTOCOL = "/fflnode/merge-hash/1.0.0"
# Attempts to pull one member's shard before the shard fails: a transient stream reset
# on a loaded machine should not sink a merge, a dead member should sink it quickly.
PULL_ATTEMPTS = 3
PULL_RETRY_DELAY_S = 1.0
# Largest piece on the wire (bytes), at most merge.piece_elems: the unit of a request and
# of one reduction step. A link holds one piece at a time, so a reduce holds about one
# per member plus LIVE_PIECES float64 accumulators: pieces shrink with more members to
# keep that within a window (`piece_elems_for`), down to MIN_TRANSFER_PIECE_BYTES.
TRANSFER_PIECE_BYTES = 1 << 20
MIN_TRANSFER_PIECE_BYTES = 64 << 10  # ~0.1 ms of TLS per piece against ~50 us of framing
# Pieces whose float64 accumulator may be live at once while reducing: the piece whose
# last contributions are arriving and the next one, whose first already may.
LIVE_PIECES = 2
# Requests outstanding on one link: the peer has the next ones in hand while it sends a
# piece, so a busy peer never waits a round trip for work. With one (what a shared
# window of 4 pieces gave each member), 64 MiB over 4 loaded nodes took 5-7 s to reduce.
LINK_DEPTH = 8
# A channel opened ahead is used only this fresh: its server closes a channel that has
# carried no request for bulk.SERVE_IDLE_TIMEOUT_S, and using one it just closed would
# cost a failed attempt and a retry. Until the agreement, spares are replaced this often.
SPARE_MAX_AGE_S = bulk.SERVE_IDLE_TIMEOUT_S * 3 / 4
SPARE_REFRESH_S = bulk.SERVE_IDLE_TIMEOUT_S / 3
SPARE_RETRY_S = HEARTBEAT_S  # after a failed open: a fresh connection settles in a beat
HASH_READ_BYTES = 4 << 20  # per pread when hashing the merged file (page cache)
# A member without a hash yet, suspected while we wait for it, is given up on (the
# attempt fails, the next leaves it out) once suspected this long without a break. At
# once, 2 of 4 bench nodes (load 20-30 on 2 cores) abandoned merges the other 2 verified
# with their hashes, then waited alone for an attempt nobody else joined.
VERIFY_LOST_GRACE_S = MEMBER_TIMEOUT_S
# ...when its connection closed from its end (Membership.unreachable: the process
# exited, crashed or restarted). A member that is only silent, its connection still
# open (or hung up on by us), may be a live node descheduled on a loaded machine: it is
# given this long. In a 16-node testnet on 2 cores the first node to lock gave up on a
# member 8 s after suspecting it, which pulled all 16 out of the attempt; that member
# was heard again 16 s after the suspicion, and the next attempt never agreed. A member
# frozen for good (SIGSTOP) costs this much longer than a dead one.
SILENT_LOST_GRACE_S = 4 * MEMBER_TIMEOUT_S
# Pubsub is best effort: in a 16-node testnet on 2 cores, 3 nodes received 1-4 of 15
# hashes in a minute of announcements (their pubsub streams to some peers were gone
# and queued messages were dropped), while the other 13 verified. A hash still missing
# this long after ours was announced is asked of its member over a stream, at most once
# per HASH_PULL_EVERY_S per member.
HASH_PULL_AFTER_S = 3 * HEARTBEAT_S
HASH_PULL_EVERY_S = 5 * HEARTBEAT_S
# Asking, with the stream open: the libp2p RPC slack.
HASH_RPC_TIMEOUT_S = streams.RPC_SLACK_S
# Answering: the request is one small message sent as the stream opens; a requester
# silent this long gave up or stalls (then it is dropped, not counted: like a late
# ping, that is load). Below streams.MESSAGE_STALL_S, whose stalls are offences.
HASH_SERVE_TIMEOUT_S = 5.0
# While waiting for members' hashes, say whose are missing this often: the one line
# that tells an operator which member holds a merge up.
VERIFY_REPORT_S = 15.0
# Members named in such a line, at most (then a count): 16 of a 256-member run.
NAMES_SHOWN = 16
# After verifying, wait this long at most for every member to say it is done too, so
# nobody exits while a peer may still be pulling from it.
DONE_GRACE_S = 30.0
# A member that heartbeats but announces nothing in a merge attempt for this long is
# left out of our proposal: an alive member that never proposes (the daemon fuzzer's
# insider did exactly that) would otherwise hold every honest node until
# merge.timeout_s. Honest members enter the merge within a round or two of each other;
# a later one is left out (MergeExcluded) and the others merge.
SILENT_MEMBER_GRACE_S = 30.0
# ...unless its heartbeats say it is still training toward the merge (phase "train", a
# round no later than ours): such a member is waited for up to this long after we entered
# the merge (and at most half of merge.timeout_s). 16 daemons on 2 cores finished their
# rounds up to 2 min apart, and the first to finish dropped the others after 30 s. An
# insider claiming to train delays the merge by this much at most.
STRAGGLER_WAIT_S = 150.0
# A member lost mid-merge costs one attempt; three survive two losses in a row, and a
# run that keeps losing members that fast has a bigger problem than the merge.
MERGE_ATTEMPTS = 3
# A node's view of the live members must hold still this long before it locks it: two
# missed heartbeats, so a member whose heartbeat is late for a moment on a loaded
# machine is not merged without (a member that really died stays gone).
AGREE_SETTLE_S = 2.0


@dataclass
class MergeOutcome:
    hash: str
    members: list[str]
    shards: int
    owned: list[int]
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # agreed member -> why left out
    attempt: int = 0  # the attempt that completed (> 0: a member was lost mid-merge)
    # The most aggregation memory held at once (MergeSession.gauge: owned results, float64
    # accumulators, pieces received or read and not yet added or written), and the window
    # it is bounded by: at most |theta|/N + 2 windows (module doc, Memory).
    aggregation_peak_bytes: int = 0
    window_bytes: int = 0


class MergeRetry(MergeError):
    """Peers moved on to a newer attempt of the merge: join it."""

    def __init__(self, attempt: int) -> None:
        super().__init__(f"peers started merge attempt {attempt}")
        self.attempt = attempt


class MergeTimeout(MergeError):
    """The merge deadline passed; another attempt would wait as long again."""


class MergeMismatch(MergeError):
    """The merged hashes disagree: a correctness failure, never retried."""


class MergeExcluded(MergeError):
    """This node's weights are an outlier by the rule every member applies."""


def hash_file(path: Path) -> str:
    """The model hash (fflnode.tensors.ModelHasher) of a safetensors file's tensors.

    The merged file was written moments ago, so this reads the page cache: plain preads
    into one reused buffer, sha256 and pread both releasing the GIL, so a worker thread
    hashes beside the event loop (still serving peers). Through Prism, on the event
    loop, the same hash cost 8-12 % of a merging node's CPU in py-spy, a third of it
    building a stream's slot pool for this one file.
    """
    header = read_header(path)
    hasher = ModelHasher()
    buf = bytearray(HASH_READ_BYTES)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for name in canonical_names(header.tensors):
            info = header.tensors[name]
            hasher.begin_tensor(name)
            pos = info.start
            while pos < info.stop:
                n = os.preadv(fd, [memoryview(buf)[: min(len(buf), info.stop - pos)]], pos)
                if n <= 0:
                    raise MergeError(f"{path}: ends inside tensor {name!r}")
                hasher.update(memoryview(buf)[:n])
                pos += n
    finally:
        os.close(fd)
    return hasher.hexdigest()


def names_shown(peers: list[ID]) -> str:
    """Short names of `peers` for a log line, at most NAMES_SHOWN, then a count."""
    shown = ", ".join(short_peer(str(p)) for p in peers[:NAMES_SHOWN])
    more = len(peers) - NAMES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def members_digest(members: list[ID]) -> str:
    h = hashlib.sha256()
    for m in canonical_members([p.to_bytes() for p in members]):
        h.update(len(m).to_bytes(2, "big") + m)
    return h.hexdigest()


class MergeSession:
    """One node's part in the run's final merge."""

    def __init__(
        self,
        host: IHost,
        membership: Membership,
        run_id: str,
        run_members: list[ID],
        layout: FlatLayout,
        *,
        shards: int,
        quorum: int,
        window: int,
        piece_elems: int,
        timeout_s: float,
        traffic: bulk.Traffic,
        store_options: dict[str, object] | None = None,
        seed: int = 0,
        exclude_outliers: bool = True,
        attempt: int = 0,
        on_phase: Callable[[str], None] | None = None,
        fastpath: fastpath.FastPath | None = None,
        preopen: bool = False,
    ) -> None:
        """`fastpath`: the node's FastPath, whose handler hands inbound channels to
        `handle_channel`; None moves everything over libp2p streams (MERGE_PROTOCOL).
        `preopen`: open fast channels to members ahead of need (`_preopen`). Off in the
        daemon: a channel a peer accepted before it moved to the next attempt stays with
        its old session, and after a member was killed post-agreement the survivors'
        attempt 1 waited on such channels until merge.timeout_s (2 of ~7 churn runs under
        load). The merge benchmark, with no churn, turns it on."""
        self.host = host
        self.membership = membership
        self.run_id = run_id
        self.run_members = set(run_members)
        self._run_member_names = {str(p) for p in run_members}
        self._by_name = {str(p): p for p in run_members}  # members as they travel -> IDs
        self.layout = layout
        self.shards_cfg = shards
        self.quorum = quorum or len(run_members) // 2 + 1  # 0: a majority of the run
        self.window = window
        self.piece_elems = piece_elems
        self.fastpath = fastpath
        self.preopen = preopen
        # (peer, purpose) -> a channel opened ahead (`_preopen`), and when
        self._spares: dict[tuple[ID, str], tuple[fastpath.Channel, float]] = {}
        self.transfer_elems = self.piece_elems_for(len(run_members))  # set again on agreeing
        self.timeout_s = timeout_s
        self.traffic = traffic
        self.store_options = dict(store_options or {})
        self.seed = seed
        self.attempt = attempt
        self.on_phase = on_phase or (lambda status: None)  # systemd STATUS= of each phase
        self.newer_attempt = attempt  # the highest attempt a run member announced
        self.exclude_outliers = exclude_outliers
        self.fingerprint: bytes = b""
        self.fingerprints: dict[ID, bytes | None] = {}
        self.me = host.get_id()
        self.premerge: TensorStore | None = None
        # Concurrent premerge reads (serving every peer, and our own share): no more than
        # the store keeps streams open between reads, or each read past them builds and
        # drops a Prism stream and its slot pool (py-spy: SlotPool.__init__ in the merge).
        self._readers = trio.CapacityLimiter(MAX_IDLE_STREAMS)
        self.premerge_ready = trio.Event()
        self.agreed: list[ID] | None = None
        self.agreed_event = trio.Event()
        self.plan: list[Shard] = []
        self.results: dict[int, np.ndarray] = {}
        self.gauge = bulk.Gauge()  # aggregation memory (MergeOutcome.aggregation_peak_bytes)
        self.result_ready: dict[int, trio.Event] = {}  # a whole owned shard reduced
        self.piece_ready: dict[int, list[trio.Event]] = {}  # owned shard -> per piece
        self.failed: dict[int, str] = {}
        self.agreement = Agreement(
            str(self.me),
            quorum=self.quorum,
            eligible=self._run_member_names.__contains__,
            settle_s=AGREE_SETTLE_S,
        )
        self.hashes: dict[ID, tuple[str, str]] = {}
        self._my_hash: tuple[str, str] | None = None  # (hash, members digest) once merged
        membership.on("merge.ready", self._on_ready)
        membership.on("merge.hash", self._on_hash)

    # ------------------------------------------------------------------ announcements
    def _on_ready(self, peer: ID, msg: wire.Message) -> None:
        # A proposal naming a peer outside the run is no proposal (_agree looks each up).
        if peer not in self.run_members or not self._run_member_names.issuperset(msg["members"]):
            return
        attempt = msg.fields.get("attempt", 0)
        self.newer_attempt = max(self.newer_attempt, attempt)
        if attempt == self.attempt and msg["shards"] == self._m(msg["members"]):
            self.agreement.heard(str(peer), msg["members"], msg["stage"])
            self.fingerprints[peer] = msg.fields.get("fp")

    def _on_hash(self, peer: ID, msg: wire.Message) -> None:
        if peer in self.run_members and msg.fields.get("attempt", 0) == self.attempt:
            self.hashes[peer] = (msg["hash"], msg["digest"])

    async def handle_hash(self, stream: INetStream) -> None:
        """MERGE_HASH_PROTOCOL: a member asks for our merged hash of an attempt. Never
        raises on what the peer sent; a malformed request is counted against it."""
        peer = streams.peer_of(stream)

        async def answer(msg: wire.Message) -> None:
            members = {str(p) for p in self.agreed or ()}
            if self._my_hash is None or msg["attempt"] != self.attempt or peer not in members:
                await streams.send_message(
                    stream, "error", code="unavailable",
                    reason=f"no merged hash of attempt {msg['attempt']} for this peer here",
                )  # fmt: skip
            else:
                my_hash, digest = self._my_hash
                await streams.send_message(
                    stream, "merge.hash", run=self.run_id, hash=my_hash, digest=digest,
                    attempt=self.attempt,
                )  # fmt: skip

        await streams.serve_one(
            stream, expect={"hash.get"}, run=self.run_id, timeout_s=HASH_SERVE_TIMEOUT_S,
            traffic=self.traffic, where="merge hash request", answer=answer,
        )  # fmt: skip

    async def _pull_hash(self, peer: ID) -> None:
        """Ask `peer` for its merged hash (a pubsub announcement we never received)."""
        stream, ok = None, False
        try:
            with trio.fail_after(HASH_RPC_TIMEOUT_S):
                stream = await self.host.new_stream(peer, [MERGE_HASH_PROTOCOL])
                await streams.send_message(
                    stream, "hash.get", run=self.run_id, attempt=self.attempt
                )
                msg = await streams.recv_message(
                    stream, expect={"merge.hash", "error"}, run=self.run_id
                )
            ok = True
            if msg.kind == "merge.hash":
                self._on_hash(peer, msg)
        except WireError as e:
            self.traffic.reject_error(e, "merge hash answer")
        except (trio.TooSlowError, *streams.STREAM_ERRORS):
            pass  # asked again in HASH_PULL_EVERY_S, while it is worth waiting for
        finally:
            if stream is not None:
                await (streams.close_quietly(stream) if ok else streams.reset_quietly(stream))

    def _m(self, members: list[ID]) -> int:
        return self.shards_cfg or len(members)

    # ------------------------------------------------------------------ serving
    async def handle(self, stream: INetStream) -> None:
        await bulk.serve(stream, MERGE_PROTOCOL, self.run_id, self._resolve, self.traffic)

    async def handle_channel(self, peer_id: ID, channel: fastpath.Channel) -> None:
        """Serve a channel the node's FastPath accepted (fast, or its libp2p fallback)."""
        await bulk.serve(
            fastpath.as_stream(channel), MERGE_PROTOCOL, self.run_id, self._resolve, self.traffic
        )

    async def _resolve(self, peer: str, msg: wire.Message) -> bulk.Resolved:
        if peer not in self._run_member_names:  # before waiting: outsiders wait for nothing
            raise bulk.Unavailable("not-member", "requester is not a member of this run")
        if msg["round"] != self.attempt:
            raise bulk.Unavailable("stale-attempt", f"this node is at merge attempt {self.attempt}")
        with trio.move_on_after(self.timeout_s):
            await self.agreed_event.wait()
        if self.agreed is None or peer not in {str(p) for p in self.agreed}:
            raise bulk.Unavailable("not-member", "requester is not an agreed merge member")
        lo, hi, j = msg["lo"], msg["hi"], msg["index"]
        if not (0 <= j < len(self.plan) and self.plan[j].lo <= lo < hi <= self.plan[j].hi):
            raise bulk.Unavailable("bad-request", f"range [{lo}, {hi}) is not in shard {j}")
        if hi - lo > self.piece_elems:
            raise bulk.Unavailable("bad-request", f"piece of {hi - lo} > {self.piece_elems}")
        if msg["what"] == "premerge":
            await self.premerge_ready.wait()
            values = await self._read_premerge(lo, hi)
        elif msg["what"] == "merged":
            shard = self.plan[j]
            if shard.owner != self.me.to_bytes():
                raise bulk.Unavailable("not-owner", f"shard {j} is owned elsewhere")
            with trio.move_on_after(self.timeout_s):
                await self._reduced(j, lo, hi)
            if j in self.failed or not self._is_reduced(j, lo, hi):
                raise bulk.Unavailable("failed", self.failed.get(j, f"shard {j} not reduced"))
            values = self.results[j][lo - shard.lo : hi - shard.lo]
        else:
            raise bulk.Unavailable("bad-request", f"{MERGE_PROTOCOL} does not serve {msg['what']}")
        return "none", [("values", values)], {}

    def piece_elems_for(self, members: int) -> int:
        """Elements per piece on the wire with `members` merging: a reduce holds one piece
        per member and LIVE_PIECES float64 accumulators (2 pieces each) within a window of
        merge.window x merge.piece_elems float32 values. Pieces never shrink below
        MIN_TRANSFER_PIECE_BYTES, so that holds while a window has room for (members +
        2 LIVE_PIECES) of them: at the defaults (8 MiB windows), up to 124 members."""
        window_bytes = self.window * self.piece_elems * 4
        per = window_bytes // (max(1, members) + 2 * LIVE_PIECES)
        nbytes = max(MIN_TRANSFER_PIECE_BYTES, min(TRANSFER_PIECE_BYTES, per))
        return max(1, min(self.piece_elems, nbytes // 4))

    def _pieces_of(self, j: int, lo: int, hi: int) -> list[trio.Event]:
        """Readiness of the pieces of owned shard j that [lo, hi) overlaps."""
        events = self.piece_ready.get(j)
        if events is None:
            return [self.result_ready[j]]
        base, p = self.plan[j].lo, self.transfer_elems
        return events[(lo - base) // p : (hi - 1 - base) // p + 1]

    async def _reduced(self, j: int, lo: int, hi: int) -> None:
        if not self.result_ready[j].is_set():
            for event in self._pieces_of(j, lo, hi):
                await event.wait()

    def _is_reduced(self, j: int, lo: int, hi: int) -> bool:
        ready = self.result_ready[j].is_set() or all(e.is_set() for e in self._pieces_of(j, lo, hi))
        return ready and j in self.results

    # ------------------------------------------------------------------ the merge
    async def run(self, premerge_path: Path, out_path: Path) -> MergeOutcome:
        t0 = time.perf_counter()
        phases: dict[str, float] = {}
        self.premerge = TensorStore.open(premerge_path, **self.store_options)  # type: ignore[arg-type]
        if not self.premerge.is_flat_float32() or self.premerge.numel != self.layout.numel:
            raise MergeError(f"{premerge_path}: not the run's canonical float32 flat checkpoint")
        self.premerge_ready.set()
        try:
            async with trio.open_nursery() as opener:
                if self.fastpath is not None and self.preopen:
                    opener.start_soon(self._preopen)
                self.fingerprint = await self._fingerprint()
                with trio.move_on_after(self.timeout_s) as deadline:
                    outcome = await self._run_phases(t0, phases, out_path)
                opener.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # what went wrong, not the nurseries around it
            raise bulk.first_error(group) from None
        finally:
            await self._close_spares()
        if deadline.cancelled_caught:
            stage = "agree on members" if self.agreed is None else "complete"
            raise MergeTimeout(
                f"merge attempt {self.attempt} did not {stage} within merge.timeout_s"
                f" = {self.timeout_s:.0f} s (alive run members: {len(self.membership.alive())})"
            )
        return outcome

    async def _run_phases(
        self, t0: float, phases: dict[str, float], out_path: Path
    ) -> MergeOutcome:
        excluded: dict[str, str] = {}
        async with trio.open_nursery() as announcer:
            members = await self._agree(announcer)
            if self.exclude_outliers:
                members, excluded = self._drop_outliers(members)
            phases["agree"] = time.perf_counter() - t0
            digest = members_digest(members)
            member_bytes = canonical_members([p.to_bytes() for p in members])
            anchor = [p.to_bytes() for p in self.run_members]
            self.plan = await trio.to_thread.run_sync(
                lambda: plan(self.run_id, self.layout.numel, self._m(members), member_bytes, anchor)
            )
            me = self.me.to_bytes()
            owned = [s for s in self.plan if s.owner == me]
            self.transfer_elems = self.piece_elems_for(len(members))
            self.result_ready = {s.index: trio.Event() for s in self.plan}
            for s in owned:
                self.results[s.index] = np.empty(s.numel, dtype=np.float32)
                self.gauge.hold(self.results[s.index].nbytes)
                n_pieces = len(s.pieces(self.transfer_elems))
                self.piece_ready[s.index] = [trio.Event() for _ in range(n_pieces)]
            self.agreed = members
            self.agreed_event.set()
            self.on_phase(f"merge agreed: {len(members)} members, attempt {self.attempt}")
            log.info(
                "merge: %d members agreed, %d shards, this node owns %s",
                len(members),
                len(self.plan),
                [s.index for s in owned],
            )
            t1 = time.perf_counter()
            with AtomicSafetensorsWriter.for_flat(
                out_path, self.layout, {"fflnode.run": self.run_id, "fflnode.digest": digest}
            ) as writer:
                reduced_at = await self._transfer(owned, member_bytes, writer)
                await trio.to_thread.run_sync(writer.commit)
            t2 = time.perf_counter()
            phases["reduce_scatter"] = reduced_at - t1
            phases["all_gather"] = t2 - reduced_at
            my_hash = await self._hash_file(out_path)
            await self._verify(members, my_hash, digest)
            phases["verify"] = time.perf_counter() - t2
            announcer.cancel_scope.cancel()
        return MergeOutcome(
            my_hash,
            [str(p) for p in members],
            len(self.plan),
            [s.index for s in owned],
            time.perf_counter() - t0,
            phases,
            excluded,
            self.attempt,
            self.gauge.peak,
            self.window * self.piece_elems * 4,
        )

    async def _fingerprint(self) -> bytes:
        """The premerge weights' fingerprint, streamed piece by piece through Prism."""
        fp = fingerprint.Fingerprinter(self.seed)
        for lo in range(0, self.layout.numel, self.piece_elems):
            hi = min(lo + self.piece_elems, self.layout.numel)
            piece = await self._read_premerge(lo, hi)
            await trio.to_thread.run_sync(fp.add, piece, lo)
        return fp.to_bytes()

    def _drop_outliers(self, members: list[ID]) -> tuple[list[ID], dict[str, str]]:
        """The agreed members minus those whose fingerprint is an outlier."""
        fps = {str(p): self.fingerprints.get(p) for p in members if p != self.me}
        fps[str(self.me)] = self.fingerprint
        verdict = fingerprint.outliers(fps, len(self.fingerprint))
        for peer, why in verdict.excluded.items():
            log.warning("merge: excluding %s: %s", short_peer(peer), why)
        if str(self.me) in verdict.excluded:
            raise MergeExcluded(f"excluded from the merge: {verdict.excluded[str(self.me)]}")
        kept = [p for p in members if str(p) not in verdict.excluded]
        if len(kept) < self.quorum:
            raise MergeError(
                f"{len(kept)} members after excluding outliers, below the quorum {self.quorum}"
            )
        return kept, verdict.excluded

    async def _preopen(self) -> None:
        """Until the members agree, keep fresh channels open for the transfers: two to
        every run member in the merge (its heartbeat says so, or it proposed). That time
        is mostly idle here (fingerprints, AGREE_SETTLE_S), while each open costs a TLS
        context, handshake and certificate checks: py-spy put opening at the start of the
        transfers at 13 % of a node's merge CPU. It also needs the libp2p connection,
        which a loaded machine's missed pings may have cut by the time transfers start.
        A link takes its spare (`_link`) or opens its own; spares left over are closed."""
        due: dict[tuple[ID, str], float] = {}  # (peer, purpose) -> when to open again

        async def open_spare(key: tuple[ID, str]) -> None:
            ok = await self._open_spare(*key)
            due[key] = trio.current_time() + (SPARE_REFRESH_S if ok else SPARE_RETRY_S)

        async with trio.open_nursery() as nursery:
            while self.agreed is None:
                heard, now = set(self.agreement.proposals), trio.current_time()
                for peer in self.membership.alive():
                    view = self.membership.peers.get(peer)
                    in_merge = str(peer) in heard or (view is not None and view.phase == "merge")
                    if peer not in self.run_members or not in_merge:
                        continue
                    for purpose in ("premerge", "merged"):
                        key = (peer, purpose)
                        if now >= due.get(key, -math.inf):
                            due[key] = math.inf  # while opening
                            nursery.start_soon(open_spare, key)
                with trio.move_on_after(HEARTBEAT_S):
                    await self.membership.wait_changed()

    async def _open_spare(self, peer: ID, purpose: str) -> bool:
        assert self.fastpath is not None
        try:
            with trio.fail_after(streams.RPC_SLACK_S):
                channel = await self.fastpath.open(peer, fallback=False)
        except (FflError, trio.TooSlowError, *streams.STREAM_ERRORS) as e:
            # No libp2p stream as a spare: the link opens its own, fast if it can by then.
            log.debug("merge: no spare channel to %s: %s", short_peer(str(peer)), e)
            return False  # an older spare, if any, stays
        old = self._spares.pop((peer, purpose), None)
        self._spares[(peer, purpose)] = (channel, trio.current_time())
        if old is not None:
            with trio.CancelScope(shield=True):
                await old[0].aclose()
        return True

    async def _close_spares(self) -> None:
        spares, self._spares = list(self._spares.values()), {}
        with trio.CancelScope(shield=True):
            for channel, _ in spares:
                await channel.aclose()

    def close(self) -> None:
        """Release the premerge file once no member can need it (after wait_all_done)."""
        if self.premerge is not None:
            self.premerge.close()

    async def _read_premerge(self, lo: int, hi: int) -> np.ndarray:
        assert self.premerge is not None
        out = np.empty(hi - lo, dtype=np.float32)
        async with self._readers:
            await self.premerge.read_into(lo, hi, out)
        return out

    async def _hash_file(self, path: Path) -> str:
        """The model hash of the merged file, read back in a worker thread."""
        return await trio.to_thread.run_sync(hash_file, path)

    async def wait_all_done(self, members: list[str]) -> bool:
        """After verifying: wait (bounded) until every member reports phase 'done',
        announcing our hash meanwhile: a member that missed every copy of it so far (a
        16-node testnet's pubsub queues to slow peers overflowed, dropping the oldest)
        cannot verify without it."""
        others = [p for p in self.membership.peers if str(p) in members and p != self.me]

        def all_done() -> bool:
            return all(self.membership.peers[p].phase == "done" for p in others)

        async with trio.open_nursery() as nursery:
            if self._my_hash is not None:
                nursery.start_soon(self._publish_hash, *self._my_hash)
            done = await self.membership.wait_until(all_done, DONE_GRACE_S)
            nursery.cancel_scope.cancel()
        return done

    # ------------------------------------------------------------------ 1. agreement
    async def _agree(self, announcer: trio.Nursery) -> list[ID]:
        by_str = self._by_name
        announced: tuple[tuple[str, ...], str] | None = None
        last_sent = -float("inf")
        lost_since: dict[str, float] = {}  # members of our lock not seen alive, since when
        entered = trio.current_time()
        while True:
            if self.newer_attempt > self.attempt:
                raise MergeRetry(self.newer_attempt)
            now = trio.current_time()
            alive = [str(p) for p in self.membership.alive() if p in self.run_members]
            if now - entered >= SILENT_MEMBER_GRACE_S:  # heartbeating, yet not merging
                heard = set(self.agreement.proposals)
                training = now - entered < min(STRAGGLER_WAIT_S, self.timeout_s / 2)
                alive = [p for p in alive if p in heard or (training and self._training(by_str[p]))]
            decision = self.agreement.decide(alive, now)
            if decision.stage == LOCK:
                # A lock completes only when every member of it locks too: one that died
                # or left (a member that announced a lock listing us, then went, as the
                # daemon fuzzer's insider did) would hold us until merge.timeout_s. Give
                # the attempt up instead; the next one agrees among the living.
                gone = {m for m in decision.members if m != str(self.me) and m not in alive}
                lost_since = {m: lost_since.get(m, now) for m in gone}
                given_up = self._given_up({by_str[m]: t for m, t in lost_since.items()}, now)
                if given_up:
                    names = ", ".join(sorted(short_peer(str(p)) for p in given_up))
                    raise MergeError(
                        f"merge attempt {self.attempt}: locked on members with {names}, "
                        f"not seen alive for {now - min(lost_since.values()):.1f} s"
                    )
            if decision.excluded:
                raise MergeError(
                    f"merge attempt {self.attempt}: {len(decision.members)} members agreed "
                    "without this node (it was not seen alive when they did)"
                )
            # Announce a change at once, an unchanged one once per heartbeat: every
            # announcement wakes every peer's loop, so answering each one would echo.
            if (decision.members, decision.stage) != announced:
                log.info(
                    "merge attempt %d: %s %s", self.attempt, decision.stage,
                    ", ".join(short_peer(m) for m in decision.members),
                )  # fmt: skip
            if (decision.members, decision.stage) != announced or now - last_sent >= HEARTBEAT_S:
                await self._announce(decision)
                announced, last_sent = (decision.members, decision.stage), now
            if decision.committed:
                announcer.start_soon(self._keep_announcing, decision)
                return [by_str[p] for p in decision.members]
            with trio.move_on_after(HEARTBEAT_S):
                await self.membership.wait_changed()

    def _training(self, peer: ID) -> bool:
        """Whether `peer`'s heartbeats say it is still training toward this merge."""
        view = self.membership.peers.get(peer)
        return view is not None and view.phase == "train" and view.round <= self.membership.round

    def _lost(self, members: list[ID]) -> list[ID]:
        """Agreed members that died or froze since (a verify wait ends early for them)."""
        return [p for p in members if p != self.me and not self.membership.is_alive(p)]

    def _given_up(self, lost_since: dict[ID, float], now: float) -> list[ID]:
        """The members, of those not seen alive since the times given, to give up on
        now: after VERIFY_LOST_GRACE_S if their end closed the connection, after
        SILENT_LOST_GRACE_S if they are only silent."""
        return [
            p
            for p, t in lost_since.items()
            if now - t
            >= (VERIFY_LOST_GRACE_S if self.membership.unreachable(p) else SILENT_LOST_GRACE_S)
        ]

    async def _keep_announcing(self, decision: Decision) -> None:
        """Keep the commitment visible for members still converging, until every member
        was heard committing it or sent its hash (then nobody needs it: at 16 nodes these
        announcements were a third of the pubsub traffic while the merge ran)."""
        while not self._all_committed(decision.members):
            await trio.sleep(HEARTBEAT_S)  # a period, not synchronisation
            await self._announce(decision)

    def _all_committed(self, members: tuple[str, ...]) -> bool:
        for m in members:
            if m == str(self.me) or self._by_name[m] in self.hashes:
                continue
            heard = self.agreement.proposals.get(m)
            if heard is None or heard.stage != COMMIT or heard.members != members:
                return False
        return True

    async def _announce(self, decision: Decision) -> None:
        """Our proposal, with the fingerprint and the attempt every proposal carries."""
        await self.membership.publish(
            "merge.ready",
            members=list(decision.members),
            shards=self._m(decision.members),
            stage=decision.stage,
            fp=self.fingerprint,
            attempt=self.attempt,
        )

    # ------------------------------------------------------------------ 3 and 4. transfer
    async def _transfer(
        self, owned: list[Shard], members: list[bytes], writer: AtomicSafetensorsWriter
    ) -> float:
        """Reduce the owned shards and gather the others at once; returns when (perf
        counter) the owned shards were reduced."""
        reduced_at = time.perf_counter()

        async def reduce() -> None:
            nonlocal reduced_at
            await self._reduce_scatter(owned, members, writer)
            reduced_at = time.perf_counter()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reduce)
                nursery.start_soon(self._all_gather, writer)
        except BaseExceptionGroup as group:
            raise bulk.first_error(group) from None
        return reduced_at

    def _link(self, peer: ID, expected_bytes: int, wait_s: float, purpose: str = "") -> bulk.Link:
        async def open_stream() -> INetStream | fastpath.ChannelStream:
            if self.fastpath is None:
                return await self.host.new_stream(peer, [MERGE_PROTOCOL])
            spare = self._spares.pop((peer, purpose), None)  # once: a retry opens anew
            if spare is not None and trio.current_time() - spare[1] < SPARE_MAX_AGE_S:
                return fastpath.as_stream(spare[0])
            if spare is not None:
                await spare[0].aclose()
            try:
                return fastpath.as_stream(await self.fastpath.open(peer))
            except streams.STREAM_ERRORS as e:  # not FastPathError: a dishonest peer fails
                # A peer with no fast path at all (neither TLS nor its fallback protocol,
                # e.g. a node that runs without one): the merge's own libp2p protocol.
                log.info(
                    "merge: no fast path to %s (%s); using %s",
                    short_peer(str(peer)), type(e).__name__, MERGE_PROTOCOL,
                )  # fmt: skip
                return await self.host.new_stream(peer, [MERGE_PROTOCOL])

        return bulk.Link(
            peer,
            MERGE_PROTOCOL,
            self.run_id,
            self.traffic,
            open_stream,  # type: ignore[arg-type]
            expected_bytes=expected_bytes,
            wait_s=wait_s,
            depth=LINK_DEPTH,
            gauge=self.gauge,
        )

    async def _run_link(self, link: bulk.Link, on_piece: bulk.OnPiece, what: str) -> None:
        """Run `link` to the end, retrying a failed attempt (a transient stream reset on
        a loaded machine should not sink a merge, a dead member should sink it quickly)."""
        for attempt in range(1, PULL_ATTEMPTS + 1):
            try:
                await link.run(on_piece)
                return
            except FflError as e:
                if attempt == PULL_ATTEMPTS:
                    raise MergeError(f"{what} after {PULL_ATTEMPTS} attempts: {e}") from e
                log.warning("merge: %s (%s); retrying", what, e)
                await trio.sleep(PULL_RETRY_DELAY_S)  # back-off before a retry

    @staticmethod
    def _values(shard: Shard, arrays: dict[str, np.ndarray]) -> np.ndarray:
        if set(arrays) != {"values"}:
            raise MergeError(f"shard {shard.index}: parts {sorted(arrays)}, not 'values'")
        return arrays["values"]

    async def _reduce_scatter(
        self, owned: list[Shard], members: list[bytes], writer: AtomicSafetensorsWriter
    ) -> None:
        """Stream every piece of the owned shards through their reducers (module doc, 3)."""
        me, p = self.me.to_bytes(), self.transfer_elems
        reducers = {
            s.index: CanonicalReducer(
                members,
                [(lo - s.lo, hi - s.lo) for lo, hi in s.pieces(p)],
                len(members),  # contribute() below adds each in turn: nothing waits
                out=self.results[s.index],
                gauge=self.gauge,
            )
            for s in owned
        }
        by_index = {s.index: s for s in owned}
        position = {m: i for i, m in enumerate(members)}
        pieces = [(s, k, lo, hi) for s in owned for k, (lo, hi) in enumerate(s.pieces(p))]
        done = [trio.Event() for _ in pieces]
        number = {(s.index, lo): g for g, (s, _, lo, _) in enumerate(pieces)}
        turn = trio.lowlevel.ParkingLot()  # woken at every contribution added
        mine = sum(s.numel for s in owned)
        links = {
            m: self._link(ID(m), 4 * mine, self.timeout_s / 2, "premerge")
            for m in members
            if m != me
        }
        for s, _, lo, hi in pieces:
            for link in links.values():
                link.submit(bulk.Request(self.attempt, "premerge", s.index, lo, hi))
        for link in links.values():
            link.finish()

        async def contribute(member: bytes, j: int, lo: int, values: np.ndarray) -> None:
            """Add `member`'s piece once it is its turn (it holds the piece meanwhile, and
            its link reads nothing more); a first contribution also waits until at most
            LIVE_PIECES pieces are in progress."""
            g, i = number[(j, lo)], position[member]
            _, k, _, hi = pieces[g]
            shard, reducer = by_index[j], reducers[j]
            while reducer.next[k] != i or (
                i == 0 and g >= LIVE_PIECES and not done[g - LIVE_PIECES].is_set()
            ):
                await turn.park()
            if reducer.add(member, k, values):
                writer.write_flat(lo, reducer.out[lo - shard.lo : hi - shard.lo])
                self.piece_ready[j][k].set()
                done[g].set()
                if reducer.complete:
                    reducer.release()
                    self.result_ready[j].set()
            turn.unpark_all()

        async def read_own() -> None:
            for s, _, lo, hi in pieces:
                self.gauge.hold(4 * (hi - lo))
                try:
                    await contribute(me, s.index, lo, await self._read_premerge(lo, hi))
                finally:
                    self.gauge.release(4 * (hi - lo))

        async def pull(m: bytes) -> None:
            async def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
                await contribute(m, req.index, req.lo, self._values(by_index[req.index], arrays))

            what = f"member {short_peer(str(ID(m)))} did not deliver its premerge pieces"
            await self._run_link(links[m], on_piece, what)

        failure: FflError | None = None
        ok = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_own)
                for m in links:
                    nursery.start_soon(pull, m)
            for reducer in reducers.values():
                reducer.result()  # raises unless every member gave every piece
            ok = True
        except BaseExceptionGroup as group:
            error = bulk.first_error(group)
            if not isinstance(error, FflError):
                raise error from None  # a cancellation, or a bug: as it came
            failure = error
        except FflError as e:
            failure = e
        finally:
            for reducer in reducers.values():
                reducer.release()
            for j in reducers:  # wake every waiting request: it serves, or says "failed"
                if not ok and not self.result_ready[j].is_set():
                    self.failed[j] = f"shard {j}: {failure or 'the merge attempt stopped'}"
                self.result_ready[j].set()
                for event in self.piece_ready[j]:
                    event.set()
        if failure is not None:
            raise MergeError(f"reducing shards {sorted(reducers)} failed: {failure}") from failure

    async def _all_gather(self, writer: AtomicSafetensorsWriter) -> None:
        """Pull every piece of the shards others own from their owners (module doc, 4)."""
        me, p = self.me.to_bytes(), self.transfer_elems
        others = [s for s in self.plan if s.owner != me]
        by_index = {s.index: s for s in others}
        links: dict[bytes, bulk.Link] = {}
        for s in others:
            if s.owner not in links:
                nbytes = 4 * sum(x.numel for x in others if x.owner == s.owner)
                links[s.owner] = self._link(ID(s.owner), nbytes, self.timeout_s, "merged")
            for lo, hi in s.pieces(p):
                links[s.owner].submit(bulk.Request(self.attempt, "merged", s.index, lo, hi))
        for link in links.values():
            link.finish()

        async def pull(o: bytes) -> None:
            def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
                writer.write_flat(req.lo, self._merged_values(by_index[req.index], req, arrays))

            what = f"owner {short_peer(str(ID(o)))} did not deliver its merged pieces"
            await self._run_link(links[o], on_piece, what)

        async with trio.open_nursery() as nursery:
            for o in links:
                nursery.start_soon(pull, o)

    @staticmethod
    def _merged_values(shard: Shard, req: bulk.Request, arrays: dict) -> np.ndarray:
        values = arrays.get("values")
        if set(arrays) != {"values"} or values.dtype != np.float32:
            raise MergeError(f"shard {shard.index}: parts {sorted(arrays)}, not float32 values")
        if values.shape != (req.hi - req.lo,):
            raise MergeError(
                f"shard {shard.index}: piece of shape {list(values.shape)} for [{req.lo}, {req.hi})"
            )
        return values

    # One shard from one member, or from its owner, on a link of its own: the same links,
    # checks and retries as above, for callers that handle a shard at a time.
    async def _pull_member(
        self,
        shard: Shard,
        member: bytes,
        pieces: list[tuple[int, int]],
        reducer: CanonicalReducer,
    ) -> None:
        piece_of = {lo: k for k, (lo, _) in enumerate(pieces)}
        if member == self.me.to_bytes():
            for k, (lo, hi) in enumerate(pieces):
                reducer.add(member, k, await self._read_premerge(lo, hi))
            return
        peer = ID(member)
        link = self._link(peer, 4 * shard.numel, self.timeout_s / 2)
        for lo, hi in pieces:
            link.submit(bulk.Request(self.attempt, "premerge", shard.index, lo, hi))
        link.finish()

        def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            reducer.add(member, piece_of[req.lo], self._values(shard, arrays))

        what = f"member {short_peer(str(peer))} did not deliver shard {shard.index}"
        await self._run_link(link, on_piece, what)

    async def _gather(self, shard: Shard, writer: AtomicSafetensorsWriter) -> None:
        if shard.owner == self.me.to_bytes():
            await self.result_ready[shard.index].wait()
            if shard.index in self.failed:
                raise MergeError(self.failed[shard.index])
            writer.write_flat(shard.lo, self.results[shard.index])
            return
        owner = ID(shard.owner)
        link = self._link(owner, 4 * shard.numel, self.timeout_s)
        for lo, hi in shard.pieces(self.transfer_elems):
            link.submit(bulk.Request(self.attempt, "merged", shard.index, lo, hi))
        link.finish()

        def on_piece(req: bulk.Request, header: wire.BulkHeader, arrays: dict) -> None:
            writer.write_flat(req.lo, self._merged_values(shard, req, arrays))

        what = f"shard {shard.index} from owner {short_peer(str(owner))}"
        await self._run_link(link, on_piece, what)

    # ------------------------------------------------------------------ 5. verify
    async def _publish_hash(self, my_hash: str, digest: str) -> None:
        while True:  # now, then every heartbeat: late joiners need our hash too
            await self.membership.publish(
                "merge.hash", hash=my_hash, digest=digest, attempt=self.attempt
            )
            await trio.sleep(HEARTBEAT_S)  # a period, not synchronisation

    async def _verify(self, members: list[ID], my_hash: str, digest: str) -> None:
        others = [p for p in members if p != self.me]
        lost_since: dict[ID, float] = {}  # members without a hash, suspected since when

        def have_all() -> bool:
            if all(p in self.hashes for p in others) or self.newer_attempt > self.attempt:
                return True
            now, lost = trio.current_time(), set(self._lost(others)) - set(self.hashes)
            for p in list(lost_since):
                if p not in lost:
                    del lost_since[p]  # back: its hash may still come
            for p in lost:
                lost_since.setdefault(p, now)
            return bool(self._given_up(lost_since, now))

        async def report() -> None:
            """Who we still wait for, every VERIFY_REPORT_S (bounded lines)."""
            while True:
                await trio.sleep(VERIFY_REPORT_S)  # a period, not synchronisation
                missing = [p for p in others if p not in self.hashes]
                lost = [p for p in missing if p in lost_since]
                log.info(
                    "merge attempt %d: hashes from %d of %d members; waiting for %s%s",
                    self.attempt, len(others) - len(missing) + 1, len(members),
                    names_shown(missing), f" ({len(lost)} of them not alive)" if lost else "",
                )  # fmt: skip

        async def pull_missing() -> None:
            asked: dict[ID, float] = {}
            await trio.sleep(HASH_PULL_AFTER_S)  # pubsub's turn first
            async with trio.open_nursery() as pulls:
                while True:
                    now = trio.current_time()
                    for p in others:
                        if p not in self.hashes and now - asked.get(p, -math.inf) >= (
                            HASH_PULL_EVERY_S
                        ):
                            asked[p] = now
                            pulls.start_soon(self._pull_hash, p)
                    await trio.sleep(HEARTBEAT_S)  # a period, not synchronisation

        self._my_hash = (my_hash, digest)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publish_hash, my_hash, digest)
            nursery.start_soon(report)
            nursery.start_soon(pull_missing)
            await self.membership.wait_until(have_all, self.timeout_s)
            nursery.cancel_scope.cancel()
        missing = [short_peer(str(p)) for p in others if p not in self.hashes]
        if self.newer_attempt > self.attempt:
            raise MergeRetry(self.newer_attempt)
        if missing:
            raise MergeError(f"no merged hash from {', '.join(missing)}")
        wrong = [
            f"{short_peer(str(p))}={self.hashes[p][0][:12]}"
            for p in others
            if self.hashes[p] != (my_hash, digest)
        ]
        if wrong:
            raise MergeMismatch(
                f"merged hashes disagree: ours {my_hash[:12]} (members {digest[:8]}), "
                f"theirs {', '.join(wrong)}"
            )
