"""The native ring (fflnode.prism._uring) through its own API: submit, eventfd, reap, cancel.

Skipped with the reason printed when io_uring is unusable here; failed instead when
FFLNODE_EXPECT_IO_URING=1 (CI), so a missing or broken native build cannot pass.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from fflnode.errors import PrismError
from fflnode.prism.backends import native_module, probe_io_uring
from fflnode.prism.pool import SlotPool

SLOT = 1 << 20
# Every completion of a 1 MiB read arrives within milliseconds; this bounds a broken ring.
POLL_TIMEOUT_MS = 5000
MAX_POLLS = 100


@pytest.fixture(scope="module")
def uring() -> ModuleType:
    ok, why = probe_io_uring()
    if not ok:
        print(f"io_uring cannot be used here: {why}")
        if os.environ.get("FFLNODE_EXPECT_IO_URING") == "1":
            pytest.fail(f"FFLNODE_EXPECT_IO_URING=1 but io_uring is unusable: {why}")
        pytest.skip(f"io_uring unusable: {why}")
    module, _ = native_module()
    assert module is not None
    return module


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("prism-native") / "data.bin"
    data = os.urandom(6 * SLOT + 100)
    path.write_bytes(data)
    return path, data


def reap_until(ring: object, count: int) -> list[tuple[int, int, int, int]]:
    """Wait on the eventfd and reap until `count` completions arrived (bounded)."""
    poller = select.poll()
    poller.register(ring.eventfd, select.POLLIN)
    got: list[tuple[int, int, int, int]] = []
    for _ in range(MAX_POLLS):
        if len(got) >= count:
            break
        got += ring.reap()
        if len(got) < count:
            assert poller.poll(POLL_TIMEOUT_MS), "no completion within the timeout"
    return got


def test_reads_complete_through_the_eventfd(
    uring: ModuleType, data_file: tuple[Path, bytes]
) -> None:
    path, data = data_file
    pool = SlotPool(4, SLOT)
    ring = uring.Ring(str(path), pool.buffer, SLOT)
    try:
        assert ring.fileno() == ring.eventfd
        stats = ring.stats()
        assert stats["buffers_registered"] and stats["files_registered"], stats
        for slot in range(4):
            ring.submit(slot, slot * SLOT, SLOT)
        assert ring.in_flight == 4
        done = reap_until(ring, 4)
        assert sorted(done) == [(s, s * SLOT, SLOT, SLOT) for s in range(4)]
        for slot in range(4):
            assert bytes(pool.view(slot)) == data[slot * SLOT : (slot + 1) * SLOT]
        assert ring.in_flight == 0 and ring.reap() == []
    finally:
        ring.close()


def test_a_read_past_eof_is_short_and_page_cache_reads_work(
    uring: ModuleType, data_file: tuple[Path, bytes]
) -> None:
    path, data = data_file
    pool = SlotPool(2, SLOT)
    ring = uring.Ring(str(path), pool.buffer, SLOT)
    try:
        ring.submit(0, 6 * SLOT, SLOT)  # 100 bytes before EOF
        ring.submit(1, 12345, 1000, cached=True)  # page cache reads need no alignment
        done = dict((slot, result) for slot, _, _, result in reap_until(ring, 2))
        assert done == {0: 100, 1: 1000}
        assert bytes(pool.view(0)[:100]) == data[6 * SLOT :]
        assert bytes(pool.view(1)[:1000]) == data[12345:13345]
    finally:
        ring.close()


def test_cancel_ends_every_read_in_flight(uring: ModuleType, data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    pool = SlotPool(6, SLOT)
    ring = uring.Ring(str(path), pool.buffer, SLOT)
    try:
        for slot in range(6):
            ring.submit(slot, slot * SLOT, SLOT)
        ring.cancel()
        done = reap_until(ring, 6)
        assert sorted(slot for slot, *_ in done) == list(range(6))
        assert all(result in (SLOT, -errno.ECANCELED, -errno.EINTR) for *_, result in done), done
        assert ring.in_flight == 0
    finally:
        ring.close()


def test_misuse_is_refused_before_the_kernel_sees_it(
    uring: ModuleType, data_file: tuple[Path, bytes]
) -> None:
    path, _ = data_file
    pool = SlotPool(2, SLOT)
    ring = uring.Ring(str(path), pool.buffer, SLOT, cached=False)
    try:
        with pytest.raises(ValueError, match="outside"):
            ring.submit(2, 0, SLOT)
        with pytest.raises(ValueError, match="multiples"):
            ring.submit(0, 100, 4096)
        with pytest.raises(ValueError, match="does not fit"):
            ring.submit(0, 0, SLOT + 4096)
        with pytest.raises(ValueError, match="page-cache"):
            ring.submit(0, 0, 4096, cached=True)
        ring.submit(0, 0, SLOT)
        with pytest.raises(ValueError, match="already"):
            ring.submit(0, 0, SLOT)
        reap_until(ring, 1)
    finally:
        ring.close()
    with pytest.raises(ValueError, match="closed"):
        ring.submit(0, 0, SLOT)
    with pytest.raises(ValueError, match="page-aligned"):
        uring.Ring(str(path), bytearray(SLOT + 1), SLOT)


def test_open_errors_are_prism_errors_with_errno_and_file(
    uring: ModuleType, tmp_path: Path
) -> None:
    pool = SlotPool(1, SLOT)
    with pytest.raises(PrismError) as info:
        uring.Ring(str(tmp_path / "missing.bin"), pool.buffer, SLOT)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(tmp_path / "missing.bin")


def test_dropping_a_ring_with_reads_in_flight_is_safe(
    uring: ModuleType, data_file: tuple[Path, bytes]
) -> None:
    path, data = data_file
    pool = SlotPool(4, SLOT)
    ring = uring.Ring(str(path), pool.buffer, SLOT)
    for slot in range(4):
        ring.submit(slot, slot * SLOT, SLOT)
    del ring  # dealloc cancels and waits (bounded) for the kernel to let go of the slots
    ring = uring.Ring(str(path), pool.buffer, SLOT)
    try:
        ring.submit(0, 0, SLOT)
        reap_until(ring, 1)
        assert bytes(pool.view(0)) == data[:SLOT]
    finally:
        ring.close()


ENOMEM_CHILD = textwrap.dedent(
    """
    import json, resource, select, sys
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (256 << 10, 256 << 10))  # ring yes, pool no
    from fflnode.prism import _uring
    from fflnode.prism.pool import SlotPool
    pool = SlotPool(2, 1 << 20)
    ring = _uring.Ring(sys.argv[1], pool.buffer, 1 << 20)
    ring.submit(0, 0, 1 << 20)
    poller = select.poll(); poller.register(ring.eventfd, select.POLLIN)
    done = []
    for _ in range(100):
        done += ring.reap()
        if done:
            break
        poller.poll(5000)
    ok = bytes(pool.view(0)) == open(sys.argv[1], "rb").read(1 << 20)
    print(json.dumps({"stats": ring.stats(), "done": done, "ok": ok}))
    """
)


def test_buffer_registration_refused_for_memlock_falls_back_and_says_so(
    uring: ModuleType, data_file: tuple[Path, bytes]
) -> None:
    # A 256 KiB memlock limit without CAP_IPC_LOCK: what a non-root node sees once the pool
    # outgrows its 8 MiB limit. Root drops the capability with setpriv for the child.
    command = [sys.executable, "-c", ENOMEM_CHILD, str(data_file[0])]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip(
                "running as root and util-linux setpriv is missing: cannot drop CAP_IPC_LOCK"
            )
        command = [setpriv, "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", *command]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print("unregistered ring stats:", report["stats"])
    assert report["stats"]["buffers_registered"] is False
    assert report["stats"]["register_buffers_errno"] == errno.ENOMEM
    assert report["done"][0][3] == 1 << 20 and report["ok"]


def test_a_failed_read_completes_with_minus_errno(uring: ModuleType, tmp_path: Path) -> None:
    # A directory opened through the page-cache descriptor: the read fails in the kernel.
    pool = SlotPool(1, SLOT)
    ring = uring.Ring(str(tmp_path), pool.buffer, SLOT, direct=False, cached=True)
    try:
        ring.submit(0, 0, 4096, cached=True)
        (done,) = reap_until(ring, 1)
        assert done == (0, 0, 4096, -errno.EISDIR)
        assert ring.stats()["failed"] == 1
    finally:
        ring.close()
    with pytest.raises(PrismError) as info:  # O_DIRECT on a directory: refused at open
        uring.Ring(str(tmp_path), pool.buffer, SLOT)
    assert info.value.errno == errno.EINVAL and info.value.filename == str(tmp_path)


# ------------------------------------------------------------------------------ writes


def test_writes_complete_through_the_eventfd_and_land_in_the_file(
    uring: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "written.bin"
    path.write_bytes(b"")
    data = os.urandom(4 * SLOT)
    pool = SlotPool(4, SLOT)
    for slot in range(4):
        pool.view(slot)[:] = data[slot * SLOT : (slot + 1) * SLOT]
    ring = uring.Ring(str(path), pool.buffer, SLOT, writable=True)
    try:
        stats = ring.stats()
        assert stats["writable"] and stats["buffers_registered"] and stats["files_registered"]
        for slot in (3, 1, 0, 2):  # any order: each write names its own offset
            ring.submit_write(slot, slot * SLOT, SLOT)
        done = reap_until(ring, 4)
        assert sorted(done) == [(s, s * SLOT, SLOT, SLOT) for s in range(4)]
        ring.submit_fsync()
        assert reap_until(ring, 1) == [(uring.FSYNC_SLOT, 0, 0, 0)]
        stats = ring.stats()
        assert stats["writes"] == 4 and stats["fsyncs"] == 1 and stats["failed"] == 0
    finally:
        ring.close()
    assert path.read_bytes() == data


def test_page_cache_writes_need_no_alignment_and_direct_ones_do(
    uring: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "edges.bin"
    path.write_bytes(bytes(3 * 4096))
    pool = SlotPool(2, SLOT)
    pool.view(0)[:4096] = b"\xab" * 4096
    pool.view(1)[:1000] = b"\xcd" * 1000
    ring = uring.Ring(str(path), pool.buffer, SLOT, writable=True)
    try:
        with pytest.raises(ValueError, match="multiples"):
            ring.submit_write(1, 4097, 1000)
        ring.submit_write(0, 4096, 4096)
        ring.submit_write(1, 123, 1000, cached=True)
        assert sorted(reap_until(ring, 2)) == [(0, 4096, 4096, 4096), (1, 123, 1000, 1000)]
    finally:
        ring.close()
    expected = bytearray(3 * 4096)
    expected[4096:8192] = b"\xab" * 4096
    expected[123:1123] = b"\xcd" * 1000
    assert path.read_bytes() == bytes(expected)


def test_a_read_only_ring_refuses_writes_and_fsync(
    uring: ModuleType, data_file: tuple[Path, bytes]
) -> None:
    pool = SlotPool(1, SLOT)
    ring = uring.Ring(str(data_file[0]), pool.buffer, SLOT)
    try:
        with pytest.raises(ValueError, match="read-only"):
            ring.submit_write(0, 0, SLOT)
        with pytest.raises(ValueError, match="read-only"):
            ring.submit_fsync()
        assert ring.in_flight == 0 and not ring.stats()["writable"]
    finally:
        ring.close()


def test_one_fsync_at_a_time(uring: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "sync.bin"
    path.write_bytes(b"x")
    pool = SlotPool(1, SLOT)
    ring = uring.Ring(str(path), pool.buffer, SLOT, writable=True)
    try:
        ring.submit_fsync(datasync=False)
        with pytest.raises(ValueError, match="already in flight"):
            ring.submit_fsync()
        assert reap_until(ring, 1) == [(uring.FSYNC_SLOT, 0, 0, 0)]
        ring.submit_fsync()
        assert reap_until(ring, 1) == [(uring.FSYNC_SLOT, 0, 0, 0)]
    finally:
        ring.close()


def test_closing_with_writes_in_flight_lets_them_land(uring: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "landed.bin"
    path.write_bytes(b"")
    data = os.urandom(6 * SLOT)
    pool = SlotPool(6, SLOT)
    pool.buffer[:] = data
    ring = uring.Ring(str(path), pool.buffer, SLOT, writable=True)
    for slot in range(6):
        ring.submit_write(slot, slot * SLOT, SLOT)
    ring.close()  # reads would be cancelled; writes are waited for, never torn by close
    assert path.read_bytes() == data


FSIZE_CHILD = textwrap.dedent(
    """
    import json, resource, select, signal, sys
    from fflnode.prism import _uring
    from fflnode.prism.pool import SlotPool
    SLOT = 1 << 20
    path, limit = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    pool = SlotPool(2, SLOT)
    pool.buffer[:] = bytes(range(256)) * (2 * SLOT // 256)
    ring = _uring.Ring(path, pool.buffer, SLOT, writable=True)
    poller = select.poll(); poller.register(ring.eventfd, select.POLLIN)

    def reap(n):
        done = []
        for _ in range(100):
            done += ring.reap()
            if len(done) >= n:
                return sorted(done)
            poller.poll(5000)
        raise SystemExit("no completion")

    ring.submit_write(0, 0, SLOT)
    ring.submit_write(1, SLOT, SLOT)
    first = reap(2)
    short = first[1][3]
    ring.submit_write(1, SLOT + short, SLOT - short, buf_offset=short)  # the rest
    print(json.dumps({"first": first, "rest": reap(1), "stats": ring.stats()}))
    """
)


def test_a_short_write_reports_the_bytes_written_and_the_rest_fails_with_errno(
    uring: ModuleType, tmp_path: Path
) -> None:
    # RLIMIT_FSIZE cuts a write at the limit (a short write), then refuses with EFBIG:
    # the same shape as a disk filling up mid-request, without needing a full disk.
    path = tmp_path / "limited.bin"
    path.write_bytes(b"")
    limit = SLOT + 3 * 4096
    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_CHILD, str(path), str(limit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["first"] == [[0, 0, SLOT, SLOT], [1, SLOT, SLOT, 3 * 4096]]
    assert report["rest"] == [[1, limit, SLOT - 3 * 4096, -errno.EFBIG]]
    assert report["stats"]["failed"] == 1 and report["stats"]["resubmits"] == 1
    assert path.stat().st_size == limit


ENOMEM_WRITE_CHILD = textwrap.dedent(
    """
    import json, resource, select, sys
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (256 << 10, 256 << 10))  # ring yes, pool no
    from fflnode.prism import _uring
    from fflnode.prism.pool import SlotPool
    pool = SlotPool(2, 1 << 20)
    pool.view(0)[:] = b"\\x5a" * (1 << 20)
    ring = _uring.Ring(sys.argv[1], pool.buffer, 1 << 20, writable=True)
    ring.submit_write(0, 0, 1 << 20)
    poller = select.poll(); poller.register(ring.eventfd, select.POLLIN)
    done = []
    for _ in range(100):
        done += ring.reap()
        if done:
            break
        poller.poll(5000)
    ring.close()
    ok = open(sys.argv[1], "rb").read() == b"\\x5a" * (1 << 20)
    print(json.dumps({"stats": ring.stats(), "done": done, "ok": ok}))
    """
)


def test_write_buffer_registration_refused_for_memlock_falls_back(
    uring: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "unregistered.bin"
    path.write_bytes(b"")
    command = [sys.executable, "-c", ENOMEM_WRITE_CHILD, str(path)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip(
                "running as root and util-linux setpriv is missing: cannot drop CAP_IPC_LOCK"
            )
        command = [setpriv, "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", *command]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["stats"]["buffers_registered"] is False
    assert report["stats"]["register_buffers_errno"] == errno.ENOMEM
    assert report["done"] == [[0, 0, 1 << 20, 1 << 20]] and report["ok"]


def test_the_fsync_slot_matches_the_python_constant(uring: ModuleType) -> None:
    from fflnode.prism.backends import FSYNC_SLOT

    assert uring.FSYNC_SLOT == FSYNC_SLOT
