"""The slot pool: page-aligned, pre-faulted read buffers carved from one anonymous mmap.

Owns: the only memory Prism reads file data into. Every backend (io_uring, threads,
buffered) reads into these slots, and every chunk a consumer sees is a view of one.

Promises: each slot starts on a page boundary (O_DIRECT needs aligned addresses) and is
faulted in when the pool is created (a write per page), so the hot path takes no page
faults and the process's RSS for reading is fixed at creation: `nslots * slot_size`
(rounded up to a huge page), whatever the file size.

Huge pages, measured: the pool asks for transparent huge pages (MADV_HUGEPAGE on a
2 MiB-aligned region), so a 1 MiB slot is physically contiguous. Here the virtio disk
takes at most 254 segments per request, and a 1 MiB O_DIRECT read into 256 scattered
4 KiB pages is split into two device requests; from a contiguous slot it is one. Cold
reads at depth 8: 1.5 GB/s with 4 KiB pages, 2.8 GB/s with huge pages (fio, same run:
2.1). Where THP is off the pool falls back to small pages, still aligned and faulted.

A slot has at most one owner at a time; `free` is back to `nslots` once every chunk is
released and every read reaped.

Must never: grow, hand out a slot twice, or unmap memory the kernel may still write.
The mapping is never closed explicitly: it goes away when the last view of it and the
ring's buffer export are gone, so a stale view can never point at unmapped memory.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

PAGE_SIZE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20  # x86-64 PMD size: what a transparent huge page maps
# A pool above 1 GiB would be a misconfiguration: depth + 2 slots of 1 MiB is the design
# point (DESIGN.md), and io_uring registers at most 1 GiB per buffer.
MAX_POOL_BYTES = 1 << 30


class SlotPool:
    """`nslots` buffers of `slot_size` bytes (a multiple of the page size)."""

    def __init__(self, nslots: int, slot_size: int) -> None:
        if nslots < 1 or slot_size < PAGE_SIZE or slot_size % PAGE_SIZE:
            raise ValueError(
                f"pool of {nslots} slots of {slot_size} bytes: need at least one slot of a "
                f"positive multiple of {PAGE_SIZE} bytes"
            )
        if nslots * slot_size > MAX_POOL_BYTES:
            raise ValueError(
                f"pool of {nslots} x {slot_size} bytes exceeds the {MAX_POOL_BYTES}-byte limit"
            )
        self.nslots = nslots
        self.slot_size = slot_size
        self.nbytes = nslots * slot_size
        # Over-allocate by one huge page so a 2 MiB-aligned region of nbytes fits inside;
        # only that region is ever touched, so only it counts in RSS.
        self.memory = mmap.mmap(
            -1, self.nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        self.huge_pages_advised = _advise_huge_pages(self.memory)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        self._offset = (-base) % HUGE_PAGE
        self._view = memoryview(self.memory)[self._offset : self._offset + self.nbytes]
        # Fault every page in now (a write, so they are private pages, not the zero page).
        np.frombuffer(self._view, dtype=np.uint8)[::PAGE_SIZE] = 0
        self.buffer = self._view  # what an engine registers and reads into
        self._free = list(range(nslots - 1, -1, -1))
        self._owned = [False] * nslots
        self.cuda_pinned = False
        self.cuda_pin_error: str | None = None

    @property
    def free(self) -> int:
        """Slots not owned by a read in flight, a completed read or a chunk."""
        return len(self._free)

    @property
    def address(self) -> int:
        """Address of slot 0 (2 MiB-aligned)."""
        holder = ctypes.c_char.from_buffer(self.memory)
        try:
            return ctypes.addressof(holder) + self._offset
        finally:
            del holder

    def acquire(self) -> int | None:
        """A free slot's index, now owned by the caller; None when every slot is taken."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._owned[slot] = True
        return slot

    def release(self, slot: int) -> None:
        """Give `slot` back. Releasing a slot that is not owned is a bug and raises."""
        if not self._owned[slot]:
            raise RuntimeError(f"slot {slot} released twice")
        self._owned[slot] = False
        self._free.append(slot)

    def view(self, slot: int) -> memoryview:
        """The whole of `slot` as a writable byte view."""
        start = slot * self.slot_size
        return self._view[start : start + self.slot_size]

    def pin_cuda(self) -> bool:
        """Page-lock the pool for asynchronous host-to-device copies (cudaHostRegister).

        Idempotent. Returns False, with the reason in `cuda_pin_error`, when CUDA refuses;
        copies then still work, synchronously staged by the driver.
        """
        if self.cuda_pinned or self.cuda_pin_error is not None:
            return self.cuda_pinned
        import torch  # only a caller that copies to a GPU pays for torch

        err = int(torch.cuda.cudart().cudaHostRegister(self.address, self.nbytes, 0))
        if err == 0:
            self.cuda_pinned = True
        else:
            self.cuda_pin_error = f"cudaHostRegister of {self.nbytes} bytes failed: cudaError {err}"
        return self.cuda_pinned

    def unpin_cuda(self) -> None:
        if self.cuda_pinned:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.address)
            self.cuda_pinned = False


def _advise_huge_pages(memory: mmap.mmap) -> bool:
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return False
    try:
        memory.madvise(advice)
    except OSError:  # THP compiled out or disabled: small pages still work
        return False
    return True
