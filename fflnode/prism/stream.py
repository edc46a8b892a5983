"""A Prism stream: one file, one engine, one slot pool; byte ranges in, chunks out.

Owns: keeping `depth` reads in flight over a byte range, turning their completions into
chunks in file order, and getting every slot back, whatever happens to the consumer.

Shape (DESIGN.md, measured): O_DIRECT, 1 MiB requests, queue depth 4-8, a pool of
depth + 2 page-aligned slots. Reads are aligned covers of the range (plan.py); each
chunk is a zero-copy view of the exact slice of its slot, whole elements of the dtype.

Cache policy: "direct" reads everything O_DIRECT; "page" reads through the page cache
(the buffered backend); "auto" (default) reads a request through the page cache when
mincore says all its pages are resident there (a warm file is served at memory speed)
and O_DIRECT otherwise (a cold file is read at device speed without filling the cache).

Promises: chunks come in file order and tile the range exactly; a short read is
continued, an end of file before the range ends raises FormatError (the file shrank),
a kernel error raises PrismError with errno and path. When an iteration ends early (an
exception, a cancellation, `aclose`), reads in flight are cancelled and reaped inside a
shielded, bounded scope before the exception propagates, so `pool.free` returns to
`nslots` once the consumer has released the chunks it holds.

Must never: import torch (a torch view is built on demand by `Chunk.torch`), hand out a
slot the kernel may still write, or wait without a bound when cleaning up.
"""

from __future__ import annotations

import errno as errno_codes
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from fflnode.errors import FormatError, PrismError
from fflnode.prism.backends import Engine, ThreadEngine, UringEngine, native_module, resolve_backend
from fflnode.prism.plan import Read, plan_reads
from fflnode.prism.pool import PAGE_SIZE, SlotPool
from fflnode.prism.safetensors import DTYPES

if TYPE_CHECKING:
    import torch

# DESIGN.md: queue depth 4-8 with 1 MiB requests reaches the device limit here.
DEFAULT_DEPTH = 8
MAX_DEPTH = 64  # beyond this the pool, not the device, is what grows
# DESIGN.md: every method reaches the device limit with >= 128 KiB requests; 1 MiB keeps
# per-request overhead (a Python round trip per chunk) under 2 % at device speed.
REQUEST_BYTES = 1 << 20
# The consumer's share of the pool: it may hold two chunks while `depth` reads fly.
EXTRA_SLOTS = 2
# O_DIRECT alignment: 4 KiB satisfies any logical block size (512 B here) and is the
# page size mincore reports residency in.
ALIGN = PAGE_SIZE
# Cleanup waits this long for cancelled reads to be reaped: a 1 MiB O_DIRECT read takes
# ~1 ms here; the bound is for a device that stopped answering.
DRAIN_TIMEOUT_S = 10.0
CACHE_POLICIES = ("auto", "direct", "page")


def depth_for_pool(pool_bytes: int, request_bytes: int = REQUEST_BYTES) -> int:
    """The queue depth whose pool (depth + EXTRA_SLOTS slots) fits in `pool_bytes`, for
    a config that sizes Prism in megabytes (`prism.pool_mb`); clamped to 1..MAX_DEPTH.
    Depths past 8 do not read faster here (DESIGN.md), they only hold more memory."""
    return max(1, min(MAX_DEPTH, pool_bytes // request_bytes - EXTRA_SLOTS))


class Chunk:
    """A zero-copy view of file bytes [offset, offset + nbytes) in a pool slot.

    Valid until `release()`, which hands the slot back for the next read; views made
    with `numpy()` or `torch()` share the memory and must not be used after it. Use
    `with chunk:` (or `async with`) to release on exit. `element` is the index of the
    first element in the caller's coordinates (tensor or flat vector) when the stream
    was asked for elements, else None.
    """

    __slots__ = ("offset", "nbytes", "dtype", "element", "pool", "_slot", "_view")

    def __init__(
        self,
        pool: SlotPool,
        slot: int,
        start: int,
        offset: int,
        nbytes: int,
        dtype: str | None,
        element: int | None,
    ) -> None:
        self.pool = pool
        self._slot: int | None = slot
        self._view: memoryview | None = pool.view(slot)[start : start + nbytes]
        self.offset = offset
        self.nbytes = nbytes
        self.dtype = dtype
        self.element = element

    @property
    def data(self) -> memoryview:
        if self._view is None:
            raise ValueError(f"chunk at byte {self.offset} used after release()")
        return self._view

    @property
    def released(self) -> bool:
        return self._slot is None

    def numpy(self, dtype: np.dtype | str | None = None) -> np.ndarray:
        """A 1-D numpy view: the stream's dtype (raw bytes when none), or `dtype`."""
        if dtype is None:
            dtype = DTYPES[self.dtype] if self.dtype else np.uint8
        return np.frombuffer(self.data, dtype=dtype)

    def torch(self) -> torch.Tensor:
        """A 1-D CPU torch view (imports torch on first use; BF16 is viewed as bfloat16)."""
        import torch

        tensor = torch.from_numpy(self.numpy())
        return tensor.view(torch.bfloat16) if self.dtype == "BF16" else tensor

    def release(self) -> None:
        """Hand the slot back. Idempotent."""
        if self._slot is not None:
            self._view = None
            slot, self._slot = self._slot, None
            self.pool.release(slot)

    def __enter__(self) -> Chunk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Chunk:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else f"slot {self._slot}"
        return f"<Chunk bytes [{self.offset}, {self.offset + self.nbytes}) {state}>"


class PrismStream:
    """Stream byte ranges of one file through a bounded pool. Open synchronously.

    `backend`: "auto" | "io_uring" | "threads" | "buffered" (FFLNODE_PRISM_BACKEND
    overrides it). `cache`: "auto" | "direct" | "page" (module docstring). One iteration
    at a time: finish or `aclose()` one `chunks()` before starting the next.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        backend: str | None = "auto",
        depth: int = DEFAULT_DEPTH,
        request_bytes: int = REQUEST_BYTES,
        cache: str = "auto",
        register: bool = True,
    ) -> None:
        self.path = Path(path)
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"queue depth {depth} outside 1..{MAX_DEPTH}")
        if cache not in CACHE_POLICIES:
            raise ValueError(f"cache policy {cache!r} is not one of {CACHE_POLICIES}")
        choice = resolve_backend(backend)
        try:
            self.size = os.stat(self.path).st_size
        except OSError as e:
            raise PrismError(e.errno, f"stat: {os.strerror(e.errno)}", str(self.path)) from None
        self.depth = depth
        self.request_bytes = request_bytes
        self.cache = cache
        self.pool = SlotPool(depth + EXTRA_SLOTS, request_bytes)
        self.requested = choice
        self.engine, self.reason = self._open_engine(choice.name, choice.reason, register)
        self.backend = self.engine.name
        self._residency: mmap.mmap | None = None
        if cache == "auto" and self.engine.direct and self.engine.cached and self.size > 0:
            self._residency = _map_for_residency(self.path)
        self._active: ChunkStream | None = None
        self._closed = False
        self.reads = {"page_cache": 0, "direct": 0}  # requests by path taken (cache policy)

    def _open_engine(self, name: str, reason: str, register: bool) -> tuple[Engine, str]:
        path, pool = self.path, self.pool
        if self.cache == "page" or name == "buffered":
            why = "page-cache reads requested" if self.cache == "page" else reason
            return ThreadEngine(path, pool, direct=False, cached=True), why
        cached = self.cache == "auto"
        refused = _direct_refused(path, pool)
        if refused:
            return ThreadEngine(path, pool, direct=False, cached=True), refused
        if name == "io_uring":
            return UringEngine(path, pool, direct=True, cached=cached, register=register), reason
        return ThreadEngine(path, pool, direct=True, cached=cached), reason

    def chunks(
        self,
        start: int = 0,
        stop: int | None = None,
        *,
        dtype: str | None = None,
        origin: int | None = None,
        element_base: int = 0,
    ) -> ChunkStream:
        """Chunks of bytes [start, stop) in order, as an async iterator (and context
        manager: `async with stream.chunks(a, b) as it: async for chunk in it`).

        With `dtype`, chunks are whole elements counted from byte `origin` (default
        `start`); `chunk.element` is then `element_base` + the element index from origin.
        """
        stop = self.size if stop is None else stop
        if not 0 <= start <= stop <= self.size:
            raise FormatError(
                f"{self.path}: range [{start}, {stop}) outside the file's {self.size} bytes"
            )
        if dtype is not None and dtype not in DTYPES:
            raise FormatError(f"{self.path}: unsupported dtype {dtype!r}")
        self._check_open()
        return ChunkStream(
            self, start, stop, dtype, start if origin is None else origin, element_base
        )

    async def read_into(self, start: int, stop: int, out: Any) -> None:
        """Copy bytes [start, stop) into `out`, a writable buffer of stop - start bytes."""
        dst = memoryview(out).cast("B")
        if len(dst) != stop - start:
            raise ValueError(f"buffer of {len(dst)} bytes for a range of {stop - start}")
        async with self.chunks(start, stop) as chunks:
            async for chunk in chunks:
                with chunk:
                    pos = chunk.offset - start
                    dst[pos : pos + chunk.nbytes] = chunk.data

    def resident(self, offset: int, length: int) -> bool:
        """Whether bytes [offset, offset + length) sit in the page cache (auto policy)."""
        if self._residency is None:
            return False
        length = min(length, self.size - offset)
        module, _ = native_module()
        return (
            length > 0 and module is not None and module.resident(self._residency, offset, length)
        )

    def stats(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "backend": self.backend,
            "reason": self.reason,
            "cache": self.cache,
            "depth": self.depth,
            "request_bytes": self.request_bytes,
            "slots": self.pool.nslots,
            "free_slots": self.pool.free,
            "cuda_pinned": self.pool.cuda_pinned,
            "reads": dict(self.reads),
            "engine": self.engine.stats(),
        }

    def _check_open(self) -> None:
        if self._closed:
            raise PrismError(errno_codes.EBADF, "stream is closed", str(self.path))

    async def aclose(self) -> None:
        """Drain any unfinished iteration (bounded), then release the engine."""
        if self._active is not None:
            await self._active.aclose()
        self.close()

    def close(self) -> None:
        """Release the engine synchronously. An iteration still in flight is drained by
        the engine itself (bounded; the io_uring ring cancels and waits, threads close
        their descriptors when the last read returns). Chunks still held stay valid."""
        if self._closed:
            return
        self._closed = True
        if self._active is not None:
            self._active._abandon()
        self.engine.close()
        self.pool.unpin_cuda()
        self._residency = None

    def __enter__(self) -> PrismStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> PrismStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ChunkStream:
    """One pass over a byte range: an async iterator of Chunks and an async context
    manager whose exit drains what is still in flight."""

    def __init__(
        self,
        stream: PrismStream,
        start: int,
        stop: int,
        dtype: str | None,
        origin: int,
        element_base: int,
    ) -> None:
        self._stream = stream
        self._engine = stream.engine
        self._pool = stream.pool
        self.start, self.stop, self.dtype = start, stop, dtype
        self._itemsize = DTYPES[dtype].itemsize if dtype else 1
        self._origin = origin
        self._element_base = element_base
        self._plan = plan_reads(
            start,
            stop,
            request_bytes=stream.request_bytes,
            align=ALIGN,
            itemsize=self._itemsize,
            origin=origin,
        )
        self._next: Read | None = next(self._plan, None)
        self._reading: dict[int, tuple[Read, int, bool]] = {}  # slot -> (read, filled, cached)
        self._ready: dict[int, tuple[Read, int]] = {}  # read index -> (read, slot)
        self._want = 0  # index of the next chunk to hand out
        self._started = False
        self._finished = False
        self._cancelling = False

    def __aiter__(self) -> ChunkStream:
        return self

    async def __aenter__(self) -> ChunkStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def __anext__(self) -> Chunk:
        if self._finished:
            raise StopAsyncIteration
        if not self._started:
            self._begin()
        try:
            chunk = await self._next_chunk()
        except BaseException:
            await self._drain()
            raise
        if chunk is None:
            self._finish()
            raise StopAsyncIteration
        return chunk

    def _begin(self) -> None:
        stream = self._stream
        stream._check_open()
        if stream._active is not None and stream._active is not self:
            raise PrismError(
                errno_codes.EBUSY,
                "another iteration of this stream is unfinished; finish it or aclose() it "
                "first (one iteration per stream at a time)",
                str(stream.path),
            )
        stream._active = self
        self._started = True

    async def _next_chunk(self) -> Chunk | None:
        # Trio's checkpoint contract without losing data: a cancellation can only land
        # before any state changes or while waiting for completions; once a chunk is
        # taken off `_ready`, the schedule point before returning it cannot raise.
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            self._fill()
            ready = self._ready.pop(self._want, None)
            if ready is not None:
                self._want += 1
                chunk = self._chunk(*ready)
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return chunk
            if self._next is None and not self._reading and not self._ready:
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return None
            if not self._reading:
                raise PrismError(
                    errno_codes.ENOBUFS,
                    f"all {self._pool.nslots} pool slots are held by unreleased chunks; "
                    f"release() chunks before asking for more",
                    str(self._stream.path),
                )
            done = self._engine.reap()
            if not done:
                await self._engine.wait()
                waited = True
                done = self._engine.reap()
            self._complete(done)

    def _fill(self) -> None:
        stream = self._stream
        while self._next is not None and len(self._reading) < stream.depth:
            slot = self._pool.acquire()
            if slot is None:
                return
            read = self._next
            cached = stream.cache == "auto" and stream.resident(read.offset, read.length)
            try:
                self._engine.submit(slot, read.offset, read.length, 0, cached)
            except BaseException:
                self._pool.release(slot)
                raise
            self._reading[slot] = (read, 0, cached)
            stream.reads["page_cache" if cached or not self._engine.direct else "direct"] += 1
            self._next = next(self._plan, None)

    def _complete(self, done: list[tuple[int, int, int, int]]) -> None:
        """Account for every completion of a reap, then raise the first error if any:
        stopping at the first would lose the slots of the completions after it."""
        error: Exception | None = None
        for slot, offset, length, result in done:
            try:
                self._complete_one(slot, offset, length, result)
            except (PrismError, FormatError) as e:
                error = error or e
        if error is not None:
            raise error

    def _complete_one(self, slot: int, offset: int, length: int, result: int) -> None:
        path = str(self._stream.path)
        read, filled, cached = self._reading.pop(slot)
        if result < 0:
            self._pool.release(slot)
            if self._cancelling and result == -errno_codes.ECANCELED:
                return
            raise PrismError(
                -result,
                f"{self._engine.name} read of {length} bytes at offset {offset}: "
                f"{os.strerror(-result)}",
                path,
            )
        filled += result
        if filled >= read.hi - read.offset:
            self._ready[read.index] = (read, slot)
            return
        if result == 0:
            self._pool.release(slot)
            raise FormatError(
                f"{path}: file ends at byte {offset}, inside the requested range "
                f"[{self.start}, {self.stop}) (was it truncated while open?)"
            )
        if self._engine.direct and not cached and filled % ALIGN:
            self._pool.release(slot)
            raise PrismError(
                errno_codes.EIO,
                f"O_DIRECT read at offset {offset} stopped at unaligned byte "
                f"{read.offset + filled} before the end of the range",
                path,
            )
        # A short read inside the range: continue it into the rest of the same slot.
        self._reading[slot] = (read, filled, cached)
        try:
            self._engine.submit(slot, read.offset + filled, read.length - filled, filled, cached)
        except BaseException:
            del self._reading[slot]
            self._pool.release(slot)
            raise

    def _chunk(self, read: Read, slot: int) -> Chunk:
        element = None
        if self.dtype is not None:
            element = self._element_base + (read.lo - self._origin) // self._itemsize
        return Chunk(
            self._pool, slot, read.lo - read.offset, read.lo, read.hi - read.lo, self.dtype, element
        )

    def _finish(self) -> None:
        self._finished = True
        if self._stream._active is self:
            self._stream._active = None

    async def aclose(self) -> None:
        """End the iteration: cancel and reap reads in flight (bounded), free ready slots."""
        if not self._finished:
            await self._drain()

    async def _drain(self) -> None:
        if self._finished:
            return
        self._cancelling = True
        self._next = None
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_TIMEOUT_S) as timer:
                if self._reading:
                    self._engine.cancel()
                while self._reading:
                    done = self._engine.reap()
                    if not done:
                        await self._engine.wait()
                        continue
                    for slot, *_ in done:
                        if self._reading.pop(slot, None) is not None:
                            self._pool.release(slot)
            if timer.cancelled_caught:
                # The kernel may still write these slots: never hand them out again.
                self._stream.close()
        finally:
            for _read, slot in self._ready.values():
                self._pool.release(slot)
            self._ready.clear()
            self._finish()

    def _abandon(self) -> None:
        """The stream is closing under this iteration: the engine drains the reads in
        flight; slots of completed reads go back now."""
        for _read, slot in self._ready.values():
            self._pool.release(slot)
        self._ready.clear()
        self._reading.clear()
        self._next = None
        self._finish()


def _direct_refused(path: Path, pool: SlotPool) -> str | None:
    """Try one aligned O_DIRECT read; the reason to fall back to the page cache, or None.

    Some filesystems refuse O_DIRECT at open (EINVAL: tmpfs before 6.6, some FUSE), others
    only at the first read; one 4 KiB read at offset 0 finds both before streaming starts.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
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


def _map_for_residency(path: Path) -> mmap.mmap | None:
    """A read-only shared mapping of the file for mincore; never touched, so it costs
    address space, not memory. None when the extension (mincore) is missing."""
    if native_module()[0] is None:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
