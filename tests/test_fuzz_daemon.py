"""A bounded sample of the daemon fuzzer, in `make test` (issue: no outsider can take a
node down; the long run is tools/fuzz_daemon.py).

Two real `fflnode run` daemons train a digits run over real libp2p connections while
this process attacks them with SAMPLE_INPUTS structure-aware hostile inputs, generated
without fflnode's validators, on every protocol they speak (fflnode's shard, merge and
ping, GossipSub's /meshsub publishes of every announcement kind, identify and its push,
libp2p ping, multistream negotiation, raw TCP before and inside the Noise handshake, and
yamux frames inside the secure channel, and the bulk fast path: its offer protocol,
its TLS port and its libp2p fallback). The mode is "insider": the attacker is also
the run's third member, answering the daemons' pulls of its Delta with hostile holo
bodies. The oracle is the fuzzer's own (fflnode_harness.fuzz_daemon): both daemons stay
alive and keep completing rounds, exit 0 with equal merged hashes, stay under the RSS
bound, write a bounded log with no traceback; no input hangs past its handler's
documented deadline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from fflnode_harness import fuzz_daemon as fd

SEED = 0x0F022
SAMPLE_INPUTS = 3000
# Rounds of the sample's run: the fuzzing lasts while they run (the insider leaves
# fd.LEAVE_BEFORE_END_ROUNDS before the end), and they end the test: ~90 s here.
ROUNDS = 100
# Every family the attacker speaks must have been tried (the sample is a sample, not a
# rehearsal of one protocol).
PROTOCOLS = {
    fd.PROTO_SHARD,
    fd.PROTO_MERGE,
    fd.PROTO_FPING,
    fd.PROTO_ID,
    fd.PROTO_IDPUSH,
    fd.PROTO_LPING,
    fd.PROTO_MESH11,
    fd.PROTO_MESH10,
    fd.SERVED,
    "multistream",
    "tcp",
    "secure",
    fd.PROTO_FASTOFFER,
    fd.PROTO_FASTFALLBACK,
    fd.FASTTLS,
}


@pytest.mark.slow
def test_daemons_keep_training_and_merge_equal_under_hostile_inputs_on_every_protocol(
    tmp_path: Path,
):
    fd.quiet_attacker_logs()
    stats = fd.Stats()
    plan = fd.Plan("insider", "holo", ROUNDS, SEED, 0, tmp_path)
    verdict = trio.run(fd.run_session, plan, fd.Budget(SAMPLE_INPUTS), stats, lambda s: None)
    table = fd.summary(stats, [verdict], 0.0)
    assert verdict.ok, table
    assert stats.hang_count == 0, table
    assert not stats.violations, table
    assert stats.total >= SAMPLE_INPUTS // 2, table  # the run may end before the budget
    assert PROTOCOLS.issubset(p for p, _ in stats.tried), table
    assert min(verdict.rounds_during_fuzz) > 0, table
    assert verdict.insider_served > 0, table
    assert not stats.attacker_errors, stats.attacker_tracebacks
