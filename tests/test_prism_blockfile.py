"""The out-of-core block file: 4 KiB-aligned float32 regions, exact round trips on every
backend, overlap of a read with a write, no page cache, and what kill -9 leaves.

Runs on a real filesystem (not tmpfs). io_uring cases skip with the reason printed, or
fail when FFLNODE_EXPECT_IO_URING=1.
"""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import trio
from test_prism_write_stream import backend, full_filesystem, real_dir, require_io_uring

from fflnode.errors import FormatError, PrismError
from fflnode.prism.backends import ENV_BACKEND
from fflnode.prism.blockfile import BLOCK_ALIGN, BlockFile, BlockLayout
from fflnode.prism.fs import resident_bytes

__all__ = ["backend", "full_filesystem", "real_dir"]  # fixtures shared with the writer tests

MiB = 1 << 20
ODD_REGIONS = {
    "block0.w": (1023, 3),
    "block0.m": 1,
    "block0.v": 262145,
    "empty": (0,),
    "act": (7, 333, 5),
}
CHILD_TIMEOUT_S = 60


def test_regions_start_and_end_on_4k_boundaries_in_order() -> None:
    layout = BlockLayout(ODD_REGIONS)
    pos = 0
    for name, spec in ODD_REGIONS.items():
        region = layout[name]
        assert region.offset == pos and region.offset % BLOCK_ALIGN == 0
        assert region.numel == int(np.prod(spec))
        assert region.span % BLOCK_ALIGN == 0 and 0 <= region.span - region.nbytes < BLOCK_ALIGN
        pos += region.span
    assert layout.size == pos
    with pytest.raises(ValueError, match="non-negative"):
        BlockLayout({"bad": (3, -1)})


async def test_the_file_is_preallocated_and_rebuilt_at_create(real_dir: Path) -> None:
    path = real_dir / "blocks.bin"
    path.write_bytes(b"stale state from a previous run" * 1000)
    async with BlockFile(path, {"a": 3 * MiB // 4, "b": 5}) as bf:
        assert path.stat().st_size == bf.layout.size == 3 * MiB + BLOCK_ALIGN
        assert path.stat().st_blocks * 512 >= bf.layout.size, "blocks are allocated, not sparse"
        out = np.ones(5, dtype=np.float32)
        await bf.read_into("b", out)
        assert not out.any(), "a fresh region reads as zeros"


async def test_write_then_read_every_region_equals(backend: str, real_dir: Path) -> None:
    async with BlockFile(real_dir / "odd.bin", ODD_REGIONS, backend=backend, depth=4) as bf:
        values = {name: torch.randn(r.shape) for name, r in bf.layout.regions.items()}
        async with trio.open_nursery() as nursery:  # every region at once
            for name, t in values.items():
                nursery.start_soon(bf.write_from, name, t)
        await bf.sync()
        for name, t in values.items():
            as_tensor = torch.full_like(t, float("nan"))
            await bf.read_into(name, as_tensor)
            assert torch.equal(as_tensor, t), name
            as_array = np.empty(t.numel(), dtype=np.float32)
            await bf.read_into(name, as_array)
            assert np.array_equal(as_array, t.reshape(-1).numpy()), name
        stats = bf.stats()
        assert stats["read"]["backend"] == backend and stats["write"]["backend"] == backend
        if backend != "buffered":
            assert stats["write"]["writes"]["page_cache"] == 0, "padded regions are O_DIRECT"
        assert stats["read"]["free_slots"] == stats["read"]["slots"]
        assert stats["write"]["free_slots"] == stats["write"]["slots"]


async def test_rewriting_a_region_leaves_its_neighbours_alone(backend: str, real_dir: Path) -> None:
    regions = {"a": 1001, "b": 1001, "c": 1001}
    async with BlockFile(real_dir / "rewrite.bin", regions, backend=backend) as bf:
        for i, name in enumerate(regions):
            await bf.write_from(name, np.full(1001, i, dtype=np.float32))
        await bf.write_from("b", np.full(1001, 7, dtype=np.float32))
        for name, value in (("a", 0), ("b", 7), ("c", 2)):
            out = np.empty(1001, dtype=np.float32)
            await bf.read_into(name, out)
            assert (out == value).all(), name


async def test_reading_the_next_block_overlaps_writing_back_the_previous(
    backend: str, real_dir: Path
) -> None:
    n = 8 * MiB  # 32 MiB per block: long enough for both to be in flight together
    regions = {"k-1": n, "k+1": n}
    async with BlockFile(real_dir / "overlap.bin", regions, backend=backend, depth=4) as bf:
        ahead = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
        await bf.write_from("k+1", ahead)
        behind = np.random.default_rng(1).standard_normal(n, dtype=np.float32)
        prefetched = np.empty(n, dtype=np.float32)
        both_in_flight = False

        async def watch(scope: trio.CancelScope) -> None:
            nonlocal both_in_flight
            while True:
                reading = bf.stats()["read"]["engine"]["in_flight"] > 0
                both_in_flight |= reading and bf.stats()["write"]["engine"]["in_flight"] > 0
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            async with trio.open_nursery() as io:
                io.start_soon(bf.write_from, "k-1", behind)
                io.start_soon(bf.read_into, "k+1", prefetched)
            nursery.cancel_scope.cancel()
        assert both_in_flight, "the read and the write never overlapped"
        assert np.array_equal(prefetched, ahead)
        check = np.empty(n, dtype=np.float32)
        await bf.read_into("k-1", check)
        assert np.array_equal(check, behind)


async def test_wrong_dtype_or_size_is_refused_before_any_io(real_dir: Path) -> None:
    async with BlockFile(real_dir / "checks.bin", {"w": (4, 5)}) as bf:
        with pytest.raises(ValueError, match="float32"):
            await bf.write_from("w", torch.zeros(4, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match="20 elements"):
            await bf.read_into("w", np.empty(21, dtype=np.float32))
        with pytest.raises(FormatError, match="no region 'x'") as info:
            await bf.read_into("x", np.empty(20, dtype=np.float32))
        assert str(bf.path) in str(info.value)
        assert bf.stats()["write"]["engine"]["submitted"] == 0


@pytest.mark.parametrize("which", ["io_uring", "threads"])
async def test_block_io_never_fills_the_page_cache(
    which: str, real_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    if which == "io_uring":
        require_io_uring()
    n = 16 * MiB  # 64 MiB per region, 256 MiB in all
    regions = {f"block{i}": n for i in range(4)}
    source = np.random.default_rng(2).standard_normal(n, dtype=np.float32)
    out = np.empty(n, dtype=np.float32)
    async with BlockFile(real_dir / "cold.bin", regions, backend=which) as bf:
        for name in regions:
            await bf.write_from(name, source)
        await bf.sync()
        for name in regions:
            await bf.read_into(name, out)
        resident = resident_bytes(bf.path)
    print(f"{which}: {resident} of {bf.layout.size} bytes resident in the page cache")
    assert resident < MiB, f"{resident} bytes of the block file are in the page cache"
    assert np.array_equal(out, source)


async def test_the_buffered_control_does_fill_the_page_cache(
    real_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The measurement above would pass vacuously if mincore saw nothing: here it must.
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    n = 8 * MiB
    async with BlockFile(real_dir / "warm.bin", {"a": n}, backend="buffered") as bf:
        await bf.write_from("a", np.ones(n, dtype=np.float32))
        resident = resident_bytes(bf.path)
    assert resident >= bf.layout.size // 2


async def test_a_full_disk_at_create_is_a_prism_error(full_filesystem: Path) -> None:
    path = full_filesystem / "too-big.bin"
    try:
        with pytest.raises(PrismError) as info:
            BlockFile(path, {"w": 16 * MiB // 4})
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
        assert "preallocate" in str(info.value)
        assert path.stat().st_size == 0, "a refused preallocation keeps no blocks"
    finally:
        path.unlink(missing_ok=True)


KILL_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import trio
    from fflnode.prism.blockfile import BlockFile

    path, backend, n, stop_after = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    async def main():
        bf = BlockFile(path, {"kept": n, "torn": n, "after": n}, backend=backend, depth=4)
        for name, value in (("kept", 1.0), ("torn", 2.0), ("after", 3.0)):
            await bf.write_from(name, np.full(n, value, dtype=np.float32))
        await bf.sync()
        engine = bf._writer.engine
        submit, submitted = engine.submit_write, 0

        def gated(*args):  # stop the writer for good after `stop_after` requests
            nonlocal submitted
            submit(*args)
            submitted += 1
            if submitted == stop_after:
                print("mid-write", flush=True)
                time.sleep(600)

        engine.submit_write = gated
        await bf.write_from("torn", np.full(n, 5.0, dtype=np.float32))

    trio.run(main)
    """
)


def test_kill_9_mid_write_tears_only_the_region_being_written(backend: str, real_dir: Path) -> None:
    # The child rewrites "torn" (16 MiB: 16 requests of 1 MiB, depth 4) and is killed once
    # it has submitted 6 of them: two of the first four had completed (the 5th and 6th
    # each needed a free slot; completions come in any order), the others of the first
    # six were in flight, and requests 7-16 never left the process.
    n, stop_after = 4 * MiB, 6
    path = real_dir / "killed.bin"
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(path), backend, str(n), str(stop_after)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "mid-write"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=CHILD_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    layout = BlockLayout({"kept": n, "torn": n, "after": n})
    assert path.stat().st_size == layout.size
    data = np.fromfile(path, dtype=np.float32)
    region = {name: data[r.offset // 4 : r.offset // 4 + n] for name, r in layout.regions.items()}
    assert (region["kept"] == 1.0).all() and (region["after"] == 3.0).all(), "others intact"
    torn, per_mib = region["torn"], MiB // 4
    requests_new = (torn.reshape(-1, per_mib) == 5.0).all(axis=1)
    assert requests_new[:4].sum() >= 2, "requests that completed hold the new value"
    assert (torn[stop_after * per_mib :] == 2.0).all(), "unsubmitted requests hold the old"
    sectors = torn.reshape(-1, 512 // 4)
    assert ((sectors == 2.0).all(axis=1) | (sectors == 5.0).all(axis=1)).all(), (
        "every sector is wholly old or wholly new"
    )
    new = int((sectors[:, 0] == 5.0).sum()) * 512
    print(f"{backend}: after kill -9 mid-write, {new / MiB:.2f} MiB of 16 hold the new value")


@pytest.fixture
def cuda() -> None:
    if not torch.cuda.is_available():
        reason = "CUDA is not available on this machine: the pinned-pool GPU path is not exercised"
        print(reason)
        pytest.skip(reason)


async def test_cuda_tensors_round_trip_through_pinned_pools(cuda: None, real_dir: Path) -> None:
    async with BlockFile(real_dir / "gpu.bin", ODD_REGIONS) as bf:
        values = {n: torch.randn(r.shape, device="cuda") for n, r in bf.layout.regions.items()}
        for name, t in values.items():
            await bf.write_from(name, t)
        for name, t in values.items():
            out = torch.empty_like(t)
            await bf.read_into(name, out)
            torch.cuda.synchronize()
            assert torch.equal(out, t), name
        assert bf.stats()["write"]["engine"]["failed"] == 0
        assert bf._writer.pool.cuda_pinned and bf._reader.pool.cuda_pinned
