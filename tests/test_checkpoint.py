"""Checkpoints: round trip, strict loading, and kill -9 during writes never tears one."""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fflnode import checkpoint
from fflnode.errors import FormatError

RUN = "ckpt-run"
NUMEL = 1 << 20  # 4 MiB of weights (+ 8 MiB of moments): a write takes a few ms
KILLS = 6  # writer processes killed mid-write, one after the other (each imports torch)
CHILD_READY_TIMEOUT_S = 60.0  # the child imports torch before its first write
# Where in a write the kill lands: uniformly within this many seconds after the child
# announced the write (a 12 MiB write with three fsyncs takes ~5-50 ms here).
KILL_WINDOW_S = 0.05


def make(round_: int, numel: int = NUMEL) -> checkpoint.Checkpoint:
    g = torch.Generator().manual_seed(round_)
    return checkpoint.Checkpoint(
        RUN,
        round_,
        ["peer-a", "peer-b"],
        round_ + 1,
        torch.randn(numel, generator=g),
        {"m": torch.randn(numel, generator=g), "v": torch.rand(numel, generator=g)},
        {"residual": torch.randn(numel, generator=g)},
        torch.Generator().manual_seed(7).get_state(),
    )


def test_checkpoint_round_trips(tmp_path: Path):
    ckpt = make(3, 1000)
    checkpoint.save(tmp_path, ckpt)
    got = checkpoint.load(tmp_path, RUN, 1000)
    assert got is not None
    assert (got.round, got.outer_step, got.members) == (3, 4, ["peer-a", "peer-b"])
    assert torch.equal(got.weights, ckpt.weights)
    assert torch.equal(got.outer["m"], ckpt.outer["m"]) and torch.equal(
        got.outer["v"], ckpt.outer["v"]
    )
    assert torch.equal(got.exchange["residual"], ckpt.exchange["residual"])
    assert got.sampler is not None and torch.equal(got.sampler, ckpt.sampler)


def test_no_checkpoint_is_none(tmp_path: Path):
    assert checkpoint.load(tmp_path, RUN, 10) is None


def test_wrong_run_or_shape_is_refused(tmp_path: Path):
    checkpoint.save(tmp_path, make(1, 100))
    with pytest.raises(FormatError, match="checkpoint of run 'ckpt-run'"):
        checkpoint.load(tmp_path, "other-run", 100)
    with pytest.raises(FormatError, match="do not fit this model"):
        checkpoint.load(tmp_path, RUN, 101)
    checkpoint.path_in(tmp_path).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(FormatError):
        checkpoint.load(tmp_path, RUN, 100)


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from tests.test_checkpoint import make
    from fflnode import checkpoint
    data_dir, start = Path(sys.argv[1]), int(sys.argv[3])
    r = start
    while True:  # killed by the test; every write is announced just before it starts
        print(r, flush=True)
        checkpoint.save(data_dir, make(r))
        r += 1
    """
)


@pytest.mark.slow
def test_kill_during_checkpoint_writes_always_leaves_a_loadable_one(tmp_path: Path):
    """SIGKILL a writer at random points of its writes, again and again: the file on disk
    always loads, and holds one of the rounds that was being or had been written."""
    repo = str(Path(__file__).resolve().parents[1])
    rng = random.Random(1)
    checkpoint.save(tmp_path, make(0))
    next_round, on_disk = 1, 0
    for _ in range(KILLS):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), repo, str(next_round)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            first = int(child.stdout.readline())  # announced before its first write
            assert first == next_round
            # Let a few writes complete sometimes, kill during the first one other times.
            seen = [first]
            for _ in range(rng.randrange(3)):
                seen.append(int(child.stdout.readline()))
            with contextlib.suppress(subprocess.TimeoutExpired):  # it never exits by itself
                child.wait(timeout=rng.uniform(0, KILL_WINDOW_S))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=CHILD_READY_TIMEOUT_S)
        announced = [*seen, *(int(x) for x in child.stdout.read().split())]
        got = checkpoint.load(tmp_path, RUN, NUMEL)  # also deletes the killed temporaries
        assert got is not None
        assert got.round == on_disk or got.round in announced  # old or new, never other
        on_disk = got.round
        want = make(got.round)
        assert torch.equal(got.weights, want.weights), "torn or mixed checkpoint"
        assert torch.equal(got.outer["v"], want.outer["v"])
        assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT_FILE]
        next_round = max(announced) + 1
