"""The canonical reduction of one shard, bit-exact whatever order pieces arrive in.

Definition (DESIGN.md): merged = float32(sum_i float64(x_i) / N), the sum taken in
ascending order of peer-ID bytes. Floating-point addition is not associative, so the
order is part of the definition: for every element, this class adds the members'
values strictly in that order.

A shard arrives as pieces (element ranges), one (member, piece) at a time, in any order.
A piece from the member whose turn it is for that piece is added at once; one from a
member at most `window` turns ahead is buffered; one further ahead is refused (callers
pull in canonical order, so only a broken or hostile peer gets there). Memory: the
float64 accumulator of the shard, O(|theta|/M), plus the buffered pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fflnode.errors import MergeError


class CanonicalReducer:
    """Average float32 contributions of `members` over `pieces`, summing in canonical order.

    `pieces` are [lo, hi) element ranges relative to the shard start, covering
    [0, numel) without overlap.
    """

    def __init__(
        self, members: Sequence[bytes], pieces: Sequence[tuple[int, int]], window: int
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
        self.window = window
        self.acc = np.zeros(numel, dtype=np.float64)
        self.next = [0] * len(self.pieces)  # per piece: member index whose turn it is
        self.pending: dict[tuple[int, int], np.ndarray] = {}

    def add(self, peer: bytes, piece: int, values: np.ndarray) -> None:
        """Offer `peer`'s values for piece number `piece`."""
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
            self.acc[lo:hi] += self.pending.pop((self.next[piece], piece))  # f32->f64 exact
            self.next[piece] += 1

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
        # In place (no second float64 copy of the shard), then released: the same IEEE
        # operations as (acc / N).astype(float32), so the result is bit-identical.
        self.acc /= len(self.members)
        out = self.acc.astype(np.float32)
        self.acc = np.empty(0, dtype=np.float64)
        return out
