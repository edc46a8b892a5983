"""BlockFile: out-of-core training state in one preallocated scratch file.

Owns: a file of named, fixed-size float32 regions (a model block's weights, its Adam m
and v, a spilled activation) and moving whole regions between it and tensors through
Prism: reads through a PrismStream (cache="direct"), writes through a WriteStream.

Layout (`BlockLayout`, sans-IO): regions in the order given, each starting on a 4 KiB
boundary and padded to the next one, so every request of every region is O_DIRECT
(the writer zero-fills a region's padding instead of sending its tail through the page
cache). The file is exactly the end of the last region and is preallocated
(posix_fallocate) when created, so a full disk is an error at start, not mid-step.

Promises: `read_into(name, out)` and `write_from(name, data)` move exactly the region's
4 x numel bytes (float32 and numel are checked first). A read and a write of the same
region wait for each other; a read of one region and a write of another run at once
(one engine each), so reading block k+1 overlaps writing back block k-1 while block k
is computed on in a worker thread. `write_from` returns when its writes have completed;
`sync` makes every completed write durable (fdatasync). Memory is the two pools,
(depth + 2) + depth slots of request_bytes (18 MiB at depth 8), whatever the file size,
and cold regions never enter the page cache (O_DIRECT both ways; where the filesystem
refuses O_DIRECT both directions fall back to the page cache and stats() says so).

Crash safety: none, by design. A block file is scratch state: the trainer rebuilds it
from its last atomic checkpoint (writer.AtomicSafetensorsWriter) at every start, and
`BlockFile` truncates any file it finds. What a kill -9 during `write_from` leaves: the
kernel completes the requests already issued to the device and drops those not yet
issued, so the region being written holds an unknown mix of old and new contents, torn
at sector granularity (512 B here: a device promises no more than one sector at a
time); every region whose `write_from` had returned holds its new contents (an O_DIRECT
completion means the device has the bytes); other regions are untouched. After a power
loss or a kernel crash, writes since the last `sync` may read back old, or as zeros
where preallocated extents had not been marked written yet. Nothing in the file says
which regions are whole (no header, checksum or generation), which is why it is never
trusted across a restart.

Must never: import torch unless handed a tensor, read or write a byte outside the
region named, or let the page cache hold the file's cold data.
"""

from __future__ import annotations

import errno as errno_codes
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from fflnode.errors import FormatError, PrismError
from fflnode.prism.device import sink_for
from fflnode.prism.stream import ALIGN, DEFAULT_DEPTH, REQUEST_BYTES, PrismStream
from fflnode.prism.write_stream import FILE_MODE, WriteStream

# Regions start on, and are padded to, this boundary: the page size, which satisfies the
# O_DIRECT alignment of any device (512 B or 4 KiB logical blocks) and the pool's slots.
BLOCK_ALIGN = ALIGN
ITEMSIZE = 4  # float32


@dataclass(frozen=True)
class Region:
    """A named float32 region: bytes [offset, offset + nbytes) of the file, padded with
    zeros to `offset + span` (span a multiple of BLOCK_ALIGN)."""

    name: str
    offset: int
    shape: tuple[int, ...]
    numel: int

    @property
    def nbytes(self) -> int:
        return ITEMSIZE * self.numel

    @property
    def span(self) -> int:
        return -(-self.nbytes // BLOCK_ALIGN) * BLOCK_ALIGN


class BlockLayout:
    """Where each region lives: in the order given, each at the next BLOCK_ALIGN boundary.
    `regions` maps a name to a shape (a tuple of ints) or an element count."""

    def __init__(self, regions: Mapping[str, int | Sequence[int]]) -> None:
        self.regions: dict[str, Region] = {}
        pos = 0
        for name, spec in regions.items():
            shape = (spec,) if isinstance(spec, int) else tuple(spec)
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"region {name!r}: shape {shape} is not non-negative integers")
            numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
            region = Region(name, pos, shape, numel)
            self.regions[name] = region
            pos += region.span
        self.size = pos  # bytes of the file

    def __getitem__(self, name: str) -> Region:
        return self.regions[name]

    def __contains__(self, name: object) -> bool:
        return name in self.regions

    def __len__(self) -> int:
        return len(self.regions)


class BlockFile:
    """A fresh block file at `path` (an existing file is truncated), preallocated for
    `regions` (name -> shape or element count, or a BlockLayout). Open synchronously;
    close with `aclose()` or `async with`.

    `backend`, `depth`, `request_bytes`: as for PrismStream and WriteStream (the
    `prism.backend` config value; FFLNODE_PRISM_BACKEND overrides it)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        regions: Mapping[str, int | Sequence[int]] | BlockLayout,
        *,
        backend: str | None = "auto",
        depth: int = DEFAULT_DEPTH,
        request_bytes: int = REQUEST_BYTES,
    ) -> None:
        self.path = Path(path)
        self.layout = regions if isinstance(regions, BlockLayout) else BlockLayout(regions)
        _create_preallocated(self.path, self.layout.size)
        self._writer = WriteStream(
            self.path, backend=backend, depth=depth, request_bytes=request_bytes
        )
        try:
            self._reader = PrismStream(
                self.path, backend=backend, depth=depth, request_bytes=request_bytes, cache="direct"
            )
        except BaseException:
            self._writer.close()
            raise
        self._read_lock = trio.Lock()  # one iteration per PrismStream at a time
        self._region_locks: dict[str, trio.Lock] = {}
        self._closed = False

    def region(self, name: str) -> Region:
        try:
            return self.layout[name]
        except KeyError:
            raise FormatError(f"{self.path}: no region {name!r} in this block file") from None

    async def read_into(self, name: str, out: Any) -> None:
        """Fill `out` (a float32 numpy array or torch tensor, CPU or CUDA, contiguous,
        with the region's element count) with region `name`."""
        region = self.region(name)
        _check_float32(out, region, self.path, "destination")
        async with self._region_lock(name), self._read_lock:
            self._check_open()
            sink = sink_for(out, region.nbytes)
            start = region.offset
            try:
                async with self._reader.chunks(start, start + region.nbytes) as chunks:
                    async for chunk in chunks:
                        await sink.put(chunk, chunk.offset - start)  # the sink owns it now
                await sink.finish()
            except BaseException:
                await sink.abort()
                raise

    async def write_from(self, name: str, data: Any) -> None:
        """Write `data` (a float32 numpy array or tensor on any device, contiguous, with
        the region's element count) into region `name`; returns when the writes have
        completed (durable after `sync`). Cancelled, it leaves the region torn."""
        region = self.region(name)
        _check_float32(data, region, self.path, "source")
        async with self._region_lock(name):
            self._check_open()
            await self._writer.write(region.offset, data, pad=True)
            await self._writer.flush()

    async def sync(self) -> None:
        """fdatasync: every completed write survives a power loss once this returns."""
        self._check_open()
        await self._writer.sync()

    def _region_lock(self, name: str) -> trio.Lock:
        lock = self._region_locks.get(name)
        if lock is None:
            lock = self._region_locks[name] = trio.Lock()
        return lock

    def _check_open(self) -> None:
        if self._closed:
            raise PrismError(errno_codes.EBADF, "block file is closed", str(self.path))

    def stats(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "regions": len(self.layout),
            "size": self.layout.size,
            "pool_bytes": self._reader.pool.nbytes + self._writer.pool.nbytes,
            "read": self._reader.stats(),
            "write": self._writer.stats(),
        }

    async def aclose(self) -> None:
        """Wait for writes in flight (bounded), close both engines; raises a write error
        that no call has raised yet."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._writer.aclose()
        finally:
            await self._reader.aclose()

    def close(self) -> None:
        """Close synchronously (engines wait, bounded, for writes in flight)."""
        self._closed = True
        self._writer.close()
        self._reader.close()

    def __enter__(self) -> BlockFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> BlockFile:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.aclose()
        else:  # the caller's exception wins
            self._closed = True
            await self._writer.__aexit__(exc_type, *exc)
            await self._reader.aclose()


def _create_preallocated(path: Path, size: int) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    except OSError as e:
        raise PrismError(e.errno, f"create: {os.strerror(e.errno)}", str(path)) from None
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as e:
        os.ftruncate(fd, 0)  # hand back what a refused preallocation did allocate
        raise PrismError(
            e.errno, f"preallocate {size} bytes: {os.strerror(e.errno)}", str(path)
        ) from None
    finally:
        os.close(fd)


def _check_float32(value: Any, region: Region, path: Path, role: str) -> None:
    dtype = getattr(value, "dtype", None)
    numel = value.numel() if hasattr(value, "numel") and callable(value.numel) else None
    if numel is None:
        numel = getattr(value, "size", None)
    if str(dtype) not in ("float32", "torch.float32"):
        raise ValueError(
            f"{path}: region {region.name!r} holds float32; the {role} is {dtype or type(value)}"
        )
    if numel != region.numel:
        raise ValueError(
            f"{path}: region {region.name!r} holds {region.numel} elements; the {role} has {numel}"
        )
