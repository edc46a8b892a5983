"""Facts about files and memory that Prism's tests and benchmark rely on (Linux /proc).

Owns: which filesystem a path lives on (tmpfs ignores O_DIRECT alignment and keeps
files in RAM, so alignment and memory measurements must run elsewhere), taking a
file out of the page cache for a cold read, and reading a process's peak RSS.
Must never: drop the page cache without saying which method it used.
"""

from __future__ import annotations

import os
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
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
