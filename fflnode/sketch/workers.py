"""Projection workers: run transforms off the trio thread, with bounded work in flight.

Owns how the node's event loop hands projection work (rotations, sketches, encodes) to
compute: `ProjectionPool.run(fn, *args)` awaits `fn(*args)` executed in a worker thread
via `trio.to_thread.run_sync`, never on the trio thread, with at most `workers` calls
running at once (a trio.CapacityLimiter; callers beyond that wait their turn in FIFO
order). On a CUDA device each worker slot owns one CUDA stream: the call runs inside
`torch.cuda.stream(slot.stream)` and the slot's stream is synchronized in the worker
thread before the result is handed back, so trio never waits on the GPU and results are
complete when they arrive. On the CPU the slots are plain threads.

CPU note for whoever configures the process: run CPU workers with one torch intra-op
thread (torch.set_num_threads(1), a process-wide setting this module leaves alone) and
get parallelism from the workers. On the 2-core reference machine, two intra-op threads
made each sketch operation ~30x slower whenever another process held a core.

`map_ordered` pipelines a sequence through the pool: at most `depth` items in flight,
results consumed in input order (so sums over results are bit-reproducible whatever
the thread timing).

Must never: run fn on the trio thread, abandon a running call on cancellation (the
thread is waited for, so buffers it uses stay alive), or start unbounded work.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import trio

from fflnode.errors import ConfigError

T = TypeVar("T")
A = TypeVar("A")

# Two CPU workers: this project's reference machine has 2 cores, and torch's own
# intra-op threads share them; more threads only contend.
DEFAULT_CPU_WORKERS = 2
# Two CUDA streams overlap one worker's host-side work (hashing, packing, copies) with
# another's kernels; more rarely helps a single GPU with memory-bound transforms.
DEFAULT_GPU_WORKERS = 2
MAX_WORKERS = 64


@dataclass
class WorkerSlot:
    """One worker: its index and, on CUDA, its own stream."""

    index: int
    stream: Any = None  # torch.cuda.Stream on CUDA devices


@dataclass
class PoolStats:
    """Counters for observing the bound (tests, metrics)."""

    running: int = 0
    max_running: int = 0
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ProjectionPool:
    """A bounded pool of projection workers on one device (GPU if present, else CPU)."""

    def __init__(self, workers: int | None = None, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"projection pool: device {self.device} asked for, no CUDA here")
        gpu = self.device.type == "cuda"
        n = DEFAULT_GPU_WORKERS if gpu else DEFAULT_CPU_WORKERS
        n = n if workers is None else workers
        if not 1 <= n <= MAX_WORKERS:
            raise ConfigError(f"projection pool: workers must be in [1, {MAX_WORKERS}], got {n}")
        self.workers = n
        self._slots = [
            WorkerSlot(i, torch.cuda.Stream(device=self.device) if gpu else None) for i in range(n)
        ]
        self._free = list(reversed(self._slots))
        self._limiter = trio.CapacityLimiter(n)
        self.stats = PoolStats()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a worker thread (on this pool's device stream); its result."""
        async with self._limiter:
            slot = self._free.pop()  # a free slot exists: at most `workers` callers here
            try:
                return await trio.to_thread.run_sync(self._call, slot, fn, args)
            finally:
                self._free.append(slot)

    def _call(self, slot: WorkerSlot, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self.stats.lock:
            self.stats.running += 1
            self.stats.calls += 1
            self.stats.max_running = max(self.stats.max_running, self.stats.running)
        try:
            if slot.stream is None:
                return fn(*args)
            with torch.cuda.stream(slot.stream):
                result = fn(*args)
            slot.stream.synchronize()
            return result
        finally:
            with self.stats.lock:
                self.stats.running -= 1

    async def map_ordered(
        self,
        fn: Callable[[A], T],
        items: Iterable[A],
        consume: Callable[[T], Awaitable[None]],
        depth: int | None = None,
    ) -> int:
        """Run fn over `items` with at most `depth` (default: workers) items in flight;
        await consume(result) in input order. Returns the number of items."""
        depth = depth or self.workers
        if depth < 1:
            raise ConfigError(f"projection pipeline depth must be >= 1, got {depth}")
        send, recv = trio.open_memory_channel[_Pending[T]](depth - 1)
        count = 0

        async def fill(p: _Pending[T], item: A) -> None:
            p.value = await self.run(fn, item)
            p.done.set()

        async def produce(nursery: trio.Nursery) -> None:
            nonlocal count
            async with send:
                for item in items:
                    p: _Pending[T] = _Pending()
                    await send.send(p)  # blocks while `depth` results await consumption
                    nursery.start_soon(fill, p, item)
                    count += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce, nursery)
            async with recv:
                async for p in recv:
                    await p.done.wait()
                    await consume(p.value)  # type: ignore[arg-type]
        return count


class _Pending(Generic[T]):
    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: T | None = None
