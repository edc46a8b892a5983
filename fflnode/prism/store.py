"""TensorStore: a safetensors checkpoint (one file, or shards with an index) as a stream.

Owns: mapping what the node asks for (a tensor, a byte range of a file, elements
[lo, hi) of the flat parameter vector in canonical order) onto byte ranges of files,
and streaming them through Prism streams (stream.py), one per file being read.

Promises: opening validates everything before any tensor is read: every header
strictly (safetensors.parse_header), an index strictly (parse_index) and against its
shards (each shard holds exactly the tensors the index maps to it, total_size matches).
Streams hand out zero-copy chunks in order; `read_into` copies into a caller buffer,
numpy array or torch tensor (a CUDA tensor through pinned slots and a side stream).
Memory is the pools of the streams in use: (depth + 2) x 1 MiB each, whatever the model
size; at most MAX_IDLE_STREAMS stay open between reads.

Must never: import torch unless the caller asks for a torch result, or read a byte
that a validated header did not describe.
"""

from __future__ import annotations

import errno as errno_codes
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fflnode.errors import FormatError, PrismError
from fflnode.prism.device import Sink, sink_for
from fflnode.prism.safetensors import (
    DTYPES,
    HEADER_PREFIX,
    INDEX_SUFFIX,
    MAX_INDEX_BYTES,
    Header,
    ShardIndex,
    TensorInfo,
    parse_header,
    parse_index,
    read_header_size,
)
from fflnode.prism.stream import DEFAULT_DEPTH, REQUEST_BYTES, Chunk, ChunkStream, PrismStream
from fflnode.tensors import canonical_names

if TYPE_CHECKING:
    import torch

# Streams kept open between reads: the flat vector walks the shards in turn, so one per
# file being read plus one for a concurrent reader; each holds (depth + 2) MiB of pool.
MAX_IDLE_STREAMS = 2
FLAT_DTYPE = "F32"  # the flat vector is float32 (fflnode.tensors.PARAM_DTYPE)
FLAT_ITEMSIZE = 4
# safetensors dtype -> torch attribute name (torch >= 2.3 has the unsigned ones).
TORCH_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}


@dataclass(frozen=True)
class Piece:
    """Bytes [start, stop) of `file`; elements of `dtype` counted from byte `origin`,
    numbered from `element_base` in the caller's coordinates."""

    file: str
    start: int
    stop: int
    dtype: str | None
    origin: int
    element_base: int


class TensorStore:
    """A validated checkpoint, streamed on demand. Open with `TensorStore.open(path)`."""

    def __init__(
        self,
        directory: Path,
        headers: dict[str, Header],
        weight_map: dict[str, str],
        *,
        backend: str | None,
        depth: int,
        cache: str,
        request_bytes: int,
    ) -> None:
        self.directory = directory
        self.headers = headers
        self.weight_map = weight_map
        self._options: dict[str, Any] = {
            "backend": backend,
            "depth": depth,
            "cache": cache,
            "request_bytes": request_bytes,
        }
        self._names = canonical_names(weight_map)
        self._idle: list[PrismStream] = []
        self._open_streams: set[PrismStream] = set()
        self._flat: list[tuple[str, int, int]] | None = None
        self._closed = False

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        backend: str | None = "auto",
        depth: int = DEFAULT_DEPTH,
        cache: str = "auto",
        request_bytes: int = REQUEST_BYTES,
    ) -> TensorStore:
        """Open a `.safetensors` file, a `*.index.json`, or a directory holding exactly
        one of either. Validates every header (and the index) before returning."""
        path = Path(path)
        if path.is_dir():
            path = _only_checkpoint_in(path)
        options = {
            "backend": backend,
            "depth": depth,
            "cache": cache,
            "request_bytes": request_bytes,
        }
        if path.name.endswith(INDEX_SUFFIX):
            index = parse_index(_read_small(path, MAX_INDEX_BYTES), str(path))
            headers = {f: read_header(path.parent / f) for f in index.files()}
            _check_index_against_shards(path, index, headers)
            return cls(path.parent, headers, dict(index.weight_map), **options)
        header = read_header(path)
        weight_map = dict.fromkeys(header.tensors, path.name)
        return cls(path.parent, {path.name: header}, weight_map, **options)

    # ------------------------------------------------------------------ layout

    def names(self) -> list[str]:
        """Tensor names in canonical order."""
        return list(self._names)

    def info(self, name: str) -> TensorInfo:
        return self.headers[self.file_of(name)].tensors[name]

    def file_of(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise FormatError(f"{self.directory}: no tensor {name!r} in this checkpoint") from None

    @property
    def files(self) -> list[str]:
        return sorted(self.headers)

    def is_flat_float32(self) -> bool:
        """True when every tensor is float32, so the flat vector is defined."""
        return all(self.info(n).dtype == FLAT_DTYPE for n in self._names)

    @property
    def numel(self) -> int:
        """Elements of the flat parameter vector (float32 checkpoints only)."""
        layout = self._flat_layout()
        return layout[-1][1] + layout[-1][2] if layout else 0

    def _flat_layout(self) -> list[tuple[str, int, int]]:
        if self._flat is None:
            if not self.is_flat_float32():
                bad = next(n for n in self._names if self.info(n).dtype != FLAT_DTYPE)
                raise FormatError(
                    f"{self.directory}: tensor {bad!r} is {self.info(bad).dtype}; the flat "
                    f"vector needs every tensor {FLAT_DTYPE}"
                )
            layout, pos = [], 0
            for name in self._names:
                numel = self.info(name).numel
                layout.append((name, pos, numel))
                pos += numel
            self._flat = layout
        return self._flat

    def flat_pieces(self, lo: int, hi: int) -> list[Piece]:
        """Byte pieces holding flat elements [lo, hi); neighbours that are contiguous in
        one file merge, so a canonical flat file (Header.is_canonical_flat) is one piece."""
        if not 0 <= lo <= hi <= self.numel:
            raise FormatError(
                f"{self.directory}: flat range [{lo}, {hi}) outside the {self.numel}-element vector"
            )
        pieces: list[Piece] = []
        for name, offset, numel in self._flat_layout():
            first, last = max(lo, offset), min(hi, offset + numel)
            if first >= last:
                continue
            info, file = self.info(name), self.file_of(name)
            start = info.start + (first - offset) * FLAT_ITEMSIZE
            stop = info.start + (last - offset) * FLAT_ITEMSIZE
            prev = pieces[-1] if pieces else None
            if prev is not None and prev.file == file and prev.stop == start:
                pieces[-1] = Piece(
                    file, prev.start, stop, FLAT_DTYPE, prev.origin, prev.element_base
                )
            else:
                pieces.append(Piece(file, start, stop, FLAT_DTYPE, start, first))
        return pieces

    # ------------------------------------------------------------------ streaming

    def tensor_chunks(self, name: str, lo: int = 0, hi: int | None = None) -> StoreChunks:
        """Chunks of elements [lo, hi) of tensor `name` (flattened), typed by its dtype;
        `chunk.element` is the index within the tensor."""
        info, file = self.info(name), self.file_of(name)
        hi = info.numel if hi is None else hi
        if not 0 <= lo <= hi <= info.numel:
            raise FormatError(
                f"{self.directory / file}: elements [{lo}, {hi}) outside tensor {name!r} "
                f"of {info.numel}"
            )
        size = DTYPES[info.dtype].itemsize
        piece = Piece(
            file, info.start + lo * size, info.start + hi * size, info.dtype, info.start, 0
        )
        return StoreChunks(self, [piece])

    def byte_chunks(self, start: int, stop: int, file: str | None = None) -> StoreChunks:
        """Chunks of raw bytes [start, stop) of `file` (default: the only file)."""
        file = self._file_arg(file)
        size = self.headers[file].file_size
        if not 0 <= start <= stop <= size:
            raise FormatError(
                f"{self.directory / file}: range [{start}, {stop}) outside its {size} bytes"
            )
        return StoreChunks(self, [Piece(file, start, stop, None, start, 0)])

    def flat_chunks(self, lo: int = 0, hi: int | None = None) -> StoreChunks:
        """Chunks of flat float32 elements [lo, hi) in canonical order; `chunk.element`
        is the flat index of its first element."""
        hi = self.numel if hi is None else hi
        return StoreChunks(self, self.flat_pieces(lo, hi))

    async def read_into(self, lo: int, hi: int, out: Any) -> None:
        """Copy flat elements [lo, hi) into `out`: a float32 numpy array or buffer of
        4 * (hi - lo) bytes, or a torch tensor (CPU, or CUDA via pinned slots)."""
        nbytes = (hi - lo) * FLAT_ITEMSIZE
        await _drain_into(
            self.flat_chunks(lo, hi), sink_for(out, nbytes), lambda c: (c.element - lo) * 4
        )

    async def read_bytes_into(
        self, start: int, stop: int, out: Any, file: str | None = None
    ) -> None:
        """Copy raw bytes [start, stop) of `file` into `out` (a buffer or tensor)."""
        await _drain_into(
            self.byte_chunks(start, stop, file),
            sink_for(out, stop - start),
            lambda c: c.offset - start,
        )

    async def read_tensor(self, name: str) -> np.ndarray:
        """A fresh numpy array holding tensor `name` (BF16 as raw uint16 words)."""
        info = self.info(name)
        out = np.empty(info.shape, dtype=DTYPES[info.dtype])
        await self._fill_tensor(name, out)
        return out

    async def load_tensor(
        self, name: str, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """A fresh torch tensor holding `name`, on `device` (default CPU); a CUDA
        destination is filled from pinned slots on a side stream."""
        import torch

        info = self.info(name)
        dtype = getattr(torch, TORCH_DTYPES[info.dtype])
        out = torch.empty(info.shape, dtype=dtype, device=device or "cpu")
        await self._fill_tensor(name, out)
        return out

    async def _fill_tensor(self, name: str, out: Any) -> None:
        info = self.info(name)
        await _drain_into(
            self.tensor_chunks(name), sink_for(out, info.nbytes), lambda c: c.offset - info.start
        )

    # ------------------------------------------------------------------ streams

    def _file_arg(self, file: str | None) -> str:
        if file is None:
            if len(self.headers) != 1:
                raise FormatError(f"{self.directory}: sharded checkpoint: name the file to read")
            return next(iter(self.headers))
        if file not in self.headers:
            raise FormatError(f"{self.directory}: {file!r} is not a file of this checkpoint")
        return file

    def _checkout(self, file: str) -> PrismStream:
        if self._closed:
            raise PrismError(errno_codes.EBADF, "store is closed", str(self.directory))
        for i, stream in enumerate(self._idle):
            if stream.path.name == file:
                return self._idle.pop(i)
        stream = PrismStream(self.directory / file, **self._options)
        self._open_streams.add(stream)
        return stream

    def _checkin(self, stream: PrismStream) -> None:
        if self._closed or stream._closed:
            self._forget(stream)
            return
        self._idle.append(stream)
        while len(self._idle) > MAX_IDLE_STREAMS:
            self._forget(self._idle.pop(0))

    def _forget(self, stream: PrismStream) -> None:
        stream.close()
        self._open_streams.discard(stream)

    def stats(self) -> dict[str, Any]:
        """Options, and the stats of the streams open now."""
        return {
            **self._options,
            "files": len(self.headers),
            "tensors": len(self._names),
            "open_streams": [s.stats() for s in self._open_streams],
        }

    def close(self) -> None:
        """Close every stream (reads in flight are drained by their engines)."""
        self._closed = True
        for stream in list(self._open_streams):
            self._forget(stream)
        self._idle.clear()

    async def aclose(self) -> None:
        self._closed = True
        for stream in list(self._open_streams):
            await stream.aclose()
            self._open_streams.discard(stream)
        self._idle.clear()

    def __enter__(self) -> TensorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> TensorStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class StoreChunks:
    """Chunks of a list of pieces, in order: an async iterator and async context manager
    (`async with store.flat_chunks(lo, hi) as chunks: async for chunk in chunks`)."""

    def __init__(self, store: TensorStore, pieces: list[Piece]) -> None:
        self._store = store
        self._pieces: Iterator[Piece] = iter(pieces)
        self._stream: PrismStream | None = None
        self._current: ChunkStream | None = None

    def __aiter__(self) -> StoreChunks:
        return self

    async def __aenter__(self) -> StoreChunks:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def __anext__(self) -> Chunk:
        while True:
            if self._current is None:
                piece = next(self._pieces, None)
                if piece is None:
                    raise StopAsyncIteration
                self._stream = self._store._checkout(piece.file)
                self._current = self._stream.chunks(
                    piece.start,
                    piece.stop,
                    dtype=piece.dtype,
                    origin=piece.origin,
                    element_base=piece.element_base,
                )
            try:
                return await self._current.__anext__()
            except StopAsyncIteration:
                self._end_piece()
            except BaseException:
                await self.aclose()
                raise

    def _end_piece(self) -> None:
        stream, self._stream, self._current = self._stream, None, None
        if stream is not None:
            self._store._checkin(stream)

    async def aclose(self) -> None:
        """Stop: drain the piece being read (bounded) and hand its stream back."""
        self._pieces = iter(())
        if self._current is not None:
            await self._current.aclose()
        self._end_piece()


async def _drain_into(chunks: StoreChunks, sink: Sink, position: Callable[[Chunk], int]) -> None:
    try:
        async with chunks:
            async for chunk in chunks:
                await sink.put(chunk, position(chunk))  # the sink owns the chunk now
        await sink.finish()
    except BaseException:
        await sink.abort()
        raise


# ---------------------------------------------------------------------- validation


def read_header(path: Path) -> Header:
    """Read and validate the header of safetensors file `path` (bounded reads)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise PrismError(e.errno, f"open: {os.strerror(e.errno)}", str(path)) from None
    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, HEADER_PREFIX, 0)
        n = read_header_size(prefix, str(path), size)
        raw = _pread_exactly(fd, n, HEADER_PREFIX, path)
        return parse_header(raw, str(path), size)
    finally:
        os.close(fd)


def _pread_exactly(fd: int, n: int, offset: int, path: Path) -> bytes:
    out = bytearray(n)
    view, done = memoryview(out), 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise FormatError(f"{path}: unexpected end of file at byte {offset + done}")
        done += got
    return bytes(out)


def _read_small(path: Path, limit: int) -> bytes:
    try:
        size = os.stat(path).st_size
        if size > limit:
            raise FormatError(f"{path}: {size} bytes, over the {limit}-byte limit")
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise PrismError(e.errno, f"read: {os.strerror(e.errno or 5)}", str(path)) from None


def _only_checkpoint_in(directory: Path) -> Path:
    indexes = sorted(directory.glob(f"*.safetensors{INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return indexes[0]
    files = sorted(directory.glob("*.safetensors"))
    if not indexes and len(files) == 1:
        return files[0]
    raise FormatError(
        f"{directory}: expected one *.safetensors{INDEX_SUFFIX} or one *.safetensors file, "
        f"found {len(indexes)} indexes and {len(files)} files; name the file to open"
    )


def _check_index_against_shards(path: Path, index: ShardIndex, headers: dict[str, Header]) -> None:
    expected: dict[str, set[str]] = {f: set() for f in headers}
    for name, file in index.weight_map.items():
        expected[file].add(name)
    for file, header in headers.items():
        actual = set(header.tensors)
        missing = sorted(expected[file] - actual)
        extra = sorted(actual - expected[file])
        if missing:
            raise FormatError(f"{path}: maps {missing[0]!r} to {file}, which does not hold it")
        if extra:
            raise FormatError(
                f"{path}: {file} holds {extra[0]!r}, which the index does not map there"
            )
    total = sum(info.nbytes for h in headers.values() for info in h.tensors.values())
    if index.total_size is not None and index.total_size != total:
        raise FormatError(
            f"{path}: metadata.total_size is {index.total_size} but the shards hold {total} "
            f"bytes of tensors"
        )
