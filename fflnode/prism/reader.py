"""Open a safetensors file and read validated byte ranges with plain pread.

This is the simple, always-available reader. The streaming backends (io_uring, thread
pool) serve the same ranges through a bounded buffer pool for large models. torch is
imported only when a tensor is asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fflnode.errors import FormatError
from fflnode.prism.safetensors import (
    DTYPES,
    HEADER_PREFIX,
    Header,
    TensorInfo,
    parse_header,
    read_header_size,
)

if TYPE_CHECKING:
    import torch
from fflnode.tensors import ModelHasher


def read_exactly(fd: int, n: int, offset: int, source: str) -> bytes:
    out = bytearray(n)
    view = memoryview(out)
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise FormatError(f"{source}: unexpected end of file at byte {offset + done}")
        done += got
    return bytes(out)


def read_header_fd(fd: int, source: str) -> Header:
    size = os.fstat(fd).st_size
    prefix = read_exactly(fd, HEADER_PREFIX, 0, source) if size >= HEADER_PREFIX else b""
    n = read_header_size(prefix, source, size)
    return parse_header(read_exactly(fd, n, HEADER_PREFIX, source), source, size)


class SafetensorsFile:
    """A safetensors file opened for reading by byte range. Close it, or use `with`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.header = read_header_fd(self._fd, str(self.path))
        except BaseException:
            os.close(self._fd)
            raise

    def read_range(self, start: int, stop: int) -> bytes:
        if not self.header.data_start <= start <= stop <= self.header.file_size:
            raise FormatError(
                f"{self.path}: range [{start}, {stop}) outside the data buffer "
                f"[{self.header.data_start}, {self.header.file_size})"
            )
        return read_exactly(self._fd, stop - start, start, str(self.path))

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor {name!r}") from None

    def tensor(self, name: str) -> torch.Tensor:
        import torch

        info = self.tensor_info(name)
        arr = np.frombuffer(bytearray(self.read_range(info.start, info.stop)), DTYPES[info.dtype])
        t = torch.from_numpy(arr)
        if info.dtype == "BF16":
            t = t.view(torch.bfloat16)
        return t.reshape(info.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name) for name in self.header.names()}

    def model_hash(self, piece_bytes: int = 4 << 20) -> str:
        """The model hash (fflnode.tensors) of this file, read in bounded pieces."""
        hasher = ModelHasher()
        for name in self.header.names():
            info = self.header.tensors[name]
            hasher.begin_tensor(name)
            for pos in range(info.start, info.stop, piece_bytes):
                hasher.update(self.read_range(pos, min(pos + piece_bytes, info.stop)))
        return hasher.hexdigest()

    def read_flat(self, lo: int, hi: int) -> np.ndarray:
        """float32 elements [lo, hi) of a canonical flat file (see is_canonical_flat)."""
        start = self.header.data_start + 4 * lo
        stop = self.header.data_start + 4 * hi
        return np.frombuffer(bytearray(self.read_range(start, stop)), dtype="<f4")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
