"""Who mixes with whom, drawn from the run seed: sans-IO, deterministic.

Every node computes the whole graph from (seed, round, members) and reads off its own
neighbours, so all nodes agree without a message. The gossip exchange uses round 0's
graph for the whole run (its public copies need a fixed neighbour set, see
fflnode.exchange); `round` lets a time-varying scheme draw a fresh graph per round.
Graphs are undirected and regular:
* ring: the members in canonical order, each linked to its two ring neighbours; fixed.
* random-regular: each round, a seeded permutation of the members laid on a circle and
  each linked to the `degree // 2` nearest on either side (plus the opposite member when
  `degree` is odd and the count even): a `degree`-regular circulant over a fresh random
  order every round. Not uniform over all regular graphs, but exactly regular,
  connected, and time-varying, which is what gossip mixing needs.
* complete: everyone.
Mixing weights are uniform over self and neighbours (Metropolis-Hastings weights of a
regular graph), renormalised over the contributions that actually arrived.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fflnode.errors import ConfigError

TOPOLOGY_SALT = 0x70_70  # separates topology draws from other uses of the run seed


def neighbours(
    kind: str, members: Sequence[bytes], me: bytes, round: int, seed: int, degree: int = 2
) -> list[bytes]:
    """My neighbours in round `round`, in canonical order."""
    ordered = sorted(members)
    n = len(ordered)
    if me not in ordered:
        raise ConfigError("this node is not among the run's members")
    if n == 1:
        return []
    if kind == "complete":
        return [p for p in ordered if p != me]
    if kind == "ring":
        circle = ordered
        half, opposite = 1, False
    elif kind == "random-regular":
        if not 1 <= degree < n:
            raise ConfigError(f"random-regular degree {degree} needs 1 <= degree < {n} members")
        if degree % 2 and n % 2:
            raise ConfigError(f"odd degree {degree} needs an even member count, have {n}")
        rng = np.random.Generator(np.random.PCG64([seed, TOPOLOGY_SALT, round]))
        circle = [ordered[i] for i in rng.permutation(n)]
        half, opposite = degree // 2, bool(degree % 2)
    else:
        raise ConfigError(f"unknown topology {kind!r}")
    pos = circle.index(me)
    linked = {circle[(pos + k) % n] for k in range(1, half + 1)}
    linked |= {circle[(pos - k) % n] for k in range(1, half + 1)}
    if opposite:
        linked.add(circle[(pos + n // 2) % n])
    linked.discard(me)
    return sorted(linked)
