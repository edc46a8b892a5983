"""Topologies: regular, symmetric, deterministic from the seed."""

from __future__ import annotations

import pytest

from fflnode.errors import ConfigError
from fflnode.train.topology import neighbours

MEMBERS = [bytes([i]) * 4 for i in range(8)]


def graph(kind: str, r: int, degree: int = 2, members=MEMBERS, seed: int = 3):
    return {m: neighbours(kind, members, m, r, seed, degree) for m in members}


@pytest.mark.parametrize(
    "kind, degree", [("ring", 2), ("random-regular", 3), ("random-regular", 4), ("complete", 7)]
)
def test_graphs_are_regular_and_symmetric(kind: str, degree: int):
    for r in range(5):
        g = graph(kind, r, degree)
        assert all(len(v) == degree for v in g.values())
        assert all(a in g[b] for a in g for b in g[a])
        assert all(a not in g[a] for a in g)


def test_random_regular_is_deterministic_and_varies_with_round():
    assert graph("random-regular", 1, 4) == graph("random-regular", 1, 4)
    assert len({tuple(map(tuple, graph("random-regular", r, 2).values())) for r in range(6)}) > 1


def test_impossible_degrees_are_config_errors():
    with pytest.raises(ConfigError):
        neighbours("random-regular", MEMBERS[:5], MEMBERS[0], 0, 1, 3)  # odd degree, odd n
    with pytest.raises(ConfigError):
        neighbours("random-regular", MEMBERS[:3], MEMBERS[0], 0, 1, 3)
