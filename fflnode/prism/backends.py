"""Prism I/O engines and the choice between them.

Owns: the three ways Prism moves file bytes between a file and pool slots, behind one
small interface (`Engine`): submit a read, a write or an fsync, wait until completions
may be ready, reap them as (slot, offset, length, result) with result = bytes read or
written or -errno (an fsync completes with slot FSYNC_SLOT), cancel, close. An engine
opened `writable` opens its descriptors read-write; the caller creates the file.

- "io_uring": the native ring (native/uring.c). The trio thread submits and reaps;
  trio waits on the ring's eventfd with `wait_readable`. No thread in the hot path.
- "threads": `os.preadv` / `os.pwritev` of the same aligned slots through an O_DIRECT
  descriptor, one request per worker thread from trio's thread cache
  (`trio.lowlevel.start_thread_soon`, the primitive under `trio.to_thread`); completions
  come back via the trio token.
- "buffered": the same thread machinery through the page cache, for filesystems that
  refuse O_DIRECT (EINVAL) or callers that ask for page-cache reads.

Choice (`resolve_backend`): FFLNODE_PRISM_BACKEND, when set, overrides the caller's
value (which comes from the config key `prism.backend`); "auto" picks io_uring when the
extension imports and a probe ring can be created, else threads. A file whose
filesystem refuses O_DIRECT is read by the buffered engine whatever the choice.

Must never: close a descriptor while a worker thread may still use it (the last
completing thread closes it), abandon a write on close (closing waits for writes; only
reads are cancelled), or report success for a request that came back short.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import os
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import outcome
import trio

from fflnode.errors import ConfigError, PrismError
from fflnode.prism.pool import SlotPool

BACKENDS = ("io_uring", "threads", "buffered")
CHOICES = ("auto", *BACKENDS)
ENV_BACKEND = "FFLNODE_PRISM_BACKEND"
CONFIG_KEY = "prism.backend"
IO_URING_DISABLED_SYSCTL = Path("/proc/sys/kernel/io_uring_disabled")
THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")

Completion = tuple[int, int, int, int]  # (slot, offset, length, bytes done or -errno)
# The slot an fsync completes with (native/uring.c FSYNC_SLOT): it owns no slot.
FSYNC_SLOT = -1


class Engine(Protocol):
    """What a Prism stream needs from a backend. All calls come from the trio thread."""

    name: str
    direct: bool
    cached: bool

    @property
    def in_flight(self) -> int: ...

    def submit(self, slot: int, offset: int, length: int, buf_offset: int, cached: bool) -> None:
        """Start reading `length` bytes at file `offset` into `slot` + `buf_offset`."""

    def submit_write(
        self, slot: int, offset: int, length: int, buf_offset: int, cached: bool
    ) -> None:
        """Start writing `length` bytes from `slot` + `buf_offset` at file `offset`
        (writable engines). The completion may report fewer bytes: continue from there."""

    def submit_fsync(self, datasync: bool) -> None:
        """Start fdatasync (fsync when not `datasync`); completes with FSYNC_SLOT. It is
        not ordered after writes in flight: reap those first."""

    def reap(self) -> list[Completion]:
        """Completions ready now (possibly none); never waits."""

    async def wait(self) -> None:
        """Return when `reap` may have something; only called with reads in flight."""

    def cancel(self) -> None:
        """Ask for the requests in flight to end early; they still complete through reap."""

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BackendChoice:
    """The backend a stream will use, and why."""

    name: str
    reason: str
    requested: str
    source: str


@cache
def native_module() -> tuple[ModuleType | None, str]:
    """The native extension, or None and why it could not be imported."""
    try:
        from fflnode.prism import _uring
    except ImportError as e:
        return None, (
            f"fflnode.prism._uring not importable ({e}); rebuild with liburing-dev installed "
            f"(FFLNODE_REQUIRE_NATIVE=1 pip install -e .)"
        )
    return _uring, f"fflnode.prism._uring loaded from {_uring.__file__}"


@cache
def probe_io_uring() -> tuple[bool, str]:
    """Whether an io_uring can be created here, with the evidence either way."""
    module, why = native_module()
    if module is None:
        return False, why
    try:
        info = module.probe()
    except PrismError as e:
        hint = ""
        if e.errno == errno_codes.EPERM:
            hint = f" ({_sysctl_text()}, or a seccomp filter such as a container's default)"
        elif e.errno == errno_codes.ENOSYS:
            hint = " (kernel built without io_uring, or older than 5.1)"
        return False, f"probe ring refused: {e}{hint}"
    return True, f"probe ring created (kernel features 0x{info['features']:x})"


def _sysctl_text() -> str:
    try:
        value = IO_URING_DISABLED_SYSCTL.read_text().strip()
    except OSError:
        return "kernel.io_uring_disabled absent"
    return f"kernel.io_uring_disabled={value}"


def resolve_backend(requested: str | None = "auto") -> BackendChoice:
    """The backend to use: FFLNODE_PRISM_BACKEND over `requested` over "auto".

    Raises ConfigError for an unknown name, or for an explicit "io_uring" that this
    machine cannot provide (an explicit choice is never silently downgraded).
    """
    env = os.environ.get(ENV_BACKEND, "").strip()
    if env:
        want, source = env.lower(), f"environment {ENV_BACKEND}={env}"
    else:
        want, source = (requested or "auto").strip().lower(), f"{CONFIG_KEY}={requested or 'auto'}"
    if want not in CHOICES:
        raise ConfigError(f"{source}: unknown Prism backend {want!r}; use one of {list(CHOICES)}")
    ok, why = probe_io_uring()
    if want == "auto":
        if ok:
            return BackendChoice("io_uring", f"auto: {why}", want, source)
        return BackendChoice("threads", f"auto: io_uring unavailable: {why}", want, source)
    if want == "io_uring" and not ok:
        raise ConfigError(f"{source}: io_uring requested but unavailable: {why}")
    return BackendChoice(want, f"requested by {source}", want, source)


def backend_report(requested: str | None = "auto") -> list[str]:
    """Lines for `fflnode doctor`: the backend Prism would use, why, and what it rests on."""
    lines = []
    try:
        choice = resolve_backend(requested)
        lines.append(f"prism backend: {choice.name} ({choice.reason})")
    except ConfigError as e:
        lines.append(f"prism backend: ERROR: {e}")
    module, why = native_module()
    lines.append(f"prism native extension: {'ok' if module else 'missing'}: {why}")
    ok, probe_why = probe_io_uring()
    lines.append(f"prism io_uring: {'usable' if ok else 'unusable'}: {probe_why}; {_sysctl_text()}")
    env = os.environ.get(ENV_BACKEND)
    lines.append(
        f"prism override: {ENV_BACKEND}={env!r}" if env else f"prism override: {ENV_BACKEND} unset"
    )
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft >> 10} KiB"
    lines.append(
        f"prism registered buffers: memlock limit {limit}"
        + (" (root: not charged)" if os.geteuid() == 0 else "")
        + "; a pool over the limit reads unregistered (stats: register_buffers_errno=ENOMEM)"
    )
    lines.append(
        "prism O_DIRECT: decided per file; a filesystem that refuses it (EINVAL) is read "
        "by the buffered backend"
    )
    try:
        thp = THP_SYSFS.read_text().strip()
    except OSError:
        thp = "unavailable"
    lines.append(
        f"prism huge pages: transparent_hugepage={thp} (the pool asks for them with "
        f"MADV_HUGEPAGE; 'never' leaves 1 MiB reads split into two device requests)"
    )
    return lines


# ---------------------------------------------------------------------------- engines


class UringEngine:
    """The native ring: submit and reap in the trio thread, wait on its eventfd."""

    name = "io_uring"

    def __init__(
        self,
        path: Path,
        pool: SlotPool,
        *,
        direct: bool,
        cached: bool,
        register: bool,
        writable: bool = False,
    ) -> None:
        module, why = native_module()
        if module is None:
            raise PrismError(errno_codes.ENOSYS, f"io_uring backend unavailable: {why}", str(path))
        self.direct, self.cached = direct, cached
        self._ring = module.Ring(
            str(path),
            pool.buffer,
            pool.slot_size,
            direct=direct,
            cached=cached,
            register=register,
            writable=writable,
        )
        self._fd = self._ring.eventfd

    @property
    def in_flight(self) -> int:
        return self._ring.in_flight

    def submit(self, slot: int, offset: int, length: int, buf_offset: int, cached: bool) -> None:
        self._ring.submit(slot, offset, length, buf_offset, cached)

    def submit_write(
        self, slot: int, offset: int, length: int, buf_offset: int, cached: bool
    ) -> None:
        self._ring.submit_write(slot, offset, length, buf_offset, cached)

    def submit_fsync(self, datasync: bool) -> None:
        self._ring.submit_fsync(datasync)

    def reap(self) -> list[Completion]:
        return self._ring.reap()

    async def wait(self) -> None:
        await trio.lowlevel.wait_readable(self._fd)

    def cancel(self) -> None:
        self._ring.cancel()

    def stats(self) -> dict[str, Any]:
        return self._ring.stats()

    def close(self) -> None:
        self._ring.close()


class ThreadEngine:
    """preadv/pwritev in worker threads, one request per thread, completions via the
    trio token.

    `direct=True` opens the file O_DIRECT (the "threads" backend); `cached` adds a
    page-cache descriptor. With direct=False this is the "buffered" backend.
    """

    def __init__(
        self, path: Path, pool: SlotPool, *, direct: bool, cached: bool, writable: bool = False
    ) -> None:
        self.name = "threads" if direct else "buffered"
        self.direct, self.cached = direct, cached
        self._path = str(path)
        self._pool = pool
        self._fds: list[int | None] = [None, None]
        self._lock = threading.Lock()  # guards _done, _running, _closing
        self._done: list[Completion] = []
        self._running = 0  # requests whose thread has not delivered yet (fsync included)
        self._in_flight = 0  # reads and writes submitted and not yet reaped (trio thread)
        self._closing = False
        self._wakeup: trio.Event | None = None
        self._counts = {
            "submitted": 0,
            "completed": 0,
            "failed": 0,
            "resubmits": 0,
            "writes": 0,
            "fsyncs": 0,
        }
        self.writable = writable
        access = os.O_RDWR if writable else os.O_RDONLY
        try:
            if direct:
                self._fds[0] = _open(path, access | os.O_DIRECT | os.O_CLOEXEC, "O_DIRECT")
            if cached or not direct:
                self._fds[1] = _open(path, access | os.O_CLOEXEC, "")
        except BaseException:
            self._close_fds()
            raise

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, slot: int, offset: int, length: int, buf_offset: int, cached: bool) -> None:
        self._start(slot, offset, length, buf_offset, cached, write=False)

    def submit_write(
        self, slot: int, offset: int, length: int, buf_offset: int, cached: bool
    ) -> None:
        if not self.writable:
            raise ValueError(f"{self._path}: engine opened read-only: pass writable=True to write")
        self._start(slot, offset, length, buf_offset, cached, write=True)
        self._counts["writes"] += 1

    def _start(
        self, slot: int, offset: int, length: int, buf_offset: int, cached: bool, write: bool
    ) -> None:
        fd = self._fds[1 if cached or not self.direct else 0]
        if fd is None:
            raise ValueError(
                f"{self._path}: no {'page-cache' if cached else 'O_DIRECT'} descriptor"
            )
        view = self._pool.view(slot)[buf_offset : buf_offset + length]
        token = trio.lowlevel.current_trio_token()
        with self._lock:
            self._running += 1
        self._in_flight += 1
        self._counts["submitted"] += 1
        self._counts["resubmits"] += buf_offset > 0

        def deliver(result: outcome.Outcome[int]) -> None:
            self._deliver(token, (slot, offset, length, result.unwrap()))

        if write:
            trio.lowlevel.start_thread_soon(
                _pwrite_fn(fd, view, offset), deliver, name="prism-pwritev"
            )
        else:
            trio.lowlevel.start_thread_soon(
                _pread_fn(fd, view, offset), deliver, name="prism-preadv"
            )

    def submit_fsync(self, datasync: bool) -> None:
        if not self.writable:
            raise ValueError(f"{self._path}: engine opened read-only: pass writable=True to fsync")
        fd = self._fds[0] if self._fds[0] is not None else self._fds[1]
        assert fd is not None, "an open engine holds a descriptor"
        token = trio.lowlevel.current_trio_token()
        with self._lock:
            self._running += 1
        self._counts["fsyncs"] += 1

        def deliver(result: outcome.Outcome[int]) -> None:
            self._deliver(token, (FSYNC_SLOT, 0, 0, result.unwrap()))

        trio.lowlevel.start_thread_soon(_fsync_fn(fd, datasync), deliver, name="prism-fsync")

    def _deliver(self, token: trio.lowlevel.TrioToken, completion: Completion) -> None:
        # Runs in the worker thread.
        with self._lock:
            self._done.append(completion)
            self._running -= 1
            close_now = self._closing and self._running == 0
        if close_now:
            self._close_fds()
        # When the loop is gone nobody waits for this completion.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._wake)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def reap(self) -> list[Completion]:
        with self._lock:
            done, self._done = self._done, []
        self._in_flight -= sum(1 for c in done if c[0] != FSYNC_SLOT)
        self._counts["completed"] += len(done)
        self._counts["failed"] += sum(1 for c in done if c[3] < 0)
        return done

    async def wait(self) -> None:
        with self._lock:
            if self._done:
                ready = True
            else:
                ready = False
                self._wakeup = trio.Event()
        if ready:
            await trio.lowlevel.checkpoint()
            return
        assert self._wakeup is not None
        try:
            await self._wakeup.wait()
        finally:
            self._wakeup = None

    def cancel(self) -> None:
        """A preadv or pwritev in a thread cannot be interrupted; each is one bounded
        request."""

    def stats(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "direct": self._fds[0] is not None,
            "cached": self._fds[1] is not None,
            "writable": self.writable,
            "in_flight": self._in_flight,
            **self._counts,
        }

    def close(self) -> None:
        with self._lock:
            self._closing = True
            close_now = self._running == 0
        if close_now:
            self._close_fds()

    def _close_fds(self) -> None:
        for i, fd in enumerate(self._fds):
            if fd is not None:
                os.close(fd)
                self._fds[i] = None


def _open(path: Path, flags: int, how: str) -> int:
    try:
        return os.open(path, flags)
    except OSError as e:
        what = f"open with {how}" if how else "open"
        raise PrismError(e.errno, f"{what}: {os.strerror(e.errno)}", str(path)) from None


def _pread_fn(fd: int, view: memoryview, offset: int) -> Callable[[], int]:
    def pread() -> int:
        try:
            return os.preadv(fd, [view], offset)
        except OSError as e:
            return -(e.errno or errno_codes.EIO)

    return pread


def _pwrite_fn(fd: int, view: memoryview, offset: int) -> Callable[[], int]:
    def pwrite() -> int:
        try:
            return os.pwritev(fd, [view], offset)
        except OSError as e:
            return -(e.errno or errno_codes.EIO)

    return pwrite


def _fsync_fn(fd: int, datasync: bool) -> Callable[[], int]:
    def sync() -> int:
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        except OSError as e:
            return -(e.errno or errno_codes.EIO)
        return 0

    return sync
