"""Prism: the SSD as a slow memory tier.

Model weights live on NVMe as safetensors files and are streamed in byte ranges into a
bounded pool of aligned buffers, so a node's memory is bounded by the pool whatever the
model size. `safetensors` parses and validates the format (sans-IO); `plan` decides the
aligned reads (sans-IO); `pool` owns the slot memory; `backends` holds the io_uring,
thread and buffered engines and the choice between them; `stream` turns one file's
reads into chunks; `store` maps tensors, shards and the flat vector onto streams;
`device` moves chunks into tensors (a GPU through pinned slots) and tensors into slots;
`write_stream` writes byte ranges from the pool through the same engines; `blockfile`
keeps out-of-core training state (weights, optimizer moments, activations) in a
preallocated scratch file; `writer` writes checkpoints atomically; `bench` measures.

Importing this package never imports torch.
"""

import os
from typing import Any

from fflnode.prism.backends import BACKENDS, BackendChoice, backend_report, resolve_backend
from fflnode.prism.blockfile import BlockFile, BlockLayout, Region
from fflnode.prism.store import StoreChunks, TensorStore
from fflnode.prism.stream import Chunk, ChunkStream, PrismStream
from fflnode.prism.write_stream import WriteStream


def open_store(path: str | os.PathLike[str], **options: Any) -> TensorStore:
    """Open a checkpoint for streaming (see TensorStore.open for the options)."""
    return TensorStore.open(path, **options)


__all__ = [
    "BACKENDS",
    "BackendChoice",
    "BlockFile",
    "BlockLayout",
    "Chunk",
    "ChunkStream",
    "PrismStream",
    "Region",
    "StoreChunks",
    "TensorStore",
    "WriteStream",
    "backend_report",
    "open_store",
    "resolve_backend",
]
