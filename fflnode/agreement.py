"""Agreeing on a member set: a pure state machine, events in, decisions out.

Theory of operation. Every node proposes the set it would run with: the live peers it
sees plus itself (at the start of a run, the `size` first of them in the run's
canonical order, so surplus peers are left out by one rule everywhere). Agreement takes
two phases, because a proposal is only an opinion and may change with the view:

1. propose S. When every member of S proposes (or has locked) S, a node LOCKS S: from
   then on it announces S and nothing else, whatever its view says. A node whose view
   differs but who hears a peer locked on a set listing it locks that set too (views
   that disagree must not stall the run).
2. When every member of S has locked S, the node COMMITS S and acts on it.

A node that hears a committed S listing itself commits S too (the committer saw it lock
S). A committed S of at least `quorum` (or `size`) members without this node means the
others went ahead without it (`excluded`).

Safety: a node locks at most one set, and committing S needs every member of S locked on
S, so two committed sets can share no member: in a run whose sets are majorities (the
merge's quorum; a start barrier with fewer surplus peers than members) they always
share one, so no two nodes ever commit different sets. A lock that cannot complete (a
member died, or locked another set) ends at the caller's deadline.

Used by the start barrier (fflnode.node); the trio shell only delivers what it hears
(`heard`) and asks for a decision (`decide`) with its current view of who is alive.
Members are strings (base58 peer IDs, as they travel); `rank` orders them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

PROPOSE, LOCK, COMMIT = "propose", "lock", "commit"
STAGES = (PROPOSE, LOCK, COMMIT)


@dataclass(frozen=True)
class Proposal:
    members: tuple[str, ...]  # sorted
    stage: str  # PROPOSE, LOCK or COMMIT


@dataclass(frozen=True)
class Decision:
    """What the node announces now, and whether that ends the agreement."""

    members: tuple[str, ...]
    stage: str
    excluded: bool = False  # a set was committed without this node

    @property
    def committed(self) -> bool:
        return self.stage == COMMIT


class Agreement:
    def __init__(
        self,
        me: str,
        *,
        quorum: int,
        size: int | None = None,
        rank: Callable[[str], object] = lambda m: m,
        eligible: Callable[[str], bool] = lambda m: True,
        settle_s: float = 0.0,
    ) -> None:
        """`quorum`: fewest members a set may commit with; `size`: the exact size of
        the set (None: any size from `quorum`); `rank`: the order that chooses the
        `size` members; `eligible(peer)`: whether a peer may be a member at all;
        `settle_s`: how long this node's own view must stay unchanged before it locks
        it (a peer's heartbeat late for a moment must not shape the set)."""
        self.me = me
        self.quorum = quorum
        self.size = size
        self.rank = rank
        self.eligible = eligible
        self.settle_s = settle_s
        self.proposals: dict[str, Proposal] = {}
        self.locked: tuple[str, ...] | None = None
        self.committed: tuple[str, ...] | None = None
        self._view: tuple[str, ...] = ()
        self._view_since = 0.0

    def heard(self, peer: str, members: Iterable[str], stage: str) -> None:
        """A peer's announcement (decoded and schema-checked by the wire layer)."""
        if peer == self.me or not self.eligible(peer) or stage not in STAGES:
            return
        ms = tuple(sorted(members))
        if not all(self.eligible(m) or m == self.me for m in ms):
            return  # names peers outside the run: no proposal
        held = self.proposals.get(peer)
        if held is not None and held.stage != PROPOSE:
            if held.members != ms:
                return  # an honest node never leaves its lock; ignore a peer that does
            if STAGES.index(held.stage) > STAGES.index(stage):
                return  # a late, older announcement changes nothing
        self.proposals[peer] = Proposal(ms, stage)

    def view(self, alive: Iterable[str]) -> tuple[str, ...]:
        """The set this node would run with, from the peers it sees alive."""
        candidates = sorted({m for m in alive if self.eligible(m)} | {self.me}, key=self.rank)
        if self.size is not None:
            candidates = candidates[: self.size]
        return tuple(sorted(candidates))

    def _all(self, members: tuple[str, ...], stages: tuple[str, ...]) -> bool:
        return all(
            (p := self.proposals.get(m)) is not None and p.members == members and p.stage in stages
            for m in members
            if m != self.me
        )

    def _big_enough(self, members: tuple[str, ...]) -> bool:
        return len(members) >= self.quorum and (self.size is None or len(members) == self.size)

    def decide(self, alive: Iterable[str], now: float = 0.0) -> Decision:
        """What to announce, given the peers this node sees alive at time `now`."""
        if self.committed is not None:
            return Decision(self.committed, COMMIT)
        for p in self.proposals.values():
            if p.stage == COMMIT and self.me in p.members and self.locked in (None, p.members):
                self.locked = self.committed = p.members
                return Decision(p.members, COMMIT)
        for p in self.proposals.values():  # a set was committed without us: we are out
            if p.stage == COMMIT and self.me not in p.members and self._big_enough(p.members):
                return Decision(p.members, COMMIT, excluded=True)
        if self.locked is not None:
            if self._all(self.locked, (LOCK, COMMIT)):
                self.committed = self.locked
                return Decision(self.locked, COMMIT)
            return Decision(self.locked, LOCK)
        proposal = self.view(alive)
        if proposal != self._view:
            self._view, self._view_since = proposal, now
        settled = now - self._view_since >= self.settle_s
        if (
            settled
            and self.me in proposal
            and self._big_enough(proposal)
            and self._all(proposal, STAGES)
        ):
            self.locked = proposal
            return self.decide(alive, now)  # a lock may complete at once (the others locked)
        follow = self._lock_to_follow()
        if follow is not None:  # views differ; someone locked a set with us: join it
            self.locked = follow
            return self.decide(alive, now)
        return Decision(proposal, PROPOSE)

    def _lock_to_follow(self) -> tuple[str, ...] | None:
        """The set most peers locked that lists us (ties: the smallest), if any."""
        counts: dict[tuple[str, ...], int] = {}
        for p in self.proposals.values():
            if p.stage == LOCK and self.me in p.members and self._big_enough(p.members):
                counts[p.members] = counts.get(p.members, 0) + 1
        if not counts:
            return None
        return min(counts, key=lambda ms: (-counts[ms], ms))


__all__ = ["COMMIT", "LOCK", "PROPOSE", "STAGES", "Agreement", "Decision", "Proposal"]
