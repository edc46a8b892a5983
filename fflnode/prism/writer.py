"""Atomic, streaming safetensors writes.

Promise: a reader that opens `path` sees either the previous complete file or the new
complete file, never a partial one, whatever moment the writer process dies at. Data
goes to a temporary file in the same directory; `commit` fsyncs it, renames it over
`path` and fsyncs the directory. Tensors are written by byte range as they are produced
(pwrite at their offsets), so memory stays bounded by the caller's chunk size.
torch is imported only by callers that hand it tensors: writing raw bytes or numpy
arrays never loads it.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fflnode.errors import FormatError
from fflnode.prism.safetensors import (
    TORCH_DTYPE_NAMES,
    TensorInfo,
    build_header,
)
from fflnode.tensors import canonical_names

if TYPE_CHECKING:
    import torch

    from fflnode.tensors import FlatLayout

TMP_PREFIX = ".tmp-"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_torch_tensor(data: object) -> bool:
    # A torch tensor can only exist if torch was imported: no need to import it here.
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(data, torch_module.Tensor)


def _bytes_of(data: torch.Tensor | np.ndarray | bytes | memoryview) -> memoryview:
    if _is_torch_tensor(data):
        import torch  # already loaded: the caller handed us a tensor

        data = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return memoryview(data).cast("B")


class AtomicSafetensorsWriter:
    """Write one safetensors file atomically, tensor ranges in any order.

    Use as a context manager; leaving the block without `commit()` (an exception, a
    cancellation) deletes the temporary file and leaves `path` untouched.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Mapping[str, tuple[str, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header, self.tensors = build_header(specs, metadata)
        self.size = max((t.stop for t in self.tensors.values()), default=len(header))
        self.data_start = len(header)
        self.tmp = self.path.with_name(f"{TMP_PREFIX}{self.path.name}.{secrets.token_hex(4)}")
        self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(self._fd, self.size)
            os.pwrite(self._fd, header, 0)
        except BaseException:
            self.abort()
            raise
        self._committed = False

    @classmethod
    def for_flat(
        cls,
        path: str | os.PathLike[str],
        layout: FlatLayout,
        metadata: Mapping[str, str] | None = None,
    ) -> AtomicSafetensorsWriter:
        """A float32 file whose data buffer is exactly the flat vector of `layout`."""
        return cls(path, {s.name: ("F32", s.shape) for s in layout.slots}, metadata)

    def write_at(self, offset: int, data: torch.Tensor | np.ndarray | bytes | memoryview) -> None:
        """Write raw bytes at absolute file `offset` (inside the data buffer)."""
        view = _bytes_of(data)
        if offset < self.data_start or offset + len(view) > self.size:
            raise FormatError(
                f"{self.path}: write of {len(view)} bytes at {offset} outside the data buffer "
                f"[{self.data_start}, {self.size})"
            )
        assert self._fd is not None, "write after commit or abort"
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def write_tensor(self, name: str, data: torch.Tensor | np.ndarray) -> None:
        info = self._info(name)
        view = _bytes_of(data)
        if len(view) != info.nbytes:
            raise FormatError(
                f"{self.path}: tensor {name!r} needs {info.nbytes} bytes, got {len(view)}"
            )
        self.write_at(info.start, view)

    def write_flat(self, element_offset: int, data: torch.Tensor | np.ndarray) -> None:
        """Write float32 elements at `element_offset` of the flat vector (for_flat files)."""
        self.write_at(self.data_start + 4 * element_offset, data)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor {name!r} in this file") from None

    def commit(self) -> Path:
        assert self._fd is not None, "commit after commit or abort"
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        self._committed = True
        return self.path

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicSafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Atomically write in-memory tensors, canonical order, as one safetensors file."""
    specs = {}
    for name, t in tensors.items():
        try:
            specs[name] = (TORCH_DTYPE_NAMES[str(t.dtype)], tuple(t.shape))
        except KeyError:
            raise FormatError(f"tensor {name!r}: dtype {t.dtype} cannot be stored") from None
    with AtomicSafetensorsWriter(path, specs, metadata) as w:
        for name in canonical_names(tensors):
            w.write_tensor(name, tensors[name])
        return w.commit()


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete temporaries a killed writer left behind in `directory`; returns them."""
    stale = sorted(directory.glob(f"{TMP_PREFIX}*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
