"""One state epoch, sans-IO: who holds what, what to pull, what the merged file holds.

Theory of operation. In state epoch e every member folds its local contexts (context id
-> its segment) into per-layer states with the merged weights; a context may be held by
every member (MQAR: each reads a share of every sequence) or by one (a text document).
Each member announces the set it holds as a bitmap (`held_bitmap`, carried by its
`states.ready`), and once the members agree (fflnode.agreement, as the merge does),
each pulls from every other member the contexts that member holds (`receive_plan`), and
composes, for every context any member holds, the states of its holders in ascending
peer-ID-bytes order (`compose`: states.merge_model, exact for one layer). The result is
one safetensors file per epoch (`file_tensors`):

    "contexts"          (C,) int64            the context ids, ascending
    "layers.{l}.h"      (C, H, P, N) float32  layer l's composed state of each context
    "layers.{l}.log_decay"  (C, H) float32    and its log-decay

and its hash is fflnode.tensors.model_hash over those tensors: what the members compare,
as they compare the merged weights' hash.

Promises: every function here is deterministic in its inputs (the same states give the
same bytes on every node); `read_tensors` accepts a file only if it has exactly that
layout for the LOCAL model's spec. Must never: compose in any order but the canonical
one, or number a context outside [0, wire.MAX_STATE_CONTEXTS).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fflnode import wire
from fflnode.errors import FormatError, MergeError
from fflnode.ssm.federation import MAX_OWN_CONTEXTS, MAX_RECEIVED_STATES
from fflnode.ssm.states import LayerState, StateShape, from_arrays, merge_model
from fflnode.tensors import model_hash

STATES_DIR = "states"  # under the node's data_dir
CONTEXTS_TENSOR = "contexts"


def merged_path(data_dir: Path, epoch: int) -> Path:
    return data_dir / STATES_DIR / f"merged-{epoch}.safetensors"


def own_path(data_dir: Path, epoch: int) -> Path:
    return data_dir / STATES_DIR / f"own-{epoch}.safetensors"


def check_contexts(contexts: Iterable[int], where: str) -> list[int]:
    """A node's context ids, sorted; FormatError when out of range or too many."""
    ids = sorted(contexts)
    if len(ids) > MAX_OWN_CONTEXTS:
        raise FormatError(f"{where}: {len(ids)} contexts, a node holds at most {MAX_OWN_CONTEXTS}")
    for c in ids:
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < wire.MAX_STATE_CONTEXTS:
            raise FormatError(f"{where}: context id {c!r} not in [0, {wire.MAX_STATE_CONTEXTS})")
    if len(set(ids)) != len(ids):
        raise FormatError(f"{where}: repeated context ids")
    return ids


def held_bitmap(contexts: Iterable[int]) -> tuple[int, bytes]:
    """(number of bits, bitmap) of a set of context ids: bit c of byte c // 8 (LSB first)."""
    ids = check_contexts(contexts, "held contexts")
    n = ids[-1] + 1 if ids else 0
    bits = np.zeros(-(-n // 8) * 8, dtype=np.uint8)
    bits[ids] = 1
    return n, np.packbits(bits, bitorder="little").tobytes()


def parse_held(n: int, held: bytes) -> frozenset[int]:
    """The context ids of a bitmap (wire.py checked its length and padding)."""
    if len(held) != -(-n // 8):
        raise FormatError(f"{len(held)} bitmap bytes for {n} contexts")
    bits = np.unpackbits(np.frombuffer(held, dtype=np.uint8), bitorder="little")[:n]
    return frozenset(int(c) for c in np.flatnonzero(bits))


def members_digest(members: Iterable[bytes]) -> str:
    """sha256 of the members in canonical order (as the weight merge's digest)."""
    h = hashlib.sha256()
    for m in sorted(members):
        h.update(len(m).to_bytes(2, "big") + m)
    return h.hexdigest()


def receive_plan(me: bytes, holdings: Mapping[bytes, frozenset[int]]) -> dict[bytes, list[int]]:
    """What this node pulls: every other member's held contexts, in canonical order of
    members. MergeError when it would hold more peer states than the book keeps."""
    plan = {p: sorted(held) for p, held in sorted(holdings.items()) if p != me and held}
    total = sum(len(v) for v in plan.values())
    if total > MAX_RECEIVED_STATES:
        raise MergeError(
            f"a state epoch of {total} peer states exceeds the {MAX_RECEIVED_STATES} a node keeps"
        )
    return plan


def holders(holdings: Mapping[bytes, frozenset[int]]) -> dict[int, list[bytes]]:
    """Context -> the members holding it, in canonical (ascending bytes) order."""
    out: dict[int, list[bytes]] = {}
    for peer in sorted(holdings):
        for c in holdings[peer]:
            out.setdefault(c, []).append(peer)
    return dict(sorted(out.items()))


def compose(
    per_context: Mapping[int, Mapping[bytes, Sequence[LayerState]]],
) -> dict[int, tuple[LayerState, ...]]:
    """Per context, its holders' states composed in ascending peer-ID-bytes order."""
    return {c: merge_model(per_context[c]) for c in sorted(per_context)}


def file_tensors(merged: Mapping[int, Sequence[LayerState]]) -> dict[str, torch.Tensor]:
    """The tensors of an epoch's file (layout in the module docstring)."""
    if not merged:
        raise MergeError("a state epoch with no context held by any member")
    ids = sorted(merged)
    depth = len(merged[ids[0]])
    out = {CONTEXTS_TENSOR: torch.tensor(ids, dtype=torch.int64)}
    for layer in range(depth):
        out[f"layers.{layer}.h"] = torch.stack([merged[c][layer].h for c in ids]).contiguous()
        out[f"layers.{layer}.log_decay"] = torch.stack(
            [merged[c][layer].log_decay for c in ids]
        ).contiguous()
    return out


def read_tensors(
    tensors: Mapping[str, torch.Tensor], spec: Sequence[StateShape], where: str
) -> dict[int, tuple[LayerState, ...]]:
    """Context -> per-layer states of an epoch file, checked against the local spec."""
    want = {CONTEXTS_TENSOR} | {
        f"layers.{i}.{k}" for i in range(len(spec)) for k in ("h", "log_decay")
    }
    if set(tensors) != want:
        raise FormatError(f"{where}: tensors {sorted(tensors)[:6]}..., expected {sorted(want)}")
    ids = tensors[CONTEXTS_TENSOR]
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise FormatError(f"{where}: 'contexts' must be a 1-D int64 tensor")
    check_contexts([int(c) for c in ids], where)
    if ids.tolist() != sorted(ids.tolist()):
        raise FormatError(f"{where}: contexts are not in ascending order")
    n = len(ids)
    for i, shape in enumerate(spec):
        h, L = tensors[f"layers.{i}.h"], tensors[f"layers.{i}.log_decay"]
        if tuple(h.shape) != (n, *shape) or tuple(L.shape) != (n, shape[0]):
            raise FormatError(
                f"{where}: layer {i} holds {list(h.shape)} and {list(L.shape)}, the model's "
                f"{n} contexts need {[n, *shape]} and {[n, shape[0]]}"
            )
    out: dict[int, tuple[LayerState, ...]] = {}
    for k, c in enumerate(ids.tolist()):
        layers = [
            {
                "h": tensors[f"layers.{i}.h"][k].numpy(),
                "log_decay": tensors[f"layers.{i}.log_decay"][k].numpy(),
            }
            for i in range(len(spec))
        ]
        out[c] = from_arrays(layers, spec, f"{where}: context {c}")
    return out


def states_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """The hash members agree on: model_hash (sha256 of names and little-endian bytes)."""
    return model_hash(tensors)


__all__ = [
    "STATES_DIR",
    "check_contexts",
    "compose",
    "file_tensors",
    "held_bitmap",
    "holders",
    "members_digest",
    "merged_path",
    "own_path",
    "parse_held",
    "read_tensors",
    "receive_plan",
    "states_hash",
]
