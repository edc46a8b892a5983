"""A node catches up to the round a majority of the run's live members reached, never
to a round one peer claims.

Found by tools/fuzz_daemon.py (mode "insider"): one heartbeat from the run's third
member claiming round 2**31 - 1 made both honest daemons "catch up" past their last
round after 12 of 300 rounds; they merged and exited 0 as if the run had completed. A
peer admitted in an open run but outside the start set could do the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from fflnode.rounds import BEHIND_BY, RoundRunner

LIE = (1 << 31) - 1


def peer_id(n: int) -> ID:
    return ID.from_pubkey(create_new_key_pair(bytes([n]) * 32).public_key)


@dataclass
class View:
    round: int


class Peers:
    """What RoundRunner reads of Membership: the peer book and who is alive."""

    def __init__(self, rounds: dict[ID, int], dead: set[ID] = frozenset()) -> None:
        self.peers = {p: View(r) for p, r in rounds.items()}
        self.dead = dead

    def is_alive(self, peer: ID) -> bool:
        return peer not in self.dead


ME, A, B, C, X = (peer_id(i) for i in range(1, 6))


def runner(peers: Peers, members: list[ID]) -> RoundRunner:
    return RoundRunner(
        trainer=None, exchange=SimpleNamespace(first_round=0), membership=peers,
        notifier=None, data_dir=None, run_id="run", members=members, rounds=1000,
        eval_every=10, checkpoint_every=10, records=[],
    )  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize(
    "rounds, members, expected",
    [
        ({A: 5, X: LIE}, [ME, A, X], 5),  # one liar among two live members
        ({A: 5, B: 5, X: LIE}, [ME, A, B, X], 5),
        ({A: 5, X: LIE}, [ME, A], 5),  # an admitted peer outside the run's members
        ({A: 40}, [ME, A], 40),  # left behind in a 2-node run (a restart)
        ({A: 40, B: 40, X: 5}, [ME, A, B, X], 40),  # a majority is ahead
        ({A: 40, B: 41, C: 42}, [ME, A, B, C], 41),
        ({A: 5 + BEHIND_BY - 1}, [ME, A], 5),  # one round ahead is in step
    ],
)
def test_catch_up_goes_to_the_round_a_majority_of_live_members_reached(rounds, members, expected):
    r = runner(Peers(rounds), members)
    assert r._caught_up(5) == expected
    assert r.exchange.first_round == (expected if expected != 5 else 0)


def test_dead_members_do_not_count():
    r = runner(Peers({A: 40, X: 5}, dead={X}), [ME, A, X])
    assert r._caught_up(5) == 40
