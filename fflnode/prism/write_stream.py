"""WriteStream: byte ranges and tensors written into one file through a bounded slot pool.

Owns: keeping up to `depth` writes in flight into one file, continuing short writes,
turning every failure into one PrismError, and getting every slot back.

Shape: the reads' (DESIGN.md, measured): O_DIRECT, 1 MiB requests, queue depth 8,
page-aligned slots of one pre-faulted pool, the same engines (backends.py) chosen the
same way (`prism.backend`, FFLNODE_PRISM_BACKEND). A write holds a slot only while it is
in flight (nothing is handed to a consumer), so the pool is `depth` slots. Where the
filesystem refuses O_DIRECT (EINVAL) the buffered engine writes through the page cache.

Edges (plan.plan_writes says why): the aligned middle of a range goes O_DIRECT, an
unaligned head or tail (under 4 KiB each) through the page cache; `pad=True` instead
zero-fills the tail to the next 4 KiB boundary and writes it O_DIRECT, for callers that
own those bytes (the block store pads its regions).

Promises: `write` copies its data into slots and submits it; when it returns every byte
is in a slot and submitted, so the caller's buffer is free at once, but not yet on the
device. `flush` returns when every write submitted so far has completed; `sync` is flush
then fdatasync (fsync with data_only=False). A short write is continued from where it
stopped (O_DIRECT while the rest is aligned, else through the page cache). A failed
write is sticky: the call that sees it and every later write/flush/sync raise PrismError
with errno, the file, the operation, its offset and length and the bytes of it that
landed. A cancelled `write` leaves its range partly submitted (what was submitted still
lands) and the stream usable. Calls from several tasks are serialised (FIFO), and a
write overlapping one in flight waits for it, so overlapping writes land in call order.

Must never: hand a slot back while the kernel may still read it, report success for a
short or failed write, or close a descriptor with a write in flight (closing waits,
bounded; `close()` cannot report errors, `aclose()` and `flush()` do). Never imports
torch (a tensor source is copied by torch only if the caller handed one).
"""

from __future__ import annotations

import errno as errno_codes
import os
from pathlib import Path
from typing import Any

import trio

from fflnode.errors import PrismError
from fflnode.prism.backends import FSYNC_SLOT, Engine, ThreadEngine, UringEngine, resolve_backend
from fflnode.prism.device import source_for
from fflnode.prism.plan import Write, plan_writes
from fflnode.prism.pool import SlotPool
from fflnode.prism.stream import ALIGN, DEFAULT_DEPTH, DRAIN_TIMEOUT_S, MAX_DEPTH, REQUEST_BYTES

# A new file gets these permissions (before the umask), like any data file of the node.
FILE_MODE = 0o644


class WriteStream:
    """Write byte ranges of one file through a bounded pool. Open synchronously; the file
    is created when missing (never truncated).

    `backend`: "auto" | "io_uring" | "threads" | "buffered" (FFLNODE_PRISM_BACKEND
    overrides it). Use `async with` (or `aclose()`), which waits for every write.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        backend: str | None = "auto",
        depth: int = DEFAULT_DEPTH,
        request_bytes: int = REQUEST_BYTES,
        register: bool = True,
    ) -> None:
        self.path = Path(path)
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"queue depth {depth} outside 1..{MAX_DEPTH}")
        choice = resolve_backend(backend)
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
        except OSError as e:
            raise PrismError(e.errno, f"create: {os.strerror(e.errno)}", str(self.path)) from None
        self.depth = depth
        self.request_bytes = request_bytes
        self.pool = SlotPool(depth, request_bytes)
        self.requested = choice
        self.engine, self.reason = self._open_engine(choice.name, choice.reason, register)
        self.backend = self.engine.name
        self._writing: dict[int, tuple[Write, int, bool]] = {}  # slot -> (write, done, cached)
        self._fsync_op: str | None = None  # "fdatasync" or "fsync" while one is in flight
        self._error: PrismError | None = None
        self._error_raised = False
        self._lock = trio.Lock()
        self._closed = False
        self.counts = {"direct": 0, "page_cache": 0, "short": 0, "bytes": 0, "syncs": 0}

    def _open_engine(self, name: str, reason: str, register: bool) -> tuple[Engine, str]:
        path, pool = self.path, self.pool
        refused = _direct_refused(path, pool) if name != "buffered" else None
        if name == "buffered" or refused:
            engine = ThreadEngine(path, pool, direct=False, cached=True, writable=True)
            return engine, refused or reason
        if name == "io_uring":
            engine = UringEngine(
                path, pool, direct=True, cached=True, register=register, writable=True
            )
            return engine, reason
        return ThreadEngine(path, pool, direct=True, cached=True, writable=True), reason

    # ------------------------------------------------------------------ writing

    async def write(self, offset: int, data: Any, *, pad: bool = False) -> None:
        """Write `data` (bytes, a buffer, a numpy array or a contiguous tensor on any
        device) at file `offset`; returns once every byte is copied into the pool and
        submitted. With `pad`, the bytes after the data up to the next 4 KiB boundary are
        overwritten with zeros (the caller owns them) so the tail goes O_DIRECT too; the
        buffered engine, which needs no alignment, writes the data alone."""
        source = source_for(data)
        if offset < 0:
            raise ValueError(f"{self.path}: negative file offset {offset}")
        async with self._lock:
            self._check_usable()
            source.prepare(self.pool)
            align = ALIGN if self.engine.direct else 1
            plan = plan_writes(
                offset,
                offset + source.nbytes,
                request_bytes=self.request_bytes,
                align=align,
                pad=pad,
            )
            for step in plan:
                # One schedule point per request, as the reader has per chunk: a write the
                # device keeps up with (page cache) would otherwise hold the loop for as
                # long as the whole copy takes.
                await trio.lowlevel.checkpoint()
                await self._wait_for_overlaps(step)
                slot = await self._free_slot()
                view = self.pool.view(slot)
                try:
                    source.copy_into(view[: step.data], step.offset - offset)
                    if step.length > step.data:
                        view[step.data : step.length] = bytes(step.length - step.data)
                    cached = not step.aligned or not self.engine.direct
                    self.engine.submit_write(slot, step.offset, step.length, 0, cached)
                except BaseException:
                    self.pool.release(slot)
                    raise
                self._writing[slot] = (step, 0, cached)
                self.counts["page_cache" if cached else "direct"] += 1
            self._complete(self.engine.reap())
            self._raise_error()

    async def flush(self) -> None:
        """Return when every write submitted so far has completed; raise its error if any."""
        async with self._lock:
            self._check_usable()
            while self._writing:
                await self._wait_and_complete()
                self._raise_error()

    async def sync(self, *, data_only: bool = True) -> None:
        """flush(), then fdatasync (fsync with `data_only=False`) through the engine: when
        it returns, the writes so far survive a power loss. If cancelled while the fsync
        runs, the fsync still completes, and a failure of it is raised by the next call."""
        async with self._lock:
            self._check_usable()
            while self._writing or self._fsync_op is not None:
                await self._wait_and_complete()
                self._raise_error()
            self.engine.submit_fsync(data_only)
            self._fsync_op = "fdatasync" if data_only else "fsync"
            while self._fsync_op is not None:
                await self._wait_and_complete()
            self._raise_error()
            self.counts["syncs"] += 1

    # ------------------------------------------------------------------ completions

    async def _free_slot(self) -> int:
        while True:
            slot = self.pool.acquire()
            if slot is not None:
                return slot
            await self._wait_and_complete()
            self._raise_error()

    async def _wait_for_overlaps(self, step: Write) -> None:
        """Writes in flight are unordered: one that overlaps `step` must land first, so a
        range written twice ends with the second (program order, as with pwrite)."""
        end = step.offset + step.length
        while any(
            w.offset < end and step.offset < w.offset + w.length
            for w, _, _ in self._writing.values()
        ):
            await self._wait_and_complete()
            self._raise_error()

    async def _wait_and_complete(self) -> None:
        """Reap; when nothing was ready, wait for the engine once and reap again."""
        done = self.engine.reap()
        if not done:
            assert self._writing or self._fsync_op, "waiting with nothing in flight"
            await self.engine.wait()
            done = self.engine.reap()
        self._complete(done)

    def _complete(self, done: list[tuple[int, int, int, int]]) -> None:
        """Account for every completion: release finished slots, continue short writes,
        remember the first failure (raised by the caller, after the whole batch)."""
        for slot, offset, length, result in done:
            if slot == FSYNC_SLOT:
                op, self._fsync_op = self._fsync_op, None
                if result < 0:  # sticky: the kernel reports a writeback error only once
                    self._fail(-result, op or "fsync")
                continue
            step, written, cached = self._writing.pop(slot)
            if result <= 0:
                self.pool.release(slot)
                err = -result if result < 0 else errno_codes.EIO
                self._fail(err, "write", step, written, offset, length, cached)
                continue
            written += result
            self.counts["bytes"] += result
            if written >= step.length:
                self.pool.release(slot)
                continue
            # A short write: the rest goes from the same slot, O_DIRECT only if aligned.
            self.counts["short"] += 1
            rest_cached = cached or written % ALIGN != 0
            rest = step.length - written
            try:
                self.engine.submit_write(slot, step.offset + written, rest, written, rest_cached)
            except PrismError as e:  # the ring broke: every later call raises too
                self.pool.release(slot)
                self._fail(e.errno, "write", step, written, step.offset + written, rest, cached)
                continue
            except BaseException:
                self.pool.release(slot)
                raise
            self._writing[slot] = (step, written, rest_cached)

    def _fail(
        self,
        err: int,
        op: str,
        step: Write | None = None,
        written: int = 0,
        offset: int = 0,
        length: int = 0,
        cached: bool = False,
    ) -> None:
        if self._error is not None:
            return
        if step is None:
            what = f"{self.engine.name} {op}: {os.strerror(err)}"
        else:
            path_taken = "buffered" if cached or not self.engine.direct else "O_DIRECT"
            what = (
                f"{self.engine.name} {op} of {length} bytes at offset {offset} ({path_taken}): "
                f"{os.strerror(err) if err else 'no progress'}"
            )
            if written:
                what += (
                    f" (the rest of a short write: {written} of the {step.length} bytes at "
                    f"offset {step.offset} had been written)"
                )
            if err == errno_codes.EINVAL and not cached and self.engine.direct:
                what += " (EINVAL on O_DIRECT: unaligned, or refused by this filesystem)"
        self._error = PrismError(err, what, str(self.path))

    def _raise_error(self) -> None:
        if self._error is not None:
            self._error_raised = True
            e = self._error
            raise PrismError(e.errno, e.strerror, e.filename)

    def _check_usable(self) -> None:
        if self._closed:
            raise PrismError(errno_codes.EBADF, "write stream is closed", str(self.path))
        self._raise_error()

    # ------------------------------------------------------------------ state

    @property
    def in_flight(self) -> int:
        return len(self._writing)

    def stats(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "backend": self.backend,
            "reason": self.reason,
            "depth": self.depth,
            "request_bytes": self.request_bytes,
            "slots": self.pool.nslots,
            "free_slots": self.pool.free,
            "writes": dict(self.counts),
            "engine": self.engine.stats(),
        }

    async def aclose(self) -> None:
        """Wait (shielded, bounded) for every write in flight, release the engine, then
        raise the first write error no call has raised yet."""
        if self._closed:
            return
        await self._drain()
        self.close()
        if self._error is not None and not self._error_raised:
            self._raise_error()

    async def _drain(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_TIMEOUT_S):
            while self._writing or self._fsync_op is not None:
                done = self.engine.reap()
                if not done:
                    await self.engine.wait()
                    continue
                self._complete(done)

    def close(self) -> None:
        """Release the engine synchronously. Writes still in flight are waited for by the
        engine (bounded), never cancelled; their errors are not reported (use aclose)."""
        if self._closed:
            return
        self._closed = True
        self.engine.close()
        self._writing.clear()
        self.pool.unpin_cuda()

    def __enter__(self) -> WriteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> WriteStream:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.aclose()
        else:  # the caller's exception wins; the writes in flight still land
            await self._drain()
            self.close()


def _direct_refused(path: Path, pool: SlotPool) -> str | None:
    """The reason to write through the page cache, or None when O_DIRECT works here.

    Some filesystems refuse O_DIRECT at open (EINVAL: tmpfs before 6.6, some FUSE), others
    only at the first request; a 4 KiB read at offset 0 finds the second kind without
    writing anything (it reads nothing, and proves nothing, when the file is empty).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno_codes.EINVAL:
            return f"O_DIRECT refused by the filesystem at open (EINVAL): {path}"
        raise PrismError(
            e.errno, f"open with O_DIRECT: {os.strerror(e.errno)}", str(path)
        ) from None
    try:
        slot = pool.acquire()
        assert slot is not None, "probe runs on a fresh pool"
        try:
            os.preadv(fd, [pool.view(slot)[:ALIGN]], 0)
        finally:
            pool.release(slot)
    except OSError as e:
        if e.errno == errno_codes.EINVAL:
            return f"O_DIRECT read refused by the filesystem (EINVAL): {path}"
        raise PrismError(
            e.errno, f"O_DIRECT probe read: {os.strerror(e.errno)}", str(path)
        ) from None
    finally:
        os.close(fd)
    return None
