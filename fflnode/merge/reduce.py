"""The canonical reduction of one shard, bit-exact whatever order pieces arrive in.

Definition (DESIGN.md): merged = float32(sum_i float64(x_i) / N), the sum taken in
ascending order of peer-ID bytes. Floating-point addition is not associative, so the
order is part of the definition: for every element, this class adds the members'
values strictly in that order, starting from +0.0 (as fflnode.tensors.canonical_mean).

A shard arrives as pieces (element ranges), one (member, piece) at a time, in any order.
A piece from the member whose turn it is for that piece is added at once; one from a
member at most `window` turns ahead is buffered; one further ahead is refused (callers
pull in canonical order, so only a broken or hostile peer gets there).

Memory: the float32 result of the shard, O(|theta|/M), plus a float64 accumulator for
each piece in progress (allocated at its first contribution, released when its last one
is in) and the buffered pieces. A caller that feeds pieces in order (piece-major,
member-minor) holds one or two accumulators at a time, never one for the whole shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fflnode.errors import MergeError

if TYPE_CHECKING:  # the reducer is pure numpy: no trio or libp2p import at run time
    from fflnode.p2p.bulk import Gauge


class CanonicalReducer:
    """Average float32 contributions of `members` over `pieces`, summing in canonical order.

    `pieces` are [lo, hi) element ranges relative to the shard start, covering
    [0, numel) without overlap. `out`, when given, receives the float32 result of each
    piece as the piece completes (else the reducer allocates it).
    """

    def __init__(
        self,
        members: Sequence[bytes],
        pieces: Sequence[tuple[int, int]],
        window: int,
        out: np.ndarray | None = None,
        gauge: Gauge | None = None,
    ) -> None:
        if list(members) != sorted(set(members)) or not members:
            raise MergeError("reducer members must be non-empty, sorted ascending and unique")
        if window < 1:
            raise MergeError(f"reduction window must be at least 1, got {window}")
        self.members = list(members)
        self.position = {p: i for i, p in enumerate(self.members)}
        self.pieces = list(pieces)
        numel = self.pieces[-1][1] if self.pieces else 0
        if [lo for lo, _ in self.pieces] != [0] + [hi for _, hi in self.pieces[:-1]]:
            raise MergeError("reducer pieces must tile the shard in order")
        if out is not None and (out.dtype != np.float32 or out.shape != (numel,)):
            raise MergeError(f"reducer output must be float32[{numel}]")
        self.window = window
        self.out = np.empty(numel, dtype=np.float32) if out is None else out
        self.next = [0] * len(self.pieces)  # per piece: member index whose turn it is
        self.pending: dict[tuple[int, int], np.ndarray] = {}
        self.acc: dict[int, np.ndarray] = {}  # piece -> float64 sum so far
        # Released accumulators, reused: a fresh one page-faults its zero pages in (0.5-0.8
        # GB/s in this VM, DESIGN.md); reducing 16 MiB from 4 members in 1 MiB pieces took
        # 0.05-0.07 s with fresh ones, 0.03-0.04 reusing them.
        self._spare: list[np.ndarray] = []
        self.gauge = gauge  # told of every accumulator allocated, and of `release`
        self._allocated = 0  # bytes of accumulators allocated (live and spare)
        self.added = 0  # contributions added so far (buffered ones not counted)

    def add(self, peer: bytes, piece: int, values: np.ndarray) -> bool:
        """Offer `peer`'s values for piece number `piece`; True when that completed the
        piece (its result is in `out`). The reducer keeps `values` only while buffered."""
        i = self.position.get(peer)
        if i is None:
            raise MergeError(f"contribution from {peer.hex()[:16]}…, not a merge member")
        if not 0 <= piece < len(self.pieces):
            raise MergeError(f"piece {piece} outside the shard's {len(self.pieces)} pieces")
        lo, hi = self.pieces[piece]
        if i < self.next[piece] or (i, piece) in self.pending:
            raise MergeError(f"second contribution from member #{i} for piece {piece}")
        if values.dtype != np.float32 or values.shape != (hi - lo,):
            raise MergeError(
                f"member #{i} sent {values.dtype}{list(values.shape)} for piece {piece}, "
                f"expected float32[{hi - lo}]"
            )
        if i >= self.next[piece] + self.window:
            raise MergeError(
                f"member #{i}'s piece {piece} arrived {i - self.next[piece]} turns early, "
                f"beyond the window of {self.window}"
            )
        self.pending[(i, piece)] = values
        while (self.next[piece], piece) in self.pending:
            x = self.pending.pop((self.next[piece], piece))
            acc = self.acc.get(piece)
            if acc is None:  # the first: +0.0 + x in one pass (-0.0 becomes +0.0, as 0 + x)
                acc = self.acc[piece] = self._buffer(hi - lo)
                np.add(x, 0.0, out=acc, dtype=np.float64)
            else:
                np.add(acc, x, out=acc)  # float32 -> float64 is exact; one rounding per add
            self.next[piece] += 1
            self.added += 1
        if self.next[piece] < len(self.members):
            return False
        # Divided in float64, rounded once to float32 as it is stored: the same IEEE
        # operations as (acc / N).astype(float32), in one pass.
        acc = self.acc.pop(piece)
        np.divide(acc, len(self.members), out=self.out[lo:hi], casting="same_kind")
        self._spare.append(acc)
        return True

    def _buffer(self, n: int) -> np.ndarray:
        """n float64s: a released accumulator's buffer if one is large enough."""
        while self._spare:
            buf = self._spare.pop()
            if len(buf) >= n:
                return buf[:n]
        buf = np.empty(n, dtype=np.float64)
        self._allocated += buf.nbytes
        if self.gauge is not None:
            self.gauge.hold(buf.nbytes)
        return buf

    def release(self) -> None:
        """Drop the accumulators (live and spare): after `result`, or when giving up."""
        self.acc.clear()
        self._spare.clear()
        if self.gauge is not None:
            self.gauge.release(self._allocated)
        self._allocated = 0

    def done(self, piece: int) -> bool:
        return self.next[piece] == len(self.members)

    @property
    def complete(self) -> bool:
        return all(n == len(self.members) for n in self.next)

    def result(self) -> np.ndarray:
        """The merged float32 shard; fails loudly unless every member gave every piece."""
        short = [(k, n) for k, n in enumerate(self.next) if n != len(self.members)]
        if short:
            k, n = short[0]
            raise MergeError(
                f"piece {k} has {n} of {len(self.members)} contributions "
                f"({len(short)} pieces incomplete)"
            )
        return self.out
