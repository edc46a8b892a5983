"""Shard planning: cut the flat vector into M shards and give each an owner.

Promises:
* Shards are contiguous element ranges of the flat vector, sizes differing by at most one
  element; every element lies in exactly one shard.
* The owner of shard j is chosen by rendezvous (highest-random-weight) hashing over the
  agreed membership: score(j, p) = blake2b-64(run, j, peer-ID bytes), owner = the highest.
  Every node computes the same plan from the same (run, M, members); when a member leaves,
  only the shards it owned move, and they spread over the others.
* Each shard is further cut into pieces of at most `piece_elems` elements: the unit of one
  request on the wire and of one step of the reduction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from fflnode.errors import MergeError

# Ownership hashing key: changing it moves every shard, so it is versioned.
RENDEZVOUS_SALT = b"fflnode/rendezvous/1"


@dataclass(frozen=True)
class Shard:
    index: int
    lo: int  # first flat element
    hi: int  # one past the last
    owner: bytes  # peer-ID bytes

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    def pieces(self, piece_elems: int) -> list[tuple[int, int]]:
        """[lo, hi) ranges of at most piece_elems elements covering the shard, in order."""
        return [(a, min(a + piece_elems, self.hi)) for a in range(self.lo, self.hi, piece_elems)]


def score(run: str, shard: int, peer: bytes) -> int:
    h = hashlib.blake2b(digest_size=8, key=RENDEZVOUS_SALT)
    h.update(run.encode("utf-8"))
    h.update(b"\x00")
    h.update(shard.to_bytes(4, "big"))
    h.update(peer)
    return int.from_bytes(h.digest(), "big")


def owner_of(run: str, shard: int, members: Sequence[bytes]) -> bytes:
    if not members:
        raise MergeError("no members to own shards")
    return max(members, key=lambda p: (score(run, shard, p), p))


def shard_ranges(numel: int, m: int) -> list[tuple[int, int]]:
    """M contiguous ranges covering [0, numel), sizes differing by at most one."""
    if m < 1:
        raise MergeError(f"cannot cut into {m} shards")
    base, extra = divmod(numel, m)
    ranges, lo = [], 0
    for j in range(m):
        hi = lo + base + (1 if j < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges


def plan(run: str, numel: int, m: int, members: Sequence[bytes]) -> list[Shard]:
    """The merge plan every member computes identically."""
    if len(set(members)) != len(members):
        raise MergeError("membership lists a peer twice")
    return [
        Shard(j, lo, hi, owner_of(run, j, members))
        for j, (lo, hi) in enumerate(shard_ranges(numel, m))
    ]


def canonical_members(members: Sequence[bytes]) -> list[bytes]:
    """Members in canonical reduction order: ascending peer-ID bytes."""
    return sorted(members)
