"""Prism writes over every backend: exact bytes at odd offsets, edges, errors, cancellation.

Every test runs against the io_uring, threads and buffered backends, on a real
filesystem (O_DIRECT alignment is not exercised on tmpfs). When io_uring cannot be used
here the io_uring cases print why and skip, or fail when FFLNODE_EXPECT_IO_URING=1.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fflnode.errors import PrismError
from fflnode.prism import write_stream as write_stream_module
from fflnode.prism.backends import ENV_BACKEND, probe_io_uring
from fflnode.prism.fs import filesystem_type
from fflnode.prism.stream import PrismStream
from fflnode.prism.write_stream import WriteStream

MiB = 1 << 20
BACKENDS = ["io_uring", "threads", "buffered"]
CHILD_TIMEOUT_S = 60


def require_io_uring() -> None:
    ok, why = probe_io_uring()
    if not ok:
        print(f"io_uring backend cannot be used here: {why}")
        if os.environ.get("FFLNODE_EXPECT_IO_URING") == "1":
            pytest.fail(f"FFLNODE_EXPECT_IO_URING=1 but io_uring is unusable: {why}")
        pytest.skip(f"io_uring unusable: {why}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    if request.param == "io_uring":
        require_io_uring()
    return request.param


@pytest.fixture
def real_dir(tmp_path: Path) -> Path:
    if filesystem_type(tmp_path) == "tmpfs":
        pytest.skip(f"{tmp_path} is tmpfs: O_DIRECT alignment is not exercised there")
    return tmp_path


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


async def read_back_direct(path: Path, backend: str) -> bytes:
    """The file as Prism's O_DIRECT reader of the same backend sees it."""
    with PrismStream(path, backend=backend, cache="direct") as stream:
        out = bytearray(stream.size)
        await stream.read_into(0, stream.size, out)
        return bytes(out)


def assert_all_slots_back(w: WriteStream) -> None:
    assert w.in_flight == 0 and w.engine.in_flight == 0
    assert w.pool.free == w.pool.nslots, w.stats()


async def test_writes_at_odd_offsets_and_sizes_read_back_equal(
    backend: str, real_dir: Path
) -> None:
    path = real_dir / "odd.bin"
    model = bytearray()
    rng = random.Random(5)
    edges = [0, 1, 511, 4095, 4096, 4097, MiB - 1, MiB, MiB + 3, 3 * MiB + 5]
    cases = [(a, n) for a in edges for n in (1, 7, 4096, 5000, MiB + 1, 2 * MiB - 4095)]
    cases += [(rng.randrange(4 * MiB), rng.randrange(1, 3 * MiB)) for _ in range(20)]
    async with WriteStream(path, backend=backend, depth=4) as w:
        for i, (offset, n) in enumerate(cases):
            data = random_bytes(n, i)
            await w.write(offset, data)
            model.extend(bytes(max(0, offset + n - len(model))))
            model[offset : offset + n] = data
        await w.flush()
        assert_all_slots_back(w)
        stats = w.stats()
        assert stats["backend"] == backend
        if backend != "buffered":
            assert stats["writes"]["direct"] > 0 and stats["writes"]["page_cache"] > 0
    assert path.read_bytes() == bytes(model)
    assert await read_back_direct(path, backend) == bytes(model)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_random_write_sequences_equal_a_bytearray_model(
    backend: str, real_dir: Path, data: st.DataObject
) -> None:
    depth = data.draw(st.integers(1, 8), label="depth")
    writes = data.draw(
        st.lists(st.tuples(st.integers(0, 3 * MiB), st.integers(0, 2 * MiB)), max_size=8),
        label="writes",
    )
    path = real_dir / "model.bin"
    path.unlink(missing_ok=True)

    async def main() -> bytes:
        model = bytearray()
        async with WriteStream(path, backend=backend, depth=depth) as w:
            for i, (offset, n) in enumerate(writes):
                chunk = random_bytes(n, i)
                await w.write(offset, chunk)  # no flush: overlapping writes stay ordered
                if n:  # as with pwrite, writing nothing does not extend the file
                    model.extend(bytes(max(0, offset + n - len(model))))
                    model[offset : offset + n] = chunk
            await w.flush()
            assert_all_slots_back(w)
        return bytes(model)

    model = trio.run(main)
    assert path.read_bytes() == model


async def test_neighbours_of_a_written_range_are_untouched(backend: str, real_dir: Path) -> None:
    path = real_dir / "neighbours.bin"
    before = random_bytes(4 * MiB, 1)
    path.write_bytes(before)
    start, data = 4096 * 3 + 17, random_bytes(MiB + 4000, 2)
    async with WriteStream(path, backend=backend) as w:
        await w.write(start, data)
    after = path.read_bytes()
    assert after[:start] == before[:start]
    assert after[start : start + len(data)] == data
    assert after[start + len(data) :] == before[start + len(data) :]


async def test_writes_end_the_file_exactly_at_the_last_byte(backend: str, real_dir: Path) -> None:
    # The final partial block goes through the page cache: no padding, no ftruncate.
    path = real_dir / "tail.bin"
    data = random_bytes(3 * MiB + 123, 3)
    async with WriteStream(path, backend=backend) as w:
        await w.write(0, data)
        await w.sync()
    assert path.stat().st_size == len(data)
    assert path.read_bytes() == data


async def test_pad_sends_the_tail_o_direct_zero_filled(backend: str, real_dir: Path) -> None:
    path = real_dir / "padded.bin"
    path.write_bytes(b"\xff" * (2 * MiB))
    data = random_bytes(MiB + 10, 4)
    async with WriteStream(path, backend=backend) as w:
        await w.write(4096, data, pad=True)
        counts = w.stats()["writes"]
    content = path.read_bytes()
    assert content[4096 : 4096 + len(data)] == data
    if backend != "buffered":
        assert counts["page_cache"] == 0
        end = 4096 + -(-len(data) // 4096) * 4096
        assert content[4096 + len(data) : end] == bytes(end - 4096 - len(data))
        assert content[end:] == b"\xff" * (2 * MiB - end)


async def test_the_callers_buffer_is_free_once_write_returns(backend: str, real_dir: Path) -> None:
    path = real_dir / "reuse.bin"
    buf = np.frombuffer(bytearray(random_bytes(3 * MiB, 6)), dtype=np.uint8)
    expected = buf.tobytes()
    async with WriteStream(path, backend=backend, depth=8) as w:
        await w.write(0, buf)
        buf[:] = 0  # the writes may still be in flight: they hold copies in the pool
    assert path.read_bytes() == expected


async def test_tensors_are_written_as_their_raw_bytes(backend: str, real_dir: Path) -> None:
    path = real_dir / "tensor.bin"
    t = torch.randn(1000, 777)
    async with WriteStream(path, backend=backend) as w:
        await w.write(12, t)
        with pytest.raises(ValueError, match="contiguous"):
            await w.write(0, t.t())
    got = np.frombuffer(path.read_bytes()[12:], dtype=np.float32).reshape(1000, 777)
    assert np.array_equal(got, t.numpy())


async def test_sync_runs_through_the_engine(backend: str, real_dir: Path) -> None:
    path = real_dir / "synced.bin"
    async with WriteStream(path, backend=backend) as w:
        await w.write(0, b"x" * 5000)
        await w.sync()
        await w.sync(data_only=False)
        assert w.stats()["writes"]["syncs"] == 2
        assert w.stats()["engine"]["fsyncs"] == 2


async def test_a_cancelled_write_leaves_the_stream_usable(backend: str, real_dir: Path) -> None:
    path = real_dir / "cancelled.bin"
    data = random_bytes(16 * MiB, 7)
    async with WriteStream(path, backend=backend, depth=4) as w:
        seen_full = False

        async def cancel_when_the_queue_is_full(scope: trio.CancelScope) -> None:
            nonlocal seen_full
            while w.in_flight < w.depth:
                await trio.sleep(0)
            seen_full = True
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_the_queue_is_full, nursery.cancel_scope)
            await w.write(0, data)
            pytest.fail("the write should have been cancelled")
        assert seen_full
        await w.flush()
        assert_all_slots_back(w)
        await w.write(0, data)
    assert path.read_bytes() == data


async def test_a_closed_stream_refuses_writes(backend: str, real_dir: Path) -> None:
    w = WriteStream(real_dir / "closed.bin", backend=backend)
    await w.aclose()
    with pytest.raises(PrismError, match="closed") as info:
        await w.write(0, b"x")
    assert info.value.errno == errno.EBADF


async def test_io_uring_writes_go_through_the_ring_without_threads(
    monkeypatch: pytest.MonkeyPatch, real_dir: Path
) -> None:
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    require_io_uring()
    path = real_dir / "ring.bin"
    data = random_bytes(9 * MiB + 5, 8)
    before = threading.active_count()
    async with WriteStream(path) as w:  # "auto"
        assert w.backend == "io_uring", w.reason
        await w.write(0, data)
        assert threading.active_count() == before
        await w.sync()
        engine = w.stats()["engine"]
        assert engine["engine"] == "io_uring" and engine["writable"]
        assert engine["buffers_registered"] and engine["writes"] >= 9
        assert engine["fsyncs"] == 1 and engine["failed"] == 0
    assert path.read_bytes() == data


def test_the_backend_env_var_chooses_the_writer_backend(
    monkeypatch: pytest.MonkeyPatch, real_dir: Path
) -> None:
    monkeypatch.setenv(ENV_BACKEND, "threads")
    with WriteStream(real_dir / "env.bin", backend="io_uring") as w:
        assert w.backend == "threads" and ENV_BACKEND in w.reason


async def test_o_direct_refused_falls_back_to_buffered(
    backend: str, real_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refusing_open(file: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs said before 6.6
        return real_open(file, flags, *args)

    monkeypatch.setattr(write_stream_module.os, "open", refusing_open)
    path = real_dir / "refused.bin"
    data = random_bytes(2 * MiB + 3, 9)
    async with WriteStream(path, backend=backend) as w:
        assert w.backend == "buffered"
        assert "EINVAL" in w.reason or backend == "buffered"
        await w.write(1, data)
    assert path.read_bytes()[1:] == data


FSIZE_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    import trio
    from fflnode.errors import PrismError
    from fflnode.prism.write_stream import WriteStream

    path, backend, limit, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    async def main():
        report = {}
        w = WriteStream(path, backend=backend, depth=1)  # in order: the cut write fails next
        try:
            await w.write(0, bytes(range(256)) * (size // 256))
            await w.flush()
        except PrismError as e:
            report["error"] = [e.errno, e.filename, str(e)]
        try:
            await w.write(0, b"again")
        except PrismError as e:
            report["sticky"] = e.errno
        await w.aclose()  # already raised: closing does not raise it again
        report["stats"] = w.stats()
        return report

    print(json.dumps(trio.run(main)))
    """
)


def test_a_write_error_is_a_prism_error_naming_file_and_operation(
    backend: str, real_dir: Path
) -> None:
    # RLIMIT_FSIZE cuts the write that crosses it short, then refuses the rest with
    # EFBIG: the shape of a disk filling up mid-request, with no privilege needed.
    path = real_dir / "limited.bin"
    limit, size = 2 * MiB + 3 * 4096, 4 * MiB
    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_CHILD, str(path), backend, str(limit), str(size)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    err, filename, message = report["error"]
    assert err == errno.EFBIG and filename == str(path)
    assert f"{backend} write of {MiB - 3 * 4096} bytes at offset {limit}" in message, message
    assert "File too large" in message
    assert f"the rest of a short write: {3 * 4096} of the {MiB} bytes" in message, message
    assert report["sticky"] == errno.EFBIG
    assert report["stats"]["writes"]["short"] >= 1, "the write cut at the limit was continued"
    assert report["stats"]["free_slots"] == report["stats"]["slots"]
    assert path.read_bytes() == (bytes(range(256)) * (size // 256))[:limit]


@pytest.fixture(scope="module")
def full_filesystem(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A freshly made 8 MiB ext4 filesystem on a loop device (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny loop filesystem for ENOSPC needs root")
    if shutil.which("mkfs.ext4") is None or shutil.which("mount") is None:
        pytest.skip("mkfs.ext4 or mount missing: cannot make a tiny filesystem for ENOSPC")
    base = tmp_path_factory.mktemp("enospc")
    image, mount_point = base / "fs.img", base / "mnt"
    mount_point.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    mounted = made.returncode == 0 and (
        subprocess.run(
            ["mount", "-o", "loop", str(image), str(mount_point)], capture_output=True, text=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("this machine cannot mount a loop filesystem (no loop devices?)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
        image.unlink()


async def test_a_full_disk_is_a_prism_error_naming_file_and_operation(
    backend: str, full_filesystem: Path
) -> None:
    path = full_filesystem / f"fill-{backend}.bin"
    try:
        with pytest.raises(PrismError) as info:
            async with WriteStream(path, backend=backend) as w:
                await w.write(0, random_bytes(16 * MiB, 10))
                await w.sync()
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == str(path)
        assert "write" in str(info.value) or "sync" in str(info.value)
        assert w.pool.free == w.pool.nslots
    finally:
        path.unlink(missing_ok=True)


def test_importing_the_write_path_never_imports_torch() -> None:
    code = (
        "import sys, fflnode.prism.write_stream, fflnode.prism.blockfile; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_device_tensor_source_copies_exact_slices() -> None:
    # TorchSource is what a CUDA tensor goes through; on a CPU tensor it runs the same code
    # (the CUDA round trip itself is in test_prism_blockfile.py, skipped without a GPU).
    from fflnode.prism.device import TorchSource

    t = torch.arange(1000, dtype=torch.float32)
    source = TorchSource(t)
    assert source.nbytes == 4000
    dst = bytearray(1000)
    source.copy_into(memoryview(dst)[100:900], 404)
    assert bytes(dst[100:900]) == t.numpy().tobytes()[404:1204]
    assert bytes(dst[:100]) == bytes(100) and bytes(dst[900:]) == bytes(100)
    with pytest.raises(ValueError, match="contiguous"):
        TorchSource(t.reshape(10, 100).t())
