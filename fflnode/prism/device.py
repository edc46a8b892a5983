"""Moving streamed chunks into a destination tensor (host memory, or a GPU), and source
bytes into pool slots for a write.

Owns: the last hop of a Prism read and the first hop of a Prism write. On CUDA the pool
is page-locked once (cudaHostRegister through torch.cuda.cudart()), each chunk is copied
on a side stream with `non_blocking=True`, and its slot is released only when an event
recorded after the copy has completed, so the next reads are in flight while copies
run. Other devices get a synchronous copy; host tensors and buffers a memcpy.

Promises: a slot is never released while a device copy may still read it; `finish`
returns only when every copy has landed and the caller's current stream is ordered
after them; at most MAX_PENDING_COPIES chunks are held by copies at once (the pool's
spare slots), so the reader always has slots for its queue. A write source copies into
a slot synchronously (a memcpy, or a device-to-host copy into the page-locked pool), so
the slot holds the bytes the moment `copy_into` returns and the caller's tensor is free.

Must never: import torch unless a torch destination or source was given (callers that
read into numpy never load it).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from fflnode.prism.pool import SlotPool
from fflnode.prism.stream import EXTRA_SLOTS, Chunk

if TYPE_CHECKING:
    import torch

# Copies in flight may hold the pool's spare slots, no more: the reader keeps `depth`.
MAX_PENDING_COPIES = EXTRA_SLOTS


class HostSink:
    """Copy chunks into a writable host buffer (numpy array, bytearray, CPU tensor).

    Every sink takes ownership of the chunks it is given: it releases each one when the
    copy out of its slot is complete, also when it fails."""

    def __init__(self, out: Any, nbytes: int) -> None:
        self._dst = _host_bytes(out)
        if len(self._dst) != nbytes:
            raise ValueError(f"destination of {len(self._dst)} bytes for {nbytes} bytes of data")

    async def put(self, chunk: Chunk, pos: int) -> None:
        with chunk:
            self._dst[pos : pos + chunk.nbytes] = chunk.data

    async def finish(self) -> None:
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        """Nothing outstanding: every put already copied and released its chunk."""


class CudaSink:
    """Copy chunks into a CUDA tensor on a side stream, overlapping the next reads."""

    def __init__(self, out: torch.Tensor, nbytes: int) -> None:
        import torch

        self._torch = torch
        self._out = out
        self._dst = _device_bytes(out, nbytes)
        self.stream = torch.cuda.Stream(device=out.device)
        self._pending: deque[tuple[Chunk, torch.cuda.Event]] = deque()

    async def put(self, chunk: Chunk, pos: int) -> None:
        torch = self._torch
        try:
            chunk.pool.pin_cuda()
            src = torch.from_numpy(chunk.numpy(np.uint8))
            with torch.cuda.stream(self.stream):
                self._dst[pos : pos + chunk.nbytes].copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
        except BaseException:
            # Nothing was queued, or the queued copy is ordered before anything else on
            # the side stream: wait for it before the slot can be reused.
            self.stream.synchronize()
            chunk.release()
            raise
        self._pending.append((chunk, done))
        while self._pending and self._pending[0][1].query():
            self._pending.popleft()[0].release()
        while len(self._pending) > MAX_PENDING_COPIES:
            await self._wait_oldest()

    async def _wait_oldest(self) -> None:
        chunk, done = self._pending[0]
        await trio.to_thread.run_sync(done.synchronize)
        self._pending.popleft()
        chunk.release()

    async def finish(self) -> None:
        while self._pending:
            await self._wait_oldest()
        self._torch.cuda.current_stream(self._out.device).wait_stream(self.stream)

    async def abort(self) -> None:
        """Wait (shielded) for copies already queued: their slots must not be reused."""
        with trio.CancelScope(shield=True):
            while self._pending:
                await self._wait_oldest()


class TorchSink:
    """Any other torch device: a synchronous copy per chunk."""

    def __init__(self, out: torch.Tensor, nbytes: int) -> None:
        import torch

        self._torch = torch
        self._dst = _device_bytes(out, nbytes)

    async def put(self, chunk: Chunk, pos: int) -> None:
        with chunk:
            src = self._torch.from_numpy(chunk.numpy(np.uint8))
            self._dst[pos : pos + chunk.nbytes].copy_(src)
        await trio.lowlevel.checkpoint()

    async def finish(self) -> None:
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        """Copies were synchronous: nothing outstanding."""


Sink = HostSink | CudaSink | TorchSink


def sink_for(out: Any, nbytes: int) -> Sink:
    """The sink for destination `out` of `nbytes` bytes."""
    if _is_torch_tensor(out):
        if out.device.type == "cpu":
            return HostSink(out, nbytes)
        if out.device.type == "cuda":
            return CudaSink(out, nbytes)
        return TorchSink(out, nbytes)
    return HostSink(out, nbytes)


def _is_torch_tensor(value: object) -> bool:
    import sys

    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


def _host_bytes(out: Any) -> memoryview:
    if _is_torch_tensor(out):
        if not out.is_contiguous():
            raise ValueError("destination tensor must be contiguous")
        import torch

        # A CPU tensor shares its memory with this byte array (bfloat16 has no numpy dtype).
        out = out.reshape(-1).view(torch.uint8).numpy()
    if isinstance(out, np.ndarray):
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("destination array must be C-contiguous and writeable")
        return memoryview(out.reshape(-1).view(np.uint8))
    view = memoryview(out)
    if view.readonly or not view.c_contiguous:
        raise ValueError("destination buffer must be writable and C-contiguous")
    return view.cast("B") if view.nbytes else memoryview(bytearray())


def _device_bytes(out: torch.Tensor, nbytes: int) -> torch.Tensor:
    import torch

    if not out.is_contiguous():
        raise ValueError("destination tensor must be contiguous")
    flat = out.view(-1).view(torch.uint8)
    if flat.numel() != nbytes:
        raise ValueError(f"destination of {flat.numel()} bytes for {nbytes} bytes of data")
    return flat


# ---------------------------------------------------------------------- write sources


class HostSource:
    """Bytes in host memory (numpy array, bytes, buffer, CPU tensor) to copy into slots."""

    def __init__(self, data: Any) -> None:
        self._src = _host_source_bytes(data)
        self.nbytes = len(self._src)

    def prepare(self, pool: SlotPool) -> None:
        """Nothing to set up for host memory."""

    def copy_into(self, dst: memoryview, pos: int) -> None:
        """Copy source bytes [pos, pos + len(dst)) into `dst`."""
        dst[:] = self._src[pos : pos + len(dst)]


class TorchSource:
    """A tensor on a device: copied into slots by torch, synchronously (into the
    page-locked pool when the device is CUDA, so the copy is one DMA)."""

    def __init__(self, data: torch.Tensor) -> None:
        import torch

        self._torch = torch
        if not data.is_contiguous():
            raise ValueError("source tensor must be contiguous")
        self._src = data.detach().reshape(-1).view(torch.uint8)
        self._cuda = data.device.type == "cuda"
        self.nbytes = self._src.numel()

    def prepare(self, pool: SlotPool) -> None:
        if self._cuda:
            pool.pin_cuda()

    def copy_into(self, dst: memoryview, pos: int) -> None:
        out = self._torch.from_numpy(np.frombuffer(dst, dtype=np.uint8))
        out.copy_(self._src[pos : pos + len(dst)])


Source = HostSource | TorchSource


def source_for(data: Any) -> Source:
    """The write source for `data`: a buffer, numpy array or tensor (any device)."""
    if _is_torch_tensor(data) and data.device.type != "cpu":
        return TorchSource(data)
    return HostSource(data)


def _host_source_bytes(data: Any) -> memoryview:
    if _is_torch_tensor(data):
        if not data.is_contiguous():
            raise ValueError("source tensor must be contiguous")
        import torch

        data = data.detach().reshape(-1).view(torch.uint8).numpy()
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise ValueError("source array must be C-contiguous")
        return memoryview(data.reshape(-1).view(np.uint8))
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("source buffer must be C-contiguous")
    return view.cast("B") if view.nbytes else memoryview(b"")
