"""Atomic checkpoint writes survive kill -9: the real name is the old file or the new one.

A child process writes a checkpoint with AtomicSafetensorsWriter, reporting each tensor
it has written on stdout. The parent reads those reports and SIGKILLs the child at a
chosen point (gated: the child waits for the parent's go-ahead before each next tensor,
so "mid-write" is a fact, not a race), then checks what is on disk under the real name.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import trio

from fflnode.prism.store import TensorStore
from fflnode.prism.writer import TMP_PREFIX, remove_stale_temporaries, save_tensors

TENSORS = 8
ELEMENTS = 1 << 18  # 1 MiB per tensor
CHILD_TIMEOUT_S = 60

WRITER_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from fflnode.prism.writer import AtomicSafetensorsWriter
    path, gated, value = sys.argv[1], sys.argv[2] == "gated", float(sys.argv[3])
    tensors, elements = int(sys.argv[4]), int(sys.argv[5])
    specs = {f"t{i}": ("F32", (elements,)) for i in range(tensors)}
    with AtomicSafetensorsWriter(path, specs) as writer:
        for i in range(tensors):
            writer.write_tensor(f"t{i}", np.full(elements, value + i, dtype=np.float32))
            print(f"wrote {i}", flush=True)
            if gated:
                sys.stdin.readline()
        writer.commit()
    print("committed", flush=True)
    """
)


def start_writer(path: Path, gated: bool, value: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER_CHILD,
            str(path),
            "gated" if gated else "free",
            str(value),
            str(TENSORS),
            str(ELEMENTS),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def kill_after(proc: subprocess.Popen[str], lines: int, gated: bool) -> list[str]:
    """Read `lines` progress reports (bounded by the child's own output), then SIGKILL."""
    assert proc.stdout is not None and proc.stdin is not None
    seen = []
    for _ in range(lines):
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.strip())
        if gated and len(seen) < lines:
            proc.stdin.write("go\n")
            proc.stdin.flush()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=CHILD_TIMEOUT_S)
    return seen


def contents(path: Path) -> list[float]:
    """The constant value of each tensor, read back through Prism (validates the file)."""

    async def read() -> list[float]:
        with TensorStore.open(path) as store:
            values = []
            for name in store.names():
                array = await store.read_tensor(name)
                assert np.all(array == array[0]), f"{name} is not one value: torn write"
                values.append(float(array[0]))
            return values

    return trio.run(read)


@pytest.mark.parametrize("killed_after", [1, 3, TENSORS])
def test_kill_9_mid_write_leaves_no_file_under_the_real_name(
    tmp_path: Path, killed_after: int
) -> None:
    path = tmp_path / "model.safetensors"
    proc = start_writer(path, gated=True, value=100.0)
    seen = kill_after(proc, killed_after, gated=True)
    assert seen[-1] == f"wrote {killed_after - 1}", "killed while writing, before commit"
    assert proc.returncode == -signal.SIGKILL
    assert not path.exists(), "a partial file appeared under the real name"
    stale = list(tmp_path.glob(f"{TMP_PREFIX}*"))
    assert len(stale) == 1, "the temporary is what a killed writer leaves behind"
    assert remove_stale_temporaries(tmp_path) == stale and not stale[0].exists()


def test_kill_9_mid_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_tensors(path, {f"t{i}": torch.full((ELEMENTS,), float(i)) for i in range(TENSORS)})
    before = path.read_bytes()
    proc = start_writer(path, gated=True, value=500.0)
    kill_after(proc, TENSORS // 2, gated=True)
    assert path.read_bytes() == before
    assert contents(path) == [float(i) for i in range(TENSORS)]


@pytest.mark.parametrize("killed_after", [0, 2, 5, TENSORS, TENSORS + 1])
def test_kill_9_at_any_point_leaves_the_old_file_or_the_complete_new_one(
    tmp_path: Path, killed_after: int
) -> None:
    path = tmp_path / "model.safetensors"
    save_tensors(path, {f"t{i}": torch.full((ELEMENTS,), float(i)) for i in range(TENSORS)})
    proc = start_writer(path, gated=False, value=1000.0)  # ungated: killed wherever it is
    seen = kill_after(proc, killed_after, gated=False)
    values = contents(path)
    old = [float(i) for i in range(TENSORS)]
    new = [1000.0 + i for i in range(TENSORS)]
    assert values in (old, new), values
    if "committed" in seen:
        assert values == new
