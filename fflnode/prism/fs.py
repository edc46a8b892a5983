"""Facts about files and memory that Prism's tests and benchmark rely on (Linux /proc).

Owns: which filesystem a path lives on (tmpfs ignores O_DIRECT alignment and keeps
files in RAM, so alignment and memory measurements must run elsewhere), taking a
file out of the page cache for a cold read, how much of a file the page cache holds
(mincore, as util-linux fincore counts it), and reading a process's peak RSS.
Must never: drop the page cache without saying which method it used, or fault in a
page of a file it only asks about.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from functools import cache
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
MEMINFO = Path("/proc/meminfo")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
# Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS (proc(5)).
RESET_PEAK_RSS = "5"


def filesystem_type(path: str | os.PathLike[str]) -> str:
    """The type ("ext4", "tmpfs", ...) of the mount holding `path` (longest mount point)."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    for line in MOUNTINFO.read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount_point = left.split()[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, right.split()[0]
    return kind


def evict_from_page_cache(path: str | os.PathLike[str], drop_all: bool = False) -> str:
    """Make the next read of `path` cold; returns the method used.

    Always flushes and drops the file's own pages (fdatasync + posix_fadvise DONTNEED,
    which needs no privilege and leaves other processes' cache alone). With `drop_all`,
    also writes 1 to /proc/sys/vm/drop_caches when permitted (root), which drops every
    clean page cache page of the machine.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if drop_all:
        try:
            DROP_CACHES.write_text("1\n")
        except OSError as e:
            return f"posix_fadvise(DONTNEED) (drop_caches refused: {e.strerror})"
        return "drop_caches=1 + posix_fadvise(DONTNEED)"
    return "posix_fadvise(DONTNEED)"


def resident_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of `path` held in the page cache now: mincore over a fresh read-only shared
    mapping that is never touched (so asking faults nothing in), pages times page size,
    capped at the file size."""
    libc = _libc()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} for mincore failed")
    finally:
        os.close(fd)
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
        resident = sum(b & 1 for b in bytes(vec))
    finally:
        libc.munmap(ctypes.c_void_p(addr), size)
    return min(size, resident * mmap.PAGESIZE)


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def meminfo_bytes(field: str) -> int:
    """A kB field of /proc/meminfo ("Cached", "Dirty", ...) in bytes."""
    for line in MEMINFO.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{MEMINFO} has no {field}")


def status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (VmHWM, VmRSS, ...) in bytes."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{STATUS} has no {field}")


def peak_rss() -> int:
    """This process's peak resident set size (VmHWM), in bytes."""
    return status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS, so a later peak measures only what follows."""
    CLEAR_REFS.write_text(RESET_PEAK_RSS)
