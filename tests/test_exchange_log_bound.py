"""A member whose contribution fails every round writes a bounded log, not a line a round.

Found by tools/fuzz_daemon.py (mode "insider"): a member answering each pull of its
Delta with a broken body made every daemon write "nothing from <peer>" once per round,
and a member whose Deltas start from another state "left out N out-of-sync peers" once
per round: 48 lines about one peer in a minute, at ~1 round a second, where fflnode
promises one line per peer per minute (fflnode.p2p.peerlog).
"""

from __future__ import annotations

import logging

import torch
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from fflnode import exchange
from fflnode.codecs import NoneCodec
from fflnode.errors import WireError
from fflnode.exchange import Averaging
from fflnode.p2p.bulk import Traffic
from fflnode.p2p.host import build_host

ROUNDS = 50  # consecutive rounds in which the hostile member's contribution fails
NUMEL = 64


def peer_id(n: int) -> ID:
    return ID.from_pubkey(create_new_key_pair(bytes([n]) * 32).public_key)


def lines_about(caplog, peer: ID) -> list[str]:
    tail = str(peer)[-6:]
    return [r.getMessage() for r in caplog.records if tail in r.getMessage()]


def averaging(traffic: Traffic, peers: list[ID]) -> Averaging:
    host = build_host(create_new_key_pair(bytes([50]) * 32))
    return Averaging(
        host, "run", 1, NoneCodec(), me=host.get_id(), peers=peers, chunk_elems=NUMEL,
        round_timeout_s=1.0, traffic=traffic,
    )  # fmt: skip


async def test_a_member_whose_pull_fails_every_round_costs_one_line_per_window(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    hostile = peer_id(1)
    ex = averaging(Traffic(), [hostile])

    async def broken_pull(host, peer, *args, **kwargs) -> None:
        raise WireError(str(peer), "hash", "body of delta chunk 0 fails its blake2b")

    monkeypatch.setattr(exchange.bulk, "pull", broken_pull)
    for r in range(ROUNDS):
        assert await ex.pull_delta(hostile, r, NUMEL) is None
    assert len(lines_about(caplog, hostile)) == 1, lines_about(caplog, hostile)
    assert ex.traffic.peer_log.suppressed == ROUNDS - 1


async def test_a_member_left_out_of_sync_every_round_costs_one_line_per_window(caplog):
    caplog.set_level(logging.INFO)
    honest, hostile = peer_id(2), peer_id(3)
    ex = averaging(Traffic(), [honest, hostile])
    for r in range(ROUNDS):
        delta = torch.ones(NUMEL)
        ex.publish(r, ex.encode(r, delta, 7))

        async def pull_delta(peer: ID, round: int, numel: int):
            return torch.ones(numel), (7 if peer == honest else 1000 + round)

        ex.pull_delta = pull_delta  # type: ignore[method-assign]
        mean, report = await ex.gather(r)
        assert report.excluded == [str(hostile)] and report.in_sync
        assert torch.equal(mean, torch.ones(NUMEL))
    assert len(lines_about(caplog, hostile)) == 1, lines_about(caplog, hostile)
    assert not any("out-of-sync peers" in r.getMessage() for r in caplog.records)
