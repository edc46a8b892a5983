"""The safetensors file format, sans-IO: strict header parsing and layout building.

Layout of a file: 8-byte little-endian u64 N, N bytes of UTF-8 JSON header, then the data
buffer. The header maps tensor names to {dtype, shape, data_offsets: [begin, end)}
relative to the data buffer, plus an optional "__metadata__" map of str to str.

A sharded checkpoint adds an index (`*.safetensors.index.json`): {"metadata": {...},
"weight_map": {tensor name: shard file name}}; `parse_index` validates it the same way.

Promise: `parse_header` accepts a header only if it describes the file exactly (offsets
tile the data buffer with no gap or overlap, sizes agree with dtype x shape, the buffer
ends at end of file) and rejects anything else with a FormatError naming the file and
the problem. It never allocates more than MAX_HEADER_BYTES because of what a file claims,
and bounds what the JSON may expand into (containers, nesting, duplicate keys, digits)
before building it. It never imports torch: the streaming path must stay light.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
# Each tensor entry is exactly three JSON containers ({entry}, [shape], [data_offsets]);
# the document and __metadata__ add two. Counting '{' and '[' bytes before decoding caps
# what a hostile 16 MiB header can expand into (5M empty lists would be ~300 MB).
MAX_JSON_CONTAINERS = 3 * MAX_TENSORS + 2
# A sharded index is ~60 bytes per tensor; 64 MiB holds over a million entries.
MAX_INDEX_BYTES = 64 << 20
# Shards are ~5 GB each in practice; 10 000 shards is a 50 TB model.
MAX_SHARDS = 10_000
INDEX_SUFFIX = ".index.json"

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


def _reject_duplicates(source: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise FormatError(f"{source}: duplicate JSON key {key!r}")
            out[key] = value
        return out

    return hook


def load_json(raw: bytes, source: str, what: str, max_containers: int) -> dict[str, Any]:
    """Decode a JSON object from untrusted bytes with bounded expansion.

    Rejects (FormatError) non-UTF-8, more than `max_containers` objects and arrays,
    nesting past the interpreter's recursion limit, integers longer than Python's digit
    limit, duplicate keys at any level, and anything that is not a JSON object.
    """
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > max_containers:
        raise FormatError(
            f"{source}: {what} has {containers} JSON objects/arrays, over the "
            f"{max_containers} limit"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{source}: {what} is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise FormatError(f"{source}: {what} does not start with '{{'")
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates(source))
    except json.JSONDecodeError as e:
        raise FormatError(f"{source}: {what} is not JSON: {e.msg} at char {e.pos}") from None
    except RecursionError:
        raise FormatError(f"{source}: {what} nests JSON too deeply") from None
    except ValueError as e:  # e.g. an integer over sys.get_int_max_str_digits()
        raise FormatError(f"{source}: {what} is not acceptable JSON: {e}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{source}: {what} is not a JSON object")
    return doc


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
    doc = load_json(raw, source, "header", MAX_JSON_CONTAINERS)
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


@dataclass(frozen=True)
class ShardIndex:
    """A validated sharded-checkpoint index: tensor name -> shard file name."""

    weight_map: dict[str, str]
    metadata: dict[str, str | int]

    def files(self) -> list[str]:
        """Shard file names, each once, in sorted order."""
        return sorted(set(self.weight_map.values()))

    @property
    def total_size(self) -> int | None:
        """The index's claim of total tensor bytes, when it makes one."""
        value = self.metadata.get("total_size")
        return value if isinstance(value, int) else None


def parse_index(raw: bytes, source: str) -> ShardIndex:
    """Validate index bytes: exactly {"weight_map": {...}} plus optional "metadata".

    Shard names must be plain file names ending in ".safetensors" (no directory parts,
    so an index can only point beside itself); metadata values are strings or integers,
    and "total_size", when present, a non-negative integer. Whether the shards agree with
    the map is checked by the caller that opens them.
    """
    if len(raw) > MAX_INDEX_BYTES:
        raise FormatError(f"{source}: index is {len(raw)} bytes, over the {MAX_INDEX_BYTES} limit")
    doc = load_json(raw, source, "index", MAX_TENSORS + 3)
    unknown = set(doc) - {"metadata", "weight_map"}
    if unknown:
        raise FormatError(f"{source}: unknown index keys {sorted(unknown)}")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{source}: weight_map must be a non-empty object")
    if len(weight_map) > MAX_TENSORS:
        raise FormatError(f"{source}: {len(weight_map)} tensors, over the {MAX_TENSORS} limit")
    for name, file in weight_map.items():
        if not name:
            raise FormatError(f"{source}: weight_map has an empty tensor name")
        if not isinstance(file, str) or not _plain_shard_name(file):
            raise FormatError(
                f"{source}: tensor {name!r} maps to {file!r}, not a plain *.safetensors "
                f"file name beside the index"
            )
    if len(set(weight_map.values())) > MAX_SHARDS:
        raise FormatError(f"{source}: more than {MAX_SHARDS} shard files")
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str | int) and not isinstance(v, bool) for v in metadata.values()
    ):
        raise FormatError(f"{source}: metadata must map names to strings or integers")
    total = metadata.get("total_size")
    if total is not None and (not isinstance(total, int) or total < 0):
        raise FormatError(f"{source}: metadata.total_size must be a non-negative integer")
    return ShardIndex(dict(weight_map), dict(metadata))


def _plain_shard_name(file: str) -> bool:
    return (
        file.endswith(".safetensors")
        and len(file) > len(".safetensors")
        and "/" not in file
        and "\\" not in file
        and "\x00" not in file
        and not file.startswith(".")
    )
