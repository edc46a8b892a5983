"""F-SSD over the network, sans-IO: the `/fflnode/state/1.0.0` protocol's messages and book.

Theory of operation. A node that has read a context (a segment of tokens, numbered by a
context id) holds one LayerState per SSD layer: h(S | h0 = 0) and Σ log a_t per head
(states.py). Peers ask for it with a `get` (what "state", `index` = context id, `round` =
the context's version, lo = hi = 0, codec STATE_CODEC) and receive one `bulk` body of two
parts, float32, stacked over the layers:

    "h"          (L, H, P, N)    the layers' states
    "log_decay"  (L, H)          their per-head log-decays (≤ 0)

Who holds what is agreed per state epoch by fflnode.states_phase (`states.ready` carries
a bitmap of the contexts its sender holds). The older range announcement `state.ready`
{run, context, round, count} is still validated and kept, bounded, in `Announcements`
when a peer sends one, but the node no longer publishes it (a follow-up can drop the
kind). Receivers drive every bulk transfer, and no state ever rides pubsub. A pull from one peer
is a `PeerPull`: each answer is validated as it arrives and the peer's states enter the
book only when every context asked for validated. A requester merges what it received, its
own state included when it has one, in canonical order (ascending peer-ID bytes,
states.merge_model; `merged_batch` stacks contexts into one batched state per layer) and
continues from the merged state. `states_digest` is the hash nodes compare to show that
they merged bit-identical states.

Rules. Every shape comes from the LOCAL model's state_spec, never from a message: a body
is accepted only if its parts are exactly ("h", f32, (L, H, P, N)) and ("log_decay", f32,
(L, H)), its meta is empty, it answers the request made (run, round, context, codec:
checked by wire.check_bulk_context as well, and again here), and its values pass
states.from_arrays (finite, |x| ≤ MAX_ABS_STATE, log_decay ≤ 0). Anything else is a
WireError naming the peer with a stable reason slug. A peer's states enter the book only
after every context it was asked for validated (all or nothing), so a hostile or broken
peer cannot change what a node holds or merges.

Batched requests. A `get` with codec `ssd-states/1;<codec>` (batch_tag) asks for the
`hi` consecutive contexts from `index` in one body: each context's arrays as the state
codec encoded them once (state_codec: "none", float32; "holo", quantized), concatenated
along their first axis. One request per 32 KiB state cost a round trip each (768 of them
took 41.5 s in 4 loaded daemons against 4.6 s in batches of 32, docs/benchmarks.md); a
batch moves up to MAX_BATCH_BODY_BYTES per request. The receiver checks the parts
against its own spec and the count it asked for, and decodes and validates every context
before any of it is kept (PeerPull.add_batch).

This module is pure: numpy and torch, no trio, no libp2p (federation_net.py is the shell
that moves the bytes). Must never: merge a state whose shape the local model did not
define, keep more than MAX_OWN_CONTEXTS / MAX_RECEIVED_STATES states, or merge in any
order but the canonical one.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from fflnode import wire
from fflnode.errors import FormatError, MergeError, WireError, shown
from fflnode.ssm.state_codec import Parts, RawCodec, StateCodec, layer_shape
from fflnode.ssm.states import LayerState, StateShape, from_arrays, merge_model, to_arrays

STATE_PROTOCOL = "/fflnode/state/1.0.0"
STATE_WHAT = "state"
STATE_CODEC = "ssd-state/1"  # the `codec` of a state get/bulk: the layout above, version 1
STATE_BATCH_CODEC = "ssd-states/1"  # a batched get/bulk: "ssd-states/1;<state codec>"
# One batched body at most: 32 one-layer MQAR states (1 MiB raw) fit four times; a
# bigger model's batch is cut to fit (at least one context per request).
MAX_BATCH_BODY_BYTES = 4 << 20
PART_H = "h"
PART_LOG_DECAY = "log_decay"
STATE_DTYPE = "f32"  # the only dtype a state travels in: the canonical merge is defined on it
# Contexts a node keeps its own states for. One 1-layer MQAR state is 32 KiB, so 1024
# contexts are 32 MiB; a request for an evicted context is answered "gone".
MAX_OWN_CONTEXTS = 1024
# Peer states a node keeps (peer × context entries): a demo of 256 contexts × 8 peers
# fits twice; the oldest (context, round) entries go first beyond it.
MAX_RECEIVED_STATES = 4096
# Announcements remembered per peer: a peer announces once per batch, so the last 64
# batches of every peer; older ones are forgotten (a pull does not need them).
MAX_ANNOUNCED_RANGES = 64


def state_topic(run_id: str) -> str:
    """The pubsub topic of `state.ready` announcements: one per run, apart from the
    membership topic, whose subscriber only accepts membership and merge kinds."""
    return f"/fflnode/{run_id}/state/1"


def expected_parts(spec: Sequence[StateShape]) -> tuple[wire.Part, ...]:
    """The exact parts of a state body for the local model: what a peer must send."""
    H, P, N = layer_shape(spec)
    L = len(spec)
    return (
        wire.Part(PART_H, STATE_DTYPE, (L, H, P, N)),
        wire.Part(PART_LOG_DECAY, STATE_DTYPE, (L, H)),
    )


def body_nbytes(spec: Sequence[StateShape]) -> int:
    """Bytes of one state body (the transfer deadline is sized from it)."""
    return sum(p.nbytes for p in expected_parts(spec))


def state_parts(
    states: Sequence[LayerState], spec: Sequence[StateShape]
) -> list[tuple[str, np.ndarray]]:
    """The body parts of one context's unbatched states, checked against the local spec."""
    if len(states) != len(spec):
        raise FormatError(f"{len(states)} layer states for a {len(spec)}-layer model")
    arrays = to_arrays(states)
    parts = [
        (PART_H, np.ascontiguousarray(np.stack([a["h"] for a in arrays]), dtype=np.float32)),
        (
            PART_LOG_DECAY,
            np.ascontiguousarray(np.stack([a["log_decay"] for a in arrays]), dtype=np.float32),
        ),
    ]
    for (name, arr), want in zip(parts, expected_parts(spec), strict=True):
        if tuple(arr.shape) != want.shape:
            raise FormatError(f"local state part {name!r} is {arr.shape}, the model has {want}")
    return parts


def check_request(msg: wire.Message) -> tuple[int, int]:
    """(context, round) of a `get` this protocol serves; raises ValueError with the reason
    a request is refused (the shell answers it with an `error` message, not a body)."""
    if msg["what"] != STATE_WHAT:
        raise ValueError(f"{STATE_PROTOCOL} serves what={STATE_WHAT!r}, not {shown(msg['what'])}")
    if msg["codec"] != STATE_CODEC:
        raise ValueError(f"codec {shown(msg['codec'])}, this node serves {STATE_CODEC!r}")
    if msg["lo"] != 0 or msg["hi"] != 0:
        raise ValueError("a state is one piece: lo and hi must be 0")
    return msg["index"], msg["round"]


def states_from_body(
    header: wire.BulkHeader,
    arrays: Mapping[str, np.ndarray],
    spec: Sequence[StateShape],
    peer: str,
    *,
    run: str,
    context: int,
    round: int,
) -> tuple[LayerState, ...]:
    """Validated layer states of one verified body (wire.check_body passed), or WireError."""
    for name, got, want in (
        ("run", header.run, run),
        ("what", header.what, STATE_WHAT),
        ("index", header.index, context),
        ("round", header.round, round),
        ("codec", header.codec, STATE_CODEC),
    ):
        if got != want:
            raise WireError(
                peer, name, f"state {name} {shown(got)} where {shown(want)} was requested"
            )
    if header.meta:
        raise WireError(peer, "schema", f"state body carries unknown meta {sorted(header.meta)}")
    want = expected_parts(spec)
    if [p.name for p in header.parts] != [p.name for p in want]:
        raise WireError(
            peer,
            "schema",
            f"state parts {[p.name for p in header.parts]}, expected {[p.name for p in want]}",
        )
    for got_part, want_part in zip(header.parts, want, strict=True):
        if got_part.dtype != want_part.dtype:
            raise WireError(
                peer,
                "dtype",
                f"state part {shown(got_part.name)} is {got_part.dtype}, "
                f"only {STATE_DTYPE} is accepted",
            )
        if got_part.shape != want_part.shape:
            raise WireError(
                peer,
                "shape",
                f"state part {shown(got_part.name)} has shape {list(got_part.shape)}, "
                f"the local model's is {list(want_part.shape)}",
            )
    h, log_decay = arrays[PART_H], arrays[PART_LOG_DECAY]
    layers = [{"h": h[i], "log_decay": log_decay[i]} for i in range(len(spec))]
    try:
        return from_arrays(layers, spec, f"state of context {context} from peer")
    except FormatError as e:
        raise WireError(peer, "state", str(e)) from None


def batch_tag(codec: StateCodec) -> str:
    """The `codec` field of a batched state get/bulk for `codec`."""
    return f"{STATE_BATCH_CODEC};{codec.name}"


def batch_limit(spec: Sequence[StateShape], codec: StateCodec, wanted: int) -> int:
    """Contexts per batched request: `wanted`, cut so a body stays within
    MAX_BATCH_BODY_BYTES (and within one context at least)."""
    return max(1, min(wanted, MAX_BATCH_BODY_BYTES // codec.body_nbytes(spec, 1)))


def batches(contexts: Iterable[int], size: int) -> list[range]:
    """The contexts as runs of consecutive ids, each cut into ranges of <= `size`."""
    out: list[range] = []
    for c in sorted(set(contexts)):
        last = out[-1] if out else None
        if last is not None and c == last.stop and len(last) < size:
            out[-1] = range(last.start, c + 1)
        else:
            out.append(range(c, c + 1))
    return out


def check_batch_request(msg: wire.Message, tag: str, limit: int) -> tuple[range, int]:
    """(contexts, round) of a batched `get` this node serves with codec tag `tag`;
    ValueError with the reason otherwise (answered as `error`, not a body)."""
    if msg["what"] != STATE_WHAT:
        raise ValueError(f"{STATE_PROTOCOL} serves what={STATE_WHAT!r}, not {shown(msg['what'])}")
    if msg["codec"] != tag:
        raise ValueError(f"codec {shown(msg['codec'])}, this node serves {tag!r}")
    first, count = msg["index"], msg["hi"]
    if msg["lo"] != 0 or not 1 <= count <= limit or first + count > wire.ROUND_LIMIT:
        raise ValueError(f"a batch is lo = 0 and 1 to {limit} contexts, got {shown(count)}")
    return range(first, first + count), msg["round"]


def batch_parts(helds: Sequence[Held]) -> list[tuple[str, np.ndarray]]:
    """The body of a batched answer: each context's encoded arrays, concatenated."""
    names = [name for name, _ in helds[0].encoded]
    return [
        (name, np.concatenate([h.encoded[k][1] for h in helds], axis=0))
        for k, name in enumerate(names)
    ]


def states_from_batch(
    header: wire.BulkHeader,
    arrays: Mapping[str, np.ndarray],
    spec: Sequence[StateShape],
    codec: StateCodec,
    peer: str,
    *,
    run: str,
    contexts: range,
    round: int,
) -> dict[int, tuple[LayerState, ...]]:
    """Validated states of every context of one verified batched body, or WireError."""
    tag = batch_tag(codec)
    for name, got, want in (
        ("run", header.run, run),
        ("what", header.what, STATE_WHAT),
        ("index", header.index, contexts.start),
        ("round", header.round, round),
        ("codec", header.codec, tag),
    ):
        if got != want:
            raise WireError(
                peer, name, f"state {name} {shown(got)} where {shown(want)} was requested"
            )
    if header.meta:
        raise WireError(peer, "schema", f"state body carries unknown meta {sorted(header.meta)}")
    want = codec.parts_spec(spec, len(contexts))
    if [p.name for p in header.parts] != [p.name for p in want]:
        raise WireError(
            peer,
            "schema",
            f"state parts {[p.name for p in header.parts]}, expected {[p.name for p in want]}",
        )
    for got_part, want_part in zip(header.parts, want, strict=True):
        if got_part.dtype != want_part.dtype:
            raise WireError(
                peer, "dtype", f"state part {shown(got_part.name)} is {got_part.dtype}, "
                f"only {want_part.dtype} is accepted"
            )  # fmt: skip
        if got_part.shape != want_part.shape:
            raise WireError(
                peer,
                "shape",
                f"state part {shown(got_part.name)} has shape {list(got_part.shape)}, "
                f"the local model's is {list(want_part.shape)}",
            )
    try:
        decoded = codec.decode(arrays, spec, contexts, round, f"states {contexts} from peer")
    except FormatError as e:
        raise WireError(peer, "state", str(e)) from None
    return dict(zip(contexts, decoded, strict=True))


def parse_ready(msg: wire.Message) -> tuple[range, int]:
    """(contexts, round) of a decoded, schema-checked `state.ready` announcement."""
    if msg.kind != "state.ready":
        raise ValueError(f"not a state.ready announcement: {msg.kind!r}")
    first = msg["context"]
    return range(first, first + msg.get("count", 1)), msg["round"]


def ready_fields(contexts: range, round: int) -> dict[str, int]:
    """The fields of a `state.ready` announcing `contexts` (a non-empty range) at `round`."""
    if contexts.step != 1 or not 1 <= len(contexts) <= wire.MAX_ANNOUNCED_CONTEXTS:
        raise ValueError(
            f"announce 1 to {wire.MAX_ANNOUNCED_CONTEXTS} consecutive contexts, got {contexts}"
        )
    return {"context": contexts.start, "round": round, "count": len(contexts)}


class Announcements:
    """Which contexts each peer said it holds, at which round (bounded, oldest first out)."""

    def __init__(self, max_peers: int = wire.MAX_MEMBERS) -> None:
        self.max_peers = max_peers
        self._by_peer: OrderedDict[bytes, deque[tuple[range, int]]] = OrderedDict()

    def add(self, peer: bytes, contexts: range, round: int) -> None:
        ranges = self._by_peer.setdefault(peer, deque(maxlen=MAX_ANNOUNCED_RANGES))
        ranges.append((contexts, round))
        self._by_peer.move_to_end(peer)
        while len(self._by_peer) > self.max_peers:
            self._by_peer.popitem(last=False)

    def covers(self, peer: bytes, contexts: Iterable[int], round: int) -> bool:
        """True when `peer` announced every one of `contexts` at exactly `round`."""
        ranges = [r for r, rnd in self._by_peer.get(peer, ()) if rnd == round]
        return all(any(c in r for r in ranges) for c in contexts)


class Lookup(Enum):
    READY = "ready"  # held at exactly the requested version
    PENDING = "pending"  # not held yet (unknown context, or an older version held)
    GONE = "gone"  # superseded by a newer version, or evicted


@dataclass(frozen=True)
class Held:
    round: int
    states: tuple[LayerState, ...]  # what every node composes: decode(encode(states))
    parts: list[tuple[str, np.ndarray]]  # the single-context body (float32 of `states`)
    encoded: Parts  # this context's share of a batched body, by the book's state codec


class StateBook:
    """What one node holds: its own states per context, and its peers' per (context, round).

    Own states keep the latest version of each context only (older versions are GONE);
    peers' states are keyed by their peer-ID bytes, the merge order. Both are bounded."""

    def __init__(
        self, spec: Sequence[StateShape], me: bytes, codec: StateCodec | None = None
    ) -> None:
        self.spec = tuple(tuple(int(d) for d in s) for s in spec)
        layer_shape(self.spec)  # refuses a spec with no wire form now, not at first request
        self.me = me
        self.codec = codec or RawCodec()
        self._own: OrderedDict[int, Held] = OrderedDict()
        self._evicted: dict[int, int] = {}  # context -> the round we no longer hold
        self._received: OrderedDict[tuple[int, int], dict[bytes, tuple[LayerState, ...]]] = (
            OrderedDict()
        )

    # ---------------------------------------------------------------- own states
    def put_own(self, context: int, round: int, states: Sequence[LayerState]) -> None:
        """Hold `states` (unbatched, one per layer) as version `round` of `context`."""
        self.put_held(context, self.held_for(context, round, states))

    def held_for(self, context: int, round: int, states: Sequence[LayerState]) -> Held:
        """What put_held keeps for `states`: checked, encoded once, and decoded as every
        receiver will. Reads nothing of the book: a worker thread may build it."""
        if not (0 <= context < wire.ROUND_LIMIT and 0 <= round < wire.ROUND_LIMIT):
            raise FormatError(f"context {context} / round {round} out of the wire's range")
        encoded: Parts | None = None
        if not isinstance(self.codec, RawCodec):  # served as encoded, held as decoded
            encoded, states = self.codec.roundtrip(states, context, round, self.spec)
        parts = state_parts(states, self.spec)
        layers = [{"h": parts[0][1][i], "log_decay": parts[1][1][i]} for i in range(len(states))]
        from_arrays(layers, self.spec, f"own state of context {context}")  # raises if unfit
        # The states are views of the served body: one copy per context, not two.
        views = tuple(
            LayerState(torch.from_numpy(layer["h"]), torch.from_numpy(layer["log_decay"]))
            for layer in layers
        )
        return Held(round, views, parts, parts if encoded is None else encoded)

    def put_held(self, context: int, held: Held) -> None:
        """Hold `held` (from held_for) as context `context`'s version held.round."""
        current = self._own.get(context)
        if current is not None and held.round < current.round:
            raise FormatError(
                f"context {context}: round {held.round} is older than {current.round}"
            )
        self._own[context] = held
        self._own.move_to_end(context)
        self._evicted.pop(context, None)
        while len(self._own) > MAX_OWN_CONTEXTS:
            old, dropped = self._own.popitem(last=False)
            self._evicted[old] = dropped.round
            if len(self._evicted) > MAX_OWN_CONTEXTS:
                self._evicted.pop(next(iter(self._evicted)))

    def lookup(self, context: int, round: int) -> tuple[Lookup, Held | None]:
        held = self._own.get(context)
        if held is None:
            gone = self._evicted.get(context)
            return (
                (Lookup.GONE, None)
                if gone is not None and round <= gone
                else (Lookup.PENDING, None)
            )
        if held.round == round:
            return Lookup.READY, held
        return (Lookup.GONE, None) if round < held.round else (Lookup.PENDING, None)

    def own(self, context: int) -> Held | None:
        return self._own.get(context)

    # ---------------------------------------------------------------- peers' states
    def has(self, peer: bytes, context: int, round: int) -> bool:
        return peer in self._received.get((context, round), {})

    def put_received(
        self, peer: bytes, found: Mapping[int, Sequence[LayerState]], round: int
    ) -> None:
        """Commit one peer's validated states for several contexts (all or nothing)."""
        if peer == self.me:
            raise MergeError("a node's own state is not received from the network")
        for context, states in found.items():
            if len(states) != len(self.spec) or any(
                tuple(s.h.shape) != self.spec[i] for i, s in enumerate(states)
            ):
                raise FormatError(f"received state of context {context} does not fit the model")
        for context, states in found.items():
            key = (context, round)
            self._received.setdefault(key, {})[peer] = tuple(states)
            self._received.move_to_end(key)
        while sum(len(v) for v in self._received.values()) > MAX_RECEIVED_STATES:
            self._received.popitem(last=False)

    def received(self, context: int, round: int) -> dict[bytes, tuple[LayerState, ...]]:
        return dict(self._received.get((context, round), {}))

    # ---------------------------------------------------------------- merging
    def members(
        self, context: int, round: int, peers: Iterable[bytes] | None = None, *, own: bool = True
    ) -> dict[bytes, tuple[LayerState, ...]]:
        """The states a merge of (context, round) uses: the named peers' (all received when
        None; a named peer missing is a MergeError) and ours when held at that round."""
        got = self._received.get((context, round), {})
        if peers is None:
            chosen = dict(got)
        else:
            missing = [p for p in peers if p not in got and p != self.me]
            if missing:
                raise MergeError(
                    f"context {context} round {round}: no state from {len(missing)} peer(s), "
                    f"first {missing[0].hex()[:16]}"
                )
            chosen = {p: got[p] for p in peers if p != self.me}
        held = self._own.get(context)
        if own and held is not None and held.round == round:
            chosen[self.me] = held.states
        return chosen

    def merged(
        self, context: int, round: int, peers: Iterable[bytes] | None = None, *, own: bool = True
    ) -> tuple[LayerState, ...]:
        """The canonical merge (ascending peer-ID bytes, states.merge_model) to continue from."""
        return merge_model(self.members(context, round, peers, own=own))


class PeerPull:
    """One peer's answers to a pull of `contexts` at `round`, committed all or nothing.

    `add` validates each answer as it arrives (states_from_body, plus: a context asked
    for, not answered twice); `commit` enters the peer's states into the book only when
    every context arrived. A WireError from either leaves the book untouched."""

    def __init__(
        self,
        book: StateBook,
        peer: bytes,
        peer_name: str,
        *,
        run: str,
        round: int,
        contexts: Sequence[int],
    ) -> None:
        if peer == book.me:
            raise MergeError("a node does not pull its own states")
        if len(set(contexts)) != len(contexts) or not 0 < len(contexts) <= MAX_RECEIVED_STATES:
            raise ValueError(f"pull 1 to {MAX_RECEIVED_STATES} distinct contexts")
        self.book, self.peer, self.peer_name = book, peer, peer_name
        self.run, self.round = run, round
        self.contexts = tuple(contexts)
        self._wanted = set(contexts)
        self._found: dict[int, tuple[LayerState, ...]] = {}

    def add(self, context: int, header: wire.BulkHeader, arrays: Mapping[str, np.ndarray]) -> None:
        """Validate the answer to the request for `context` (raises WireError)."""
        if context not in self._wanted:
            raise WireError(self.peer_name, "index", f"context {context} was not requested")
        if context in self._found:
            raise WireError(self.peer_name, "index", f"context {context} answered twice")
        self._found[context] = states_from_body(
            header,
            arrays,
            self.book.spec,
            self.peer_name,
            run=self.run,
            context=context,
            round=self.round,
        )

    def add_batch(
        self, contexts: range, header: wire.BulkHeader, arrays: Mapping[str, np.ndarray]
    ) -> None:
        """Validate the answer to a batched request for `contexts` (raises WireError);
        CPU-bound for a lossy codec: the shell runs it in a worker thread."""
        for c in contexts:
            if c not in self._wanted:
                raise WireError(self.peer_name, "index", f"context {c} was not requested")
            if c in self._found:
                raise WireError(self.peer_name, "index", f"context {c} answered twice")
        self._found.update(
            states_from_batch(
                header,
                arrays,
                self.book.spec,
                self.book.codec,
                self.peer_name,
                run=self.run,
                contexts=contexts,
                round=self.round,
            )
        )

    def missing(self) -> list[int]:
        """Contexts asked for and not validated yet, in the order asked."""
        return [c for c in self.contexts if c not in self._found]

    def commit(self) -> int:
        """Enter every context's states into the book; returns how many contexts."""
        missing = [c for c in self.contexts if c not in self._found]
        if missing:
            raise WireError(
                self.peer_name,
                "incomplete",
                f"{len(missing)} of {len(self.contexts)} contexts missing, first {missing[0]}",
            )
        self.book.put_received(self.peer, self._found, self.round)
        return len(self._found)


def merged_batch(
    members: Sequence[Mapping[bytes, Sequence[LayerState]]],
) -> tuple[LayerState, ...]:
    """Per layer, the canonical merges of several contexts stacked into one batched state
    (batch = the contexts, in the given order): what a model continues from.

    `members[i]` is StateBook.members(...) of the i-th context (taken on the event loop,
    so this can run in a worker thread while the book keeps changing)."""
    if not members:
        raise MergeError("merge of no contexts")
    merged = [merge_model(m) for m in members]
    return tuple(
        LayerState(
            torch.stack([m[layer].h for m in merged]),
            torch.stack([m[layer].log_decay for m in merged]),
        )
        for layer in range(len(merged[0]))
    )


def states_digest(states: Sequence[LayerState]) -> str:
    """sha256 hex over each layer's h then log_decay, float32 little-endian, C order:
    equal digests mean bit-identical states."""
    h = hashlib.sha256()
    for s in states:
        for t in (s.h, s.log_decay):
            h.update(np.ascontiguousarray(t.detach().cpu().numpy(), dtype="<f4").tobytes())
    return h.hexdigest()
