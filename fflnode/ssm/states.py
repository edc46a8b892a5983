"""The algebra of SSD recurrent states: exact composition, canonical merges, strict wire form.

Theory of operation. One SSD layer updates its state affinely, h_t = a_t·h_{t-1} + u_t with a
scalar a_t = exp(dt_t·A) per head (DESIGN.md, "F-SSD"). Unrolled over a segment S that
starts from h0, h(S | h0) = exp(L(S))·h0 + h(S | 0) where L(S) = Σ_t log a_t per head. So
a segment is summarised by the pair (h(S | 0), L(S)) — a `LayerState` — and

    compose(S1, S2) = (exp(L2)·h1 + h2, L1 + L2)  is exactly the state of S1 ++ S2.

It is associative, not commutative: a merge of many nodes' states is defined by an order,
and that order is ascending peer-ID bytes (the same canonical order as the weight merge).
The fold runs in float64 and rounds to float32 once, so every node that merges the same
states gets bit-identical results whatever order they arrived in.

Exactness holds for one layer fed exactly the centralized inputs. In a deep stack, layer
l ≥ 2 of a node saw activations computed without the other nodes' context, so a per-layer
merge is an approximation; `merge_average` is the order-free alternative for that case.
tools/mqar.py measures both per layer (docs/benchmarks.md, "F-SSD").

Promises: sans-IO (torch and numpy only); `from_wire`/`from_arrays` accept a state only if
it has exactly the expected shapes, dtype float32, finite values within MAX_ABS_STATE and
log-decays ≤ 0, and raise FormatError for anything else — never another exception type.
Must never: allocate from sizes a message claims (shapes come from the local model), or
merge more than MAX_MERGE_MEMBERS states.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fflnode.errors import FormatError, MergeError

STATE_FORMAT = "fflnode.ssd-state/1"
WIRE_DTYPE = "float32"  # the only dtype a state travels in: the merge is defined on it
# No run has anywhere near this many members; the cap keeps the next bound meaningful.
MAX_MERGE_MEMBERS = 4096
# A state entry beyond this is corruption or an attack: MAX_MERGE_MEMBERS such entries
# still sum to < 4.1e33, finite in float32 (max 3.4e38), so a merge can never overflow.
MAX_ABS_STATE = 1e30
# Per-layer shape (heads, head_dim, d_state) as the local model defines it.
StateShape = tuple[int, int, int]


@dataclass(frozen=True)
class LayerState:
    """One layer's state of a segment: h (..., H, P, N) and log_decay (..., H).

    h is h(S | h0 = 0) in the layer's units (heads H, head_dim P, d_state N); log_decay is
    L(S) = Σ_t dt_t·A per head (≤ 0). Leading batch dimensions are allowed in the algebra;
    the wire form carries one unbatched state per layer.
    """

    h: torch.Tensor  # (..., H, P, N)
    log_decay: torch.Tensor  # (..., H)

    def __post_init__(self) -> None:
        if self.h.dim() < 3 or tuple(self.log_decay.shape) != tuple(self.h.shape[:-2]):
            raise FormatError(
                f"layer state: h {tuple(self.h.shape)} needs log_decay of shape "
                f"{tuple(self.h.shape[:-2])}, got {tuple(self.log_decay.shape)}"
            )

    @classmethod
    def zeros(
        cls,
        shape: StateShape,
        batch: tuple[int, ...] = (),
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LayerState:
        """The state of the empty segment: h = 0, L = 0 (the identity of `compose`)."""
        h = torch.zeros((*batch, *shape), device=device, dtype=dtype)
        return cls(h, torch.zeros((*batch, shape[0]), device=device, dtype=dtype))

    @property
    def nbytes(self) -> int:
        return self.h.numel() * self.h.element_size() + (
            self.log_decay.numel() * self.log_decay.element_size()
        )

    def to(self, device: torch.device | str) -> LayerState:
        return LayerState(self.h.to(device), self.log_decay.to(device))


def compose(s1: LayerState, s2: LayerState) -> LayerState:
    """The state of S1 ++ S2 from the states of S1 and S2: (exp(L2)·h1 + h2, L1 + L2).

    Computed in float64, returned in s2's dtype. Exact up to that rounding.
    """
    if s1.h.shape != s2.h.shape:
        raise FormatError(f"compose: state shapes differ, {tuple(s1.h.shape)} vs {s2.h.shape}")
    h1, h2 = s1.h.double(), s2.h.double()
    L1, L2 = s1.log_decay.double(), s2.log_decay.double()
    h = torch.exp(L2)[..., None, None] * h1 + h2
    return LayerState(h.to(s2.h.dtype), (L1 + L2).to(s2.log_decay.dtype))


def canonical_members(states: Mapping[bytes, object]) -> list[bytes]:
    """Peer-ID keys in merge order (ascending bytes), checked for count and type."""
    if not states:
        raise MergeError("merge of no states: at least one member must contribute")
    if len(states) > MAX_MERGE_MEMBERS:
        raise MergeError(f"merge of {len(states)} states, over the {MAX_MERGE_MEMBERS} limit")
    for key in states:
        if not isinstance(key, bytes):
            raise MergeError(f"merge keys must be peer-ID bytes, got {type(key).__name__}")
    return sorted(states)


def merge_canonical(states: Mapping[bytes, LayerState]) -> LayerState:
    """One layer's state of the concatenation of every member's segment, in peer-ID order.

    Exact for one layer: equal to the state of one sequence holding the segments in
    ascending peer-ID-bytes order. Independent of the mapping's iteration order, and
    bit-identical wherever it is computed from the same states on the same device type.
    """
    order = canonical_members(states)
    first = states[order[0]]
    h = first.h.double()
    L = first.log_decay.double()
    for key in order[1:]:
        s = states[key]
        if s.h.shape != first.h.shape:
            raise MergeError(
                f"member {key.hex()[:16]}: state {tuple(s.h.shape)} differs from "
                f"{tuple(first.h.shape)}"
            )
        h = torch.exp(s.log_decay.double())[..., None, None] * h + s.h.double()
        L = L + s.log_decay.double()
    return LayerState(h.to(first.h.dtype), L.to(first.log_decay.dtype))


def merge_average(states: Mapping[bytes, LayerState]) -> LayerState:
    """Approximate, order-free merge: h = mean_i h_i, L = Σ_i L_i (canonical-order sums).

    Meant for layers ≥ 2 of a deep stack, where no merge is exact anyway; it treats every
    member's segment as equally recent instead of decaying earlier peers by later peers'
    decays. Not exact even for one layer (for a_t = 1 it is the exact state divided by N).
    Its error per layer against the centralized state is measured by tools/mqar.py.
    """
    order = canonical_members(states)
    first = states[order[0]]
    h = torch.zeros_like(first.h, dtype=torch.float64)
    L = torch.zeros_like(first.log_decay, dtype=torch.float64)
    for key in order:
        s = states[key]
        if s.h.shape != first.h.shape:
            raise MergeError(f"member {key.hex()[:16]}: state shape {tuple(s.h.shape)} differs")
        h = h + s.h.double()
        L = L + s.log_decay.double()
    return LayerState((h / len(order)).to(first.h.dtype), L.to(first.log_decay.dtype))


def merge_model(
    states: Mapping[bytes, Sequence[LayerState]], *, average_from_layer: int | None = None
) -> tuple[LayerState, ...]:
    """Merge every layer of a model's states: `merge_canonical` per layer, or
    `merge_average` for layers with index ≥ `average_from_layer` (None: never)."""
    order = canonical_members(states)
    depth = len(states[order[0]])
    for key in order:
        if len(states[key]) != depth:
            raise MergeError(
                f"member {key.hex()[:16]}: {len(states[key])} layer states, expected {depth}"
            )
    merged = []
    for layer in range(depth):
        per_peer = {key: states[key][layer] for key in order}
        use_average = average_from_layer is not None and layer >= average_from_layer
        merged.append(merge_average(per_peer) if use_average else merge_canonical(per_peer))
    return tuple(merged)


def stack_layers(per_context: Sequence[Sequence[LayerState]]) -> tuple[LayerState, ...]:
    """Per layer, the unbatched states of several contexts stacked into one batch."""
    if not per_context:
        raise FormatError("stack of no contexts' states")
    return tuple(
        LayerState(
            torch.stack([c[layer].h for c in per_context]),
            torch.stack([c[layer].log_decay for c in per_context]),
        )
        for layer in range(len(per_context[0]))
    )


def unstack_layers(batched: Sequence[LayerState]) -> list[tuple[LayerState, ...]]:
    """The inverse of stack_layers: per context (batch entry), its unbatched layer states."""
    return [
        tuple(LayerState(s.h[b], s.log_decay[b]) for s in batched)
        for b in range(int(batched[0].h.shape[0]))
    ]


def batch_for(
    spec: Sequence[StateShape], states: Mapping[int, Sequence[LayerState]], keys: Iterable[int]
) -> tuple[LayerState, ...]:
    """Per layer, the states of `keys` stacked into one batch: h = 0 (the empty segment)
    for a key without a state, so a model reads it from scratch."""
    empty = tuple(LayerState.zeros(tuple(shape)) for shape in spec)  # type: ignore[arg-type]
    return stack_layers([states.get(k, empty) for k in keys])


def relative_error(approx: LayerState, exact: LayerState) -> float:
    """‖h_approx − h_exact‖ / ‖h_exact‖ (Frobenius, float64): the error figure we report."""
    diff = torch.linalg.vector_norm((approx.h.double() - exact.h.double()).reshape(-1))
    ref = torch.linalg.vector_norm(exact.h.double().reshape(-1))
    return float(diff / ref) if float(ref) > 0 else float(diff)


# ---------------------------------------------------------------------------------------
# Plain-data forms. `to_arrays`/`from_arrays`: numpy arrays per layer (for local storage and
# tests); `to_wire`/`from_wire`: dicts of str, int lists and bytes only (msgpack-friendly).


def to_arrays(states: Sequence[LayerState]) -> list[dict[str, np.ndarray]]:
    """One {"h": (H, P, N), "log_decay": (H,)} dict of float32 CPU arrays per layer."""
    out = []
    for s in states:
        out.append(
            {
                "h": s.h.detach().to("cpu", torch.float32).numpy().copy(),
                "log_decay": s.log_decay.detach().to("cpu", torch.float32).numpy().copy(),
            }
        )
    return out


def _check_array(value: object, shape: tuple[int, ...], where: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise FormatError(f"{where}: expected a numpy array, got {type(value).__name__}")
    if value.dtype != np.dtype(np.float32):
        raise FormatError(f"{where}: dtype {value.dtype}, only {WIRE_DTYPE} is accepted")
    if tuple(value.shape) != shape:
        raise FormatError(f"{where}: shape {tuple(value.shape)}, the model expects {shape}")
    return _check_values(value, where)


def _check_values(arr: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise FormatError(f"{where}: contains NaN or infinity")
    if arr.size and float(np.abs(arr).max()) > MAX_ABS_STATE:
        raise FormatError(f"{where}: magnitude over the {MAX_ABS_STATE:g} limit")
    return arr


def _to_state(h: np.ndarray, log_decay: np.ndarray, where: str) -> LayerState:
    if log_decay.size and float(log_decay.max()) > 0.0:
        raise FormatError(f"{where}: log_decay must be <= 0 (a_t <= 1), got {log_decay.max()}")
    return LayerState(torch.from_numpy(h.copy()), torch.from_numpy(log_decay.copy()))


def _check_layers(layers: object, spec: Sequence[StateShape], source: str) -> list[object]:
    if not isinstance(layers, list | tuple):
        raise FormatError(f"{source}: layers must be a list, got {type(layers).__name__}")
    if len(layers) != len(spec):
        raise FormatError(f"{source}: {len(layers)} layer states, the model has {len(spec)}")
    return list(layers)


def _check_keys(entry: object, keys: set[str], where: str) -> dict[str, object]:
    if not isinstance(entry, dict) or set(entry) != keys:
        got = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise FormatError(f"{where}: must be a dict with exactly keys {sorted(keys)}, got {got}")
    return entry


def from_arrays(
    layers: object, spec: Sequence[StateShape], source: str = "state"
) -> tuple[LayerState, ...]:
    """Validated layer states from `to_arrays` output; shapes must equal `spec` exactly."""
    out = []
    for i, entry in enumerate(_check_layers(layers, spec, source)):
        where = f"{source}: layer {i}"
        entry = _check_keys(entry, {"h", "log_decay"}, where)
        shape = tuple(spec[i])
        h = _check_array(entry["h"], shape, f"{where}: h")
        L = _check_array(entry["log_decay"], shape[:1], f"{where}: log_decay")
        out.append(_to_state(h, L, where))
    return tuple(out)


def _tensor_record(arr: np.ndarray) -> dict[str, object]:
    return {
        "dtype": WIRE_DTYPE,
        "shape": [int(d) for d in arr.shape],
        "data": np.ascontiguousarray(arr, dtype="<f4").tobytes(),
    }


def to_wire(states: Sequence[LayerState]) -> dict[str, object]:
    """{"format", "layers": [{"h": record, "log_decay": record}]}, a record being
    {"dtype": "float32", "shape": [ints], "data": little-endian bytes}. Unbatched states."""
    for i, s in enumerate(states):
        if s.h.dim() != 3:
            raise FormatError(f"to_wire: layer {i} state is batched {tuple(s.h.shape)}")
    return {
        "format": STATE_FORMAT,
        "layers": [
            {"h": _tensor_record(a["h"]), "log_decay": _tensor_record(a["log_decay"])}
            for a in to_arrays(states)
        ],
    }


def _from_record(record: object, shape: tuple[int, ...], where: str) -> np.ndarray:
    record = _check_keys(record, {"dtype", "shape", "data"}, where)
    if record["dtype"] != WIRE_DTYPE:
        raise FormatError(f"{where}: dtype {record['dtype']!r}, only {WIRE_DTYPE!r} is accepted")
    claimed = record["shape"]
    if (
        not isinstance(claimed, list | tuple)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in claimed)
        or tuple(claimed) != shape
    ):
        raise FormatError(f"{where}: shape {claimed!r}, the model expects {list(shape)}")
    data = record["data"]
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FormatError(f"{where}: data must be bytes, got {type(data).__name__}")
    expected = math.prod(shape) * 4
    if memoryview(data).nbytes != expected:
        raise FormatError(f"{where}: {memoryview(data).nbytes} data bytes, expected {expected}")
    arr = np.frombuffer(bytes(data), dtype="<f4").astype(np.float32).reshape(shape)
    return _check_values(arr, where)


def from_wire(
    message: object, spec: Sequence[StateShape], source: str = "state"
) -> tuple[LayerState, ...]:
    """Validated layer states from a decoded message; raises FormatError on anything else.

    `spec` is the local model's per-layer (heads, head_dim, d_state), never the message's.
    """
    message = _check_keys(message, {"format", "layers"}, source)
    if message["format"] != STATE_FORMAT:
        raise FormatError(f"{source}: format {message['format']!r}, expected {STATE_FORMAT!r}")
    out = []
    for i, entry in enumerate(_check_layers(message["layers"], spec, source)):
        where = f"{source}: layer {i}"
        entry = _check_keys(entry, {"h", "log_decay"}, where)
        shape = tuple(int(d) for d in spec[i])
        h = _from_record(entry["h"], shape, f"{where}: h")
        L = _from_record(entry["log_decay"], shape[:1], f"{where}: log_decay")
        out.append(_to_state(h, L, where))
    return tuple(out)


def wire_nbytes(spec: Iterable[StateShape]) -> int:
    """Payload bytes of one model's states on the wire (float32 h and log_decay)."""
    return sum(4 * (math.prod(s) + s[0]) for s in spec)
