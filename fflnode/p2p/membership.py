"""Membership from heartbeats on the run's pubsub topic, and the run's address book.

Every node publishes a heartbeat each HEARTBEAT_S: its round, phase and listen addresses.
A peer is alive while its heartbeats keep arriving (MEMBER_TIMEOUT_S). The sender of a
pubsub message is its signed origin (`from_id`, verified by pubsub's strict signing),
never a field we parse. Heartbeats also carry addresses, so a node that bootstrapped
through one peer learns and dials every other: the direct streams of the exchange and
the merge need them.

Admission. A heartbeat also carries its sender's run descriptor (fflnode.admission); a
peer whose descriptor differs from ours, or who cannot prove the run secret of a closed
run, is refused with one line naming what differs, and never enters the peer book: it is
not alive, not a member, not dialled, and its other announcements are dropped.

Validation before forwarding. `validate` is the topic's pubsub validator: a message is
decoded and checked (schema, run, admission) before GossipSub forwards it, so a hostile
announcement stops at the first honest node instead of reaching the whole mesh. Every
rejection is counted against its signed origin; nothing a peer sends can raise out of
the validator or the dispatch loop.

Other announcement kinds on the same topic (merge proposals, hashes) are handed to
whoever registered for them with `on(kind, callback)`. Pubsub is for small control
messages only: py-libp2p drops payloads >= 1 MiB silently (DESIGN.md).

Frozen peers. py-libp2p never notices a peer that stopped (SIGSTOP): its TCP connection
stays open and a read from it waits forever. A peer whose heartbeat is overdue is pinged
over `/fflnode/ping/1.0.0` with a deadline; if it does not answer it becomes a suspect:
not alive until a fresh heartbeat proves it back, and disconnected (which fails every
stream open to it at once) if it stays silent SUSPECT_HANGUP_S longer. A peer we hold no
connection to, did not hang up on, and whose redial was refused is `unreachable`: it
exited or crashed, which callers may act on sooner than on silence (the merge does).

Partitions. Heartbeats travel only over connections, so two nodes that each gave up on
the other (a cable pulled for longer than OVERDUE_S + PING_TIMEOUT_S, a host that
rebooted while we were cut off) would each wait forever for the other's heartbeat.
Every peer in the book that we hold no connection to is therefore redialled at the
addresses its last heartbeat named, under the same per-peer backoff as any dial
(DIAL_BACKOFF_S), until a connection carries its heartbeats again.

Our own stalls. A node whose own event loop was held up (descheduled on a loaded
machine, or busy) hears nothing meanwhile: every peer's heartbeat waits unread in a
socket, and on waking every peer looks silent at once. The watchdog measures how late
its own wake-ups come; time our loop was seen stalled (beyond STALL_GRACE_S) is not
counted in a peer's silence (`silence_s`, up to MAX_EXCUSED_S), and a ping that failed
while we stalled proves nothing about the peer, so it is asked again rather than
suspected. 16 daemons on 2 cores each stalled for seconds at a time and suspected every
peer at once ("1 of the run's 16 members reachable").
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.pubsub import Pubsub

from fflnode import wire
from fflnode.admission import Admission, Refusal
from fflnode.errors import WireError, bounded, short_peer
from fflnode.p2p import streams
from fflnode.p2p.bulk import Traffic
from fflnode.p2p.peerlog import PeerLog
from fflnode.p2p.reach import AddressGuard

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
PING_PROTOCOL = "/fflnode/ping/1.0.0"
# A heartbeat this late gets its sender pinged: 2.5 missed beats, more than pubsub's
# jitter on a busy machine, well before MEMBER_TIMEOUT_S declares it dead anyway.
OVERDUE_S = 2.5
# A live peer answers a ping in milliseconds when idle; 16 daemons on this 2-core
# machine answered in 2-4 s while starting up, and a 2 s deadline made them suspect
# each other in a cascade (each suspect is hung up on, so its own pings fail too) and
# never agree to start. A dead process fails a ping at once (connection refused).
PING_TIMEOUT_S = 4.0
# Identities the peer book holds: a run has at most wire.MAX_MEMBERS nodes, and new
# identities cost an attacker nothing, so the book is capped; when full a newcomer gets
# in only by displacing the longest-silent suspect.
MAX_PEERS = wire.MAX_MEMBERS
# Declared dead after this long without a heartbeat or a pong: an overdue peer is
# pinged at OVERDUE_S and may answer up to PING_TIMEOUT_S later; its pong refreshes it.
# (The least a peer gets: `member_timeout_s` adapts it to the peer's jitter, below.)
MEMBER_TIMEOUT_S = OVERDUE_S + PING_TIMEOUT_S + HEARTBEAT_S
# Adaptive failure detection (the idea of phi accrual, Hayashibara et al. 2004): how
# late a heartbeat must be to get its sender pinged follows the gaps between that
# peer's heartbeats as we receive them, mean + JITTER_SIGMAS standard deviations,
# never less than OVERDUE_S nor more than MAX_OVERDUE_S. 16 daemons starting on 2
# cores delivered heartbeats 1-7 s apart; a fixed 2.5 s made every node suspect every
# other every few seconds, and the start barrier, which needs all of them alive at
# once, never formed. A frozen peer is still found within MAX_OVERDUE_S + the ping.
JITTER_SIGMAS = 4.0
MAX_OVERDUE_S = 10.0
GAP_EWMA_WEIGHT = 0.1  # of each new gap: the estimate follows load changes in ~10 beats
# The ping deadline follows this node's measured round trips the same way: at least
# PING_TIMEOUT_S, PING_RTT_FACTOR times the slowest recent answer, at most MAX_PING_S.
PING_RTT_FACTOR = 3.0
MAX_PING_S = 8.0
RTT_DECAY = 0.9  # per answered ping: the slowest recent answer fades in ~20 pings
# A suspect is hung up on only if it stays silent this much longer. Being a suspect
# already takes it out of `alive()` (no agreement, exchange or merge waits on it); the
# hang-up only protects pubsub from writing to a peer that stopped reading. A slow but
# live peer (16 daemons starting on 2 cores) sends a heartbeat within a few seconds and
# is back with its connection intact; hanging up at once made each such peer redial
# (a Noise handshake and a new mesh, ~0.25 s of CPU per connection in py-libp2p), which
# loaded the machine further and made the next pings fail: 16 nodes never started.
# A frozen peer fills no buffer in this time: it is sent a heartbeat a second.
SUSPECT_HANGUP_S = 15.0
# Address-book entries of peers learnt from heartbeats live this long in the peerstore.
ADDR_TTL_S = 600
DIAL_TIMEOUT_S = 10.0
# Redials of one peer learnt from heartbeats: first after 2 s, doubling to 5 min. An
# honest peer that restarts dials us itself; a heartbeat naming someone else's address
# costs that address one connection attempt per backoff period, not one per second.
DIAL_BACKOFF_S = (2.0, 300.0)
# The watchdog wakes every HEARTBEAT_S; waking later than this past its time is our own
# loop stalling, not scheduling jitter (a loaded machine's ordinary lateness is ~0.1 s).
STALL_GRACE_S = 0.5
# At most this much of our own stalling is excused in one peer's silence: a peer that
# died while we stalled is still found at most this much later than its timeout.
MAX_EXCUSED_S = 30.0


def announce_topic(run_id: str) -> str:
    return f"/fflnode/{run_id}/announce/1"


@dataclass
class PeerView:
    peer: ID
    last_seen: float
    round: int = 0
    phase: str = "join"
    addrs: list[str] = field(default_factory=list)
    seq: int = -1
    heard: float | None = None  # when its last fresh heartbeat arrived
    gap_mean: float = HEARTBEAT_S  # EWMA of the gaps between its heartbeats
    gap_var: float = 0.0  # and of their squared deviation
    stalled_mark: float = 0.0  # our stalled total (Membership.stalled_s) at last_seen

    def heartbeat_at(self, now: float) -> None:
        """A fresh heartbeat arrived at `now`: fold its gap into the estimate."""
        if self.heard is not None:
            gap = min(now - self.heard, MAX_OVERDUE_S)  # a freeze is not jitter
            delta = gap - self.gap_mean
            self.gap_mean += GAP_EWMA_WEIGHT * delta
            self.gap_var = (1 - GAP_EWMA_WEIGHT) * (self.gap_var + GAP_EWMA_WEIGHT * delta**2)
        self.heard = now

    def overdue_s(self) -> float:
        """How late its heartbeat may be before it is pinged (JITTER_SIGMAS above)."""
        expected = self.gap_mean + JITTER_SIGMAS * self.gap_var**0.5
        return min(MAX_OVERDUE_S, max(OVERDUE_S, expected))


Handler = Callable[[ID, wire.Message], None]
ANNOUNCEMENTS = frozenset({"hb", "start.ready", "merge.ready", "merge.hash"})  # the run topic


# A peer's addresses as a log line shows them: what a heartbeat may carry (16 of up to
# 4 KiB each) cut to what fits a line, non-printable characters escaped.
ADDRS_LOG_CHARS = 400


def _shown(addrs: list[str]) -> str:
    return bounded(", ".join(addrs) or "no address", ADDRS_LOG_CHARS)


def decode_announcement(
    msg: Any, me: ID, run_id: str, expect: set[str] | frozenset[str], traffic: Traffic
) -> tuple[ID, wire.Message] | None:
    """A pubsub message of this run from another node, decoded and checked; None for our
    own echo or a rejected one (counted against its sender, logged at most once a
    window per peer). Never raises on what a peer sent."""
    try:
        sender = ID(msg.from_id)
    except Exception:  # py-libp2p validated the signature, so this cannot happen
        traffic.reject("schema", "", "announcement with an unreadable origin")
        return None
    if sender == me:
        return None
    try:
        decoded = wire.decode(
            msg.data, str(sender), run=run_id, limit=wire.MAX_PUBSUB_BYTES, expect=expect
        )
    except WireError as e:
        traffic.reject_error(e, "announcement")
        return None
    except Exception as e:  # nothing a peer sends may raise out of here (issue 10)
        traffic.reject_unexpected(str(sender), "announcement", e)
        return None
    return sender, decoded


class Membership:
    """Who is in the run, as seen from this node."""

    def __init__(
        self,
        host: IHost,
        pubsub: Pubsub,
        run_id: str,
        traffic: Traffic,
        admission: Admission | None = None,
        screen: Callable[[ID, Any], bool] = lambda forwarder, msg: True,
        guard: AddressGuard | None = None,
    ):
        """`admission`: this run's descriptor (None admits any well-formed heartbeat:
        tests and demos only); `screen(forwarder, msg)`: the access gate's verdict on a
        pubsub message's origin and forwarder (Gate.validate_announcement). `guard`: the
        dial policy over the host's address book (a default one is installed if None)."""
        self.host = host
        self.pubsub = pubsub
        self.run_id = run_id
        self.topic = announce_topic(run_id)
        self.me = host.get_id()
        self.admission = admission
        self.screen = screen
        self._guard = guard
        self._next_dial: dict[ID, tuple[float, float]] = {}  # peer -> (not before, backoff)
        self.refused: dict[ID, Refusal] = {}  # peers whose heartbeats were refused, and why
        self.peers: dict[ID, PeerView] = {}
        self.round = 0
        self.phase = "join"
        self._seq = 0  # last heartbeat sequence number sent
        self._handlers: dict[str, list[Handler]] = {}
        self._changed = trio.Event()
        self.traffic = traffic
        self._dialing: set[ID] = set()
        # A peer's advertised addresses, each time they change: at most a line a minute
        # per peer (a hostile peer may change them every heartbeat).
        self._addr_log = PeerLog(log)
        self.suspects: dict[ID, int] = {}  # peer -> seq of its last heartbeat when suspected
        self._slowest_rtt = 0.0  # the slowest recent pong, decaying (RTT_DECAY)
        self._stalled_s = 0.0  # our own loop's stalls seen so far (module doc), in total
        self._watch_due: float | None = None  # when the watchdog should wake next
        # Peers we hung up on (suspects), until a connection to them carries heartbeats
        # again: their lost connection is our doing, not a sign that they are gone.
        self._hung_up: set[ID] = set()
        # Peers whose last dial failed outright (not a timeout), until connected again.
        self._redial_refused: set[ID] = set()

    @property
    def guard(self) -> AddressGuard:
        """The dial policy over the host's address book (installed on first use)."""
        if self._guard is None:
            self._guard = AddressGuard(self.host)
        return self._guard

    # -- observers --
    def on(self, kind: str, handler: Handler) -> None:
        self._handlers.setdefault(kind, []).append(handler)

    def ping_timeout_s(self) -> float:
        """The ping deadline: PING_RTT_FACTOR x the slowest recent answer, bounded."""
        return min(MAX_PING_S, max(PING_TIMEOUT_S, PING_RTT_FACTOR * self._slowest_rtt))

    def heard_since(self, peer: ID, t: float) -> bool:
        """Whether a heartbeat or a pong of `peer` arrived at or after trio time `t`."""
        view = self.peers.get(peer)
        return view is not None and view.last_seen >= t

    def stalled_s(self, now: float | None = None) -> float:
        """How long our own event loop has been seen stalled, in total: past stalls and
        the one under way, if the watchdog is late now."""
        now = trio.current_time() if now is None else now
        late = 0.0 if self._watch_due is None else now - self._watch_due
        return self._stalled_s + (late if late > STALL_GRACE_S else 0.0)

    def seen(self, view: PeerView, now: float) -> None:
        """`view`'s peer was heard from at `now` (a heartbeat or a pong)."""
        view.last_seen = max(view.last_seen, now)
        view.stalled_mark = self.stalled_s(now)

    def silence_s(self, view: PeerView, now: float | None = None) -> float:
        """How long `view`'s peer has been silent, less our own stalls meanwhile (up to
        MAX_EXCUSED_S): a peer is not blamed for what we did not read."""
        now = trio.current_time() if now is None else now
        excused = min(MAX_EXCUSED_S, max(0.0, self.stalled_s(now) - view.stalled_mark))
        return now - view.last_seen - excused

    def member_timeout_s(self, view: PeerView) -> float:
        """Silence after which `view`'s peer is dead even unpinged: overdue, pinged, and
        a heartbeat's slack (MEMBER_TIMEOUT_S for a peer with punctual heartbeats)."""
        return view.overdue_s() + self.ping_timeout_s() + HEARTBEAT_S

    def alive(self) -> list[ID]:
        """Peers (not me) heard from within their member timeout and not suspected."""
        now = trio.current_time()
        return [
            p
            for p, v in self.peers.items()
            if self.silence_s(v, now) <= self.member_timeout_s(v) and p not in self.suspects
        ]

    def is_alive(self, peer: ID) -> bool:
        v = self.peers.get(peer)
        return (
            v is not None
            and self.silence_s(v) <= self.member_timeout_s(v)
            and peer not in self.suspects
        )

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `predicate()` holds, re-checking at every membership change."""
        with trio.move_on_after(timeout_s):
            while not predicate():
                with trio.move_on_after(HEARTBEAT_S):  # liveness expires without events
                    await self.wait_changed()
            return True
        return predicate()

    # -- tasks --
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        subscription = await self.pubsub.subscribe(self.topic)
        self.host.set_stream_handler(PING_PROTOCOL, self.handle_ping)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive, subscription, nursery)
            nursery.start_soon(self._beat)
            nursery.start_soon(self._watch, nursery)
            task_status.started()

    async def publish(self, kind: str, **fields: object) -> None:
        data = wire.encode(kind, run=self.run_id, **fields)
        if len(data) > wire.MAX_PUBSUB_BYTES:
            raise ValueError(f"{kind} announcement of {len(data)} bytes is too large for pubsub")
        await self.pubsub.publish(self.topic, data)

    async def beat_now(self) -> None:
        # Milliseconds of wall time, kept strictly increasing: a restarted node's beats
        # must outrank the ones it sent before it died, or peers would drop them as stale.
        self._seq = max(self._seq + 1, time.time_ns() // 1_000_000)
        addrs = [str(a) for a in self.host.get_addrs()][: wire.MAX_ADDRS]
        admit: dict[str, object] = {"admit": {}}
        if self.admission is not None:
            admit = self.admission.heartbeat_fields(self.me.to_bytes())
        await self.publish(
            "hb", round=self.round, phase=self.phase, addrs=addrs, seq=self._seq, **admit
        )

    # ------------------------------------------------------------------ validation
    def validate(self, forwarder: ID, msg: Any) -> bool:
        """The run topic's pubsub validator: True lets GossipSub deliver and forward.

        Drops what the gate refuses, anything that fails to decode (counted against its
        signed origin) and heartbeats that fail admission. Never raises."""
        try:
            origin = ID(msg.from_id)
            if not self.screen(forwarder, msg):
                return False
            if origin == self.me:
                return True
            got = decode_announcement(msg, self.me, self.run_id, ANNOUNCEMENTS, self.traffic)
            if got is None:
                return False
            if got[1].kind == "hb":
                return self._admit(origin, got[1]) is None
            # Well formed, from a peer whose heartbeat may still be on its way: forward it
            # (GossipSub counts a rejection against the honest forwarder); dispatch drops
            # it here until its origin is admitted.
            return True
        except Exception as e:  # nothing a peer sends may raise out of a validator
            self.traffic.reject_unexpected(str(forwarder), "pubsub validator", e)
            return False

    def _admit(self, peer: ID, hb: wire.Message) -> Refusal | None:
        """None when `peer`'s heartbeat proves it belongs to this run; else why not
        (recorded in `refused`, and logged at most once a window per peer)."""
        if self.admission is None:
            return None
        refusal = self.admission.check(peer.to_bytes(), hb["admit"], hb.get("proof"))
        if refusal is None:
            self.refused.pop(peer, None)
            return None
        if peer not in self.refused and len(self.refused) >= MAX_PEERS:
            self.refused.pop(next(iter(self.refused)))
        self.refused[peer] = refusal
        self.traffic.peer_log.log(
            str(peer), "admission", f"refused as a member of run {self.run_id!r}: {refusal.text}"
        )
        return refusal

    async def _beat(self) -> None:
        while True:
            await self.beat_now()
            await trio.sleep(HEARTBEAT_S)  # a period, not synchronisation

    async def _receive(self, subscription: object, nursery: trio.Nursery) -> None:
        while True:
            msg = await subscription.get()  # type: ignore[attr-defined]
            got = decode_announcement(msg, self.me, self.run_id, ANNOUNCEMENTS, self.traffic)
            if got is None:
                continue
            sender, decoded = got
            try:
                if decoded.kind == "hb":
                    if self._admit(sender, decoded) is not None:
                        continue
                    self._heartbeat(sender, decoded, nursery)
                if sender not in self.peers:
                    continue  # only members' proposals and hashes count
                for handler in self._handlers.get(decoded.kind, []):
                    handler(sender, decoded)
            except Exception as e:  # a handler choking on a peer's announcement (issue 10)
                self.traffic.reject_unexpected(str(sender), f"{decoded.kind} announcement", e)
            self._notify()

    def _heartbeat(self, sender: ID, msg: wire.Message, nursery: trio.Nursery) -> None:
        view = self.peers.get(sender)
        if view is not None and not self.is_alive(sender):
            # Back after a crash or a freeze: py-libp2p keeps a failed peer in a dial
            # negative cache for 60 s, which would refuse every stream to it meanwhile.
            self.host.get_network().unblock_peer(sender)  # type: ignore[attr-defined]
        if view is None:
            if len(self.peers) >= MAX_PEERS and not self._forget_a_suspect():
                log.debug("peer book full: ignoring newcomer %s", short_peer(str(sender)))
                return
            view = self.peers[sender] = PeerView(sender, trio.current_time())
            log.info(
                "peer %s joined (round %d, %s), advertising %s",
                short_peer(str(sender)),
                msg["round"],
                msg["phase"],
                _shown(msg["addrs"]),
            )
        if msg["seq"] <= view.seq:
            return  # stale or replayed heartbeat: ignore, do not refresh liveness
        if sender in self.suspects and msg["seq"] > self.suspects[sender]:
            del self.suspects[sender]
            log.info("peer %s is back", short_peer(str(sender)))
        self.seen(view, trio.current_time())
        view.heartbeat_at(view.last_seen)
        if view.seq >= 0 and msg["addrs"] != view.addrs:
            text = f"now advertises {_shown(msg['addrs'])}"
            self._addr_log.log(str(sender), "addresses", text, logging.INFO)
        view.seq, view.round, view.phase = msg["seq"], msg["round"], msg["phase"]
        view.addrs = msg["addrs"]
        if self._connected(sender):
            self._hung_up.discard(sender)
            self._redial_refused.discard(sender)
        elif sender not in self._dialing:
            nursery.start_soon(self._dial, sender, list(view.addrs))

    def _connected(self, peer: ID) -> bool:
        return bool(self.host.get_network().connections.get(peer))

    def unreachable(self, peer: ID) -> bool:
        """We hold no connection to `peer`, not because we hung up on it, and our
        redial since failed outright (refused, reset): the process is gone (exited,
        crashed). A silent peer whose connection is still open, that we hung up on
        ourselves, that hung up on us (it suspected us) and takes our redial, or whose
        redial only timed out, may just be slow: a loaded machine's stalls last tens of
        seconds, and in a 16-node testnet peers that suspected each other hung up both
        ways."""
        return (
            not self._connected(peer) and peer not in self._hung_up and peer in self._redial_refused
        )

    async def hang_up(self, peer: ID) -> None:
        """Close our connections to a suspect (bounded), remembering that we did."""
        self._hung_up.add(peer)
        with trio.move_on_after(PING_TIMEOUT_S):
            await self.host.disconnect(peer)

    # ------------------------------------------------------------------ liveness
    async def _watch(self, nursery: trio.Nursery) -> None:
        """Ping every peer whose heartbeat is overdue; suspect those that do not answer;
        redial those we hold no connection to (see "Partitions" above)."""
        pinging: set[ID] = set()

        async def check(peer: ID) -> None:
            try:
                stalled = self.stalled_s()
                if await self.ping(peer):
                    view = self.peers.get(peer)
                    if view is not None:  # it answered: alive, whatever pubsub delays
                        self.seen(view, trio.current_time())
                elif self.stalled_s() > stalled:
                    log.debug("ping of %s failed while we stalled", short_peer(str(peer)))
                else:
                    self.suspect(peer, "missed heartbeats and did not answer a ping")
                    back = await self.wait_until(
                        lambda: peer not in self.suspects, SUSPECT_HANGUP_S
                    )
                    if not back:
                        await self.hang_up(peer)
            finally:
                pinging.discard(peer)

        while True:
            now = trio.current_time()
            self._stalled_s = self.stalled_s(now)  # the stall just ended, if any, is counted
            self._watch_due = now
            for peer, view in list(self.peers.items()):
                late = self.silence_s(view, now) > view.overdue_s()
                if late and peer not in self.suspects and peer not in pinging:
                    pinging.add(peer)
                    nursery.start_soon(check, peer)
                if view.addrs and self._redial_due(peer, now):
                    # Heartbeats travel over pubsub: a peer we hung up on (a suspect), or
                    # lost in a partition, and that hung up on us, is never heard again
                    # unless one side dials. Redial it at its last addresses, at most once
                    # per DIAL_BACKOFF_S period, past py-libp2p's 60 s negative cache of
                    # failed peers.
                    self.host.get_network().unblock_peer(peer)  # type: ignore[attr-defined]
                    nursery.start_soon(self._dial, peer, list(view.addrs))
            self._watch_due = trio.current_time() + HEARTBEAT_S
            await trio.sleep(HEARTBEAT_S)  # a period, not synchronisation

    def _redial_due(self, peer: ID, now: float) -> bool:
        """Not connected to `peer`, not dialling it, and its dial backoff has passed."""
        not_before = self._next_dial.get(peer, (0.0, 0.0))[0]
        return (
            now >= not_before
            and peer not in self._dialing
            and not self.host.get_network().connections.get(peer)
        )

    def _forget_a_suspect(self) -> bool:
        """Make room in a full peer book: drop the longest-silent suspect, if any."""
        if not self.suspects:
            return False
        oldest = min(self.suspects, key=lambda p: self.peers[p].last_seen if p in self.peers else 0)
        self.suspects.pop(oldest)
        self.peers.pop(oldest, None)
        self._hung_up.discard(oldest)
        self._redial_refused.discard(oldest)
        return True

    def suspect(self, peer: ID, why: str) -> None:
        view = self.peers.get(peer)
        self.suspects[peer] = view.seq if view else -1
        log.warning("peer %s suspected frozen or gone: %s", short_peer(str(peer)), why)
        self._notify()

    async def ping(self, peer: ID) -> bool:
        """True when `peer` answers a ping within `ping_timeout_s()`."""
        nonce = int.from_bytes(os.urandom(6), "big")
        stream = None
        t0 = trio.current_time()
        try:
            with trio.fail_after(self.ping_timeout_s()):
                stream = await self.host.new_stream(peer, [PING_PROTOCOL])
                await streams.send_message(stream, "ping", run=self.run_id, nonce=nonce)
                msg = await streams.recv_message(stream, expect={"pong"}, run=self.run_id)
                ok = msg["nonce"] == nonce
        except (trio.TooSlowError, WireError, *streams.STREAM_ERRORS):
            ok = False
        if ok:
            rtt = trio.current_time() - t0
            self._slowest_rtt = max(rtt, RTT_DECAY * self._slowest_rtt)
        if stream is not None:
            await (streams.close_quietly(stream) if ok else streams.reset_quietly(stream))
        return ok

    async def handle_ping(self, stream: INetStream) -> None:
        async def pong(msg: wire.Message) -> None:
            await streams.send_message(stream, "pong", run=self.run_id, nonce=msg["nonce"])

        await streams.serve_one(
            stream, expect={"ping"}, run=self.run_id, timeout_s=PING_TIMEOUT_S,
            traffic=self.traffic, where="ping", answer=pong,
        )  # fmt: skip

    async def _dial(self, peer: ID, addrs: list[str]) -> None:
        """Connect to a peer learnt from its heartbeat, so direct streams can reach it:
        only at the addresses the dial policy allows (fflnode.p2p.reach), and at most
        once per backoff period (an address a heartbeat names may be anyone's)."""
        now = trio.current_time()
        not_before, backoff = self._next_dial.get(peer, (0.0, DIAL_BACKOFF_S[0]))
        if now < not_before:
            return
        if len(self._next_dial) >= MAX_PEERS and peer not in self._next_dial:
            self._next_dial.pop(next(iter(self._next_dial)))
        self._next_dial[peer] = (now + backoff, min(2 * backoff, DIAL_BACKOFF_S[1]))
        maddrs = self.guard.dialable(peer, addrs)
        if not maddrs:
            self.traffic.peer_log.log(
                str(peer),
                "no-dialable-address",
                "heartbeat names no address we dial",
                logging.INFO,
            )
            return
        self._dialing.add(peer)
        try:
            # Our backoff paces these dials: py-libp2p's 60 s negative cache of a peer
            # whose dial failed would refuse a healed partition's first redials.
            self.host.get_network().unblock_peer(peer)  # type: ignore[attr-defined]
            with trio.move_on_after(DIAL_TIMEOUT_S):
                await self.host.connect(PeerInfo(peer, maddrs))
                self._next_dial.pop(peer, None)  # connected: a later loss may redial at once
                self._redial_refused.discard(peer)
                log.info(
                    "connected to peer %s at %s (from its heartbeat)",
                    short_peer(str(peer)),
                    _shown([str(a) for a in maddrs]),
                )
        except streams.STREAM_ERRORS as e:
            log.debug("dial %s failed: %s", short_peer(str(peer)), type(e).__name__)
            if peer in self.peers:  # bounded by the peer book
                self._redial_refused.add(peer)
        finally:
            self._dialing.discard(peer)
