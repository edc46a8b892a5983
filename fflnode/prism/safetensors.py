"""The safetensors file format, sans-IO: strict header parsing and layout building.

Layout of a file: 8-byte little-endian u64 N, N bytes of UTF-8 JSON header, then the data
buffer. The header maps tensor names to {dtype, shape, data_offsets: [begin, end)}
relative to the data buffer, plus an optional "__metadata__" map of str to str.

Promise: `parse_header` accepts a header only if it describes the file exactly (offsets
tile the data buffer with no gap or overlap, sizes agree with dtype x shape, the buffer
ends at end of file) and rejects anything else with a FormatError naming the file and
the problem. It never allocates more than MAX_HEADER_BYTES because of what a file claims.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fflnode.errors import FormatError
from fflnode.tensors import canonical_names

# The reference implementation caps headers at 100 MB; a header is ~100 bytes per
# tensor, so 16 MiB still describes >100k tensors while refusing to allocate what a
# hostile 8-byte prefix claims.
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 200_000
MAX_RANK = 8  # no model tensor here has more than 5 dims; 8 leaves headroom
HEADER_PREFIX = 8
# Header padded with spaces so the data buffer starts 8-byte aligned (as the reference
# writer does); Prism reads aligned covers anyway, so 4 KiB alignment is not required.
HEADER_ALIGN = 8

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # no numpy bfloat16: raw 2-byte words, viewed by torch
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}
TORCH_DTYPE_NAMES = {
    "torch.bool": "BOOL",
    "torch.uint8": "U8",
    "torch.int8": "I8",
    "torch.int16": "I16",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int32": "I32",
    "torch.float32": "F32",
    "torch.float64": "F64",
    "torch.int64": "I64",
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: absolute byte range [start, stop) in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class Header:
    """A validated header: tensors by name, where the data buffer starts, metadata."""

    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int
    metadata: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return canonical_names(self.tensors)

    def is_canonical_flat(self, dtype: str = "F32") -> bool:
        """True when the data buffer is exactly the flat vector: every tensor `dtype`,
        stored back to back in canonical name order. Shards then map to one range."""
        pos = self.data_start
        for name in self.names():
            info = self.tensors[name]
            if info.dtype != dtype or info.start != pos:
                return False
            pos = info.stop
        return pos == self.file_size


def read_header_size(prefix: bytes, source: str, file_size: int) -> int:
    """N from the first 8 bytes, checked against the cap and the file size."""
    if len(prefix) < HEADER_PREFIX or file_size < HEADER_PREFIX:
        raise FormatError(f"{source}: {file_size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", prefix[:HEADER_PREFIX])
    if n > MAX_HEADER_BYTES:
        raise FormatError(
            f"{source}: header claims {n} bytes, over the {MAX_HEADER_BYTES}-byte limit"
        )
    if HEADER_PREFIX + n > file_size:
        raise FormatError(f"{source}: header claims {n} bytes but the file has {file_size}")
    return int(n)


def parse_header(raw: bytes, source: str, file_size: int) -> Header:
    """Validate header bytes `raw` (without the 8-byte prefix) against the file size."""
    data_start = HEADER_PREFIX + len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{source}: header is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise FormatError(f"{source}: header does not start with '{{'")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{source}: header is not JSON: {e.msg} at char {e.pos}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{source}: header is not a JSON object")
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{source}: __metadata__ must map strings to strings")
    if len(doc) > MAX_TENSORS:
        raise FormatError(f"{source}: {len(doc)} tensors, over the {MAX_TENSORS} limit")
    data_len = file_size - data_start
    tensors = {name: _tensor_info(source, name, entry, data_start) for name, entry in doc.items()}
    pos = 0
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.stop)):
        begin = info.start - data_start
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap at {pos}"
            raise FormatError(f"{source}: tensor {info.name!r} at offset {begin} {what}")
        pos = info.stop - data_start
    if pos != data_len:
        raise FormatError(
            f"{source}: tensors cover {pos} bytes but the data buffer has {data_len} "
            f"(truncated or padded file)"
        )
    return Header(tensors, data_start, file_size, dict(metadata))


def _tensor_info(source: str, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{source}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{where}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise FormatError(f"{where}: unsupported dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise FormatError(f"{where}: shape must be a list of at most {MAX_RANK} non-negative ints")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise FormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end")
    numel = int(np.prod(shape, dtype=object)) if shape else 1
    expected = numel * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise FormatError(
            f"{where}: {dtype}{shape} needs {expected} bytes, data_offsets span "
            f"{offsets[1] - offsets[0]}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def build_header(
    specs: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, TensorInfo]]:
    """Header bytes (prefix included) for tensors stored back to back in canonical order.

    `specs` maps name -> (dtype, shape). Returns the bytes to write at offset 0 and each
    tensor's absolute byte range.
    """
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    pos = 0
    ranges = {}
    for name in canonical_names(specs):
        dtype, shape = specs[name]
        if dtype not in DTYPES:
            raise FormatError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = numel * DTYPES[dtype].itemsize
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        ranges[name] = (dtype, tuple(shape), pos, pos + nbytes)
        pos += nbytes
    text = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    pad = (-(HEADER_PREFIX + len(text))) % HEADER_ALIGN
    text += b" " * pad
    data_start = HEADER_PREFIX + len(text)
    infos = {
        n: TensorInfo(n, d, s, data_start + lo, data_start + hi)
        for n, (d, s, lo, hi) in ranges.items()
    }
    return struct.pack("<Q", len(text)) + text, infos
