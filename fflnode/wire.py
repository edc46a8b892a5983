"""The wire format, sans-IO: every byte a peer sends is decoded and validated here.

Theory of operation. Two kinds of thing cross the network:

* Messages: one msgpack map each, `{"v": WIRE_VERSION, "kind": ..., ...}`. On streams a
  message is framed as a 4-byte big-endian length then the msgpack bytes; on pubsub the
  payload is the msgpack bytes alone. Kinds and their fields are the SCHEMAS table below.
* Bulk bodies: a `bulk` message (the header) announces `parts` (name, dtype, shape) and
  `nbytes`, the exact body length, and its blake2b-128 digest. The body follows raw on the
  same stream; the receiver reads exactly `nbytes` into a buffer it preallocated from the
  validated header, checks the digest, dtypes, shapes and finiteness, then answers an
  `ack`. A clean EOF is never taken as completeness: only `nbytes` and the digest are.

Rules. Decoding checks the size cap before parsing, msgpack container limits while
parsing, then the schema (required fields, types, no unknown fields), then the context
(run id, expected kinds, round). Every rejection is a WireError naming the peer and a
stable reason slug; nothing here touches node state, so a bad message cannot corrupt it.
The sender of a message is the libp2p peer ID that Noise authenticated (passed in as
`peer`), never a field of the message.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from fflnode.errors import WireError, shown

WIRE_VERSION = 1
LENGTH_PREFIX = struct.Struct(">I")

# A control message is a few hundred bytes (a heartbeat lists a node's addresses, a
# membership proposal up to MAX_MEMBERS peer IDs of ~52 chars). 256 KiB holds the
# largest with room and refuses anything that could be bulk data in disguise.
MAX_MESSAGE_BYTES = 256 << 10
# py-libp2p silently drops pubsub payloads >= 1 MiB (DESIGN.md); ours stay far below.
MAX_PUBSUB_BYTES = 64 << 10
# A bulk body is one shard of a flat vector: at most exchange.chunk_elems (16 Mi elements
# = 64 MiB of float32) plus codec overhead. Anything larger is refused before allocation.
MAX_BODY_BYTES = 64 << 20 | 1 << 20
MAX_MEMBERS = 1024  # matches config run.nodes upper bound
MAX_PARTS = 8  # a codec ships at most a handful of named arrays per chunk
MAX_RANK = 4
MAX_NAME = 64
MAX_ADDRS = 16
MAX_STR = 4096  # longest free-text field (error reasons, multiaddrs)
# Contexts one state.ready may announce: a node holds at most federation.MAX_OWN_CONTEXTS
# (1024); one announcement per batch keeps a batch under GossipSub's silent rate limit.
MAX_ANNOUNCED_CONTEXTS = 1024
# Nesting depth of the deepest message: bulk.parts is map > list of parts > [name, dtype,
# shape] > shape list = 4. Deeper input is refused before msgpack builds a single object,
# so nothing downstream (validators, comparisons, log lines) can recurse on it.
MAX_DEPTH = 4
# msgpack objects in one message: the largest is merge.ready, MAX_MEMBERS member IDs
# plus a dozen fields; anything with more is refused before it is built.
MAX_OBJECTS = MAX_MEMBERS + 64
MAX_MAP_LEN = 32  # fields of the widest kind, with room
MAX_ADMIT_GROUPS = 16  # run-descriptor groups in a heartbeat (fflnode.admission: 8 today)
DIGEST_BYTES = 16  # blake2b-128: integrity of a body against corruption, not forgery
# (Noise already authenticates and encrypts the channel.)

# Wire dtype names -> numpy dtypes. "bf16" travels as raw little-endian 16-bit words.
DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
    "u8": np.dtype("u1"),
    "i8": np.dtype("i1"),
    "i16": np.dtype("<i2"),
    "i32": np.dtype("<i4"),
    "u32": np.dtype("<u4"),
}
FLOAT_DTYPES = {"f32", "f16"}
# "piece" and "reduced": a member's raw Delta range and a shard's reduced mean, in the
# per-round reduce-scatter / all-gather of the exact codec (fflnode.exchange_sharded)
WHAT = ("delta", "premerge", "merged", "state", "weights", "piece", "reduced")


def digest(chunks: Iterable[bytes | memoryview | np.ndarray]) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for c in chunks:
        h.update(c)
    return h.digest()


# ----------------------------------------------------------------------------- schemas
# Field spec: (python types accepted, required). Strings and bytes are length-capped by
# the unpacker; lists are checked by the kind-specific validators below.
_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BIN = (bytes,)
_LIST = (list,)
_MAP = (dict,)
_BOOL = (bool,)

SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    # pubsub: liveness, progress and the address book of the run
    "hb": {
        "run": (_STR, True),
        "round": (_INT, True),
        "phase": (_STR, True),
        "addrs": (_LIST, True),
        "seq": (_INT, True),
        # the sender's run descriptor: {group: 8-byte digest} (fflnode.admission)
        "admit": (_MAP, True),
        # HMAC-SHA256 proof of the run secret, in a closed run (fflnode.admission)
        "proof": (_BIN, False),
    },
    # pubsub: a node's proposal of who starts the run (fflnode.agreement): stage is
    # "propose", "lock" or "commit"
    "start.ready": {
        "run": (_STR, True),
        "members": (_LIST, True),
        "stage": (_STR, True),
    },
    # pubsub: a node's proposal of who takes part in the final merge
    "merge.ready": {
        "run": (_STR, True),
        "members": (_LIST, True),
        "shards": (_INT, True),
        "stage": (_STR, True),  # "propose", "lock" or "commit" (fflnode.agreement)
        "attempt": (_INT, False),  # which try of the merge (a member lost mid-merge: +1)
        # float32 LE sketch of the premerge weights (fflnode.merge.fingerprint); not
        # checked for finiteness here: a non-finite one marks its sender an outlier
        "fp": (_BIN, False),
    },
    # pubsub: the hash of a node's merged model
    "merge.hash": {
        "run": (_STR, True),
        "hash": (_STR, True),
        "digest": (_STR, True),
        "attempt": (_INT, False),
    },
    # stream (/fflnode/merge-hash/1.0.0): a member asks for a node's merged hash of one
    # attempt directly, when pubsub lost every copy; answered by merge.hash or error
    "hash.get": {"run": (_STR, True), "attempt": (_INT, True)},
    # pubsub: a node's SSM states for contexts [context, context + count) (version `round`;
    # count defaults to 1) are ready to be pulled over /fflnode/state/1.0.0
    # (fflnode/ssm/federation.py); the states themselves never ride pubsub
    "state.ready": {
        "run": (_STR, True),
        "context": (_INT, True),
        "round": (_INT, True),
        "count": (_INT, False),
    },
    # pubsub: a node's part in a state epoch's agreement (fflnode.ssm.epoch): its proposal
    # of the members whose SSM states the epoch composes (stage as merge.ready), and the
    # contexts it holds states for, as a bitmap of `contexts` bits (bit c: context c)
    "states.ready": {
        "run": (_STR, True),
        "epoch": (_INT, True),
        "attempt": (_INT, True),
        "members": (_LIST, True),
        "stage": (_STR, True),
        "contexts": (_INT, True),
        "held": (_BIN, True),
    },
    # pubsub: the hash of a node's merged states of one epoch (as merge.hash); `done`:
    # it has verified every member's hash, so it needs nothing more from anyone
    "states.hash": {
        "run": (_STR, True),
        "epoch": (_INT, True),
        "attempt": (_INT, True),
        "hash": (_STR, True),
        "digest": (_STR, True),
        "done": (_BOOL, False),
    },
    # stream: ask a peer for one chunk of something
    "get": {
        "run": (_STR, True),
        "round": (_INT, True),
        "what": (_STR, True),
        "index": (_INT, True),
        "lo": (_INT, True),
        "hi": (_INT, True),
        "codec": (_STR, True),
    },
    # stream: the header of a bulk body
    "bulk": {
        "run": (_STR, True),
        "round": (_INT, True),
        "what": (_STR, True),
        "index": (_INT, True),
        "codec": (_STR, True),
        "parts": (_LIST, True),
        "meta": (_MAP, True),
        "nbytes": (_INT, True),
        "blake2b": (_BIN, True),
    },
    "ack": {"ok": (_BOOL, True), "reason": (_STR, False)},
    # stream: application-level liveness (a frozen peer keeps its TCP connection open)
    "ping": {"run": (_STR, True), "nonce": (_INT, True)},
    "pong": {"run": (_STR, True), "nonce": (_INT, True)},
    "error": {"code": (_STR, True), "reason": (_STR, True)},
}
ROUND_LIMIT = 1 << 31
# A merge fingerprint is 4 KiB (fflnode.merge.fingerprint); 16 KiB leaves room to grow.
MAX_FINGERPRINT_BYTES = 16 << 10
MAX_MERGE_ATTEMPT = 64  # merge attempts a message may name; a node makes a handful
# Contexts a state epoch may number (fflnode.ssm.epoch): a node holds at most 1024
# (federation.MAX_OWN_CONTEXTS) and receives at most 4096 peer states; the held bitmap
# of a states.ready is then at most 512 bytes, far inside a pubsub message.
MAX_STATE_CONTEXTS = 4096
PHASES = ("join", "train", "merge", "done")
START_STAGES = ("propose", "lock", "commit")  # fflnode.agreement.STAGES (start and merge)


@dataclass(frozen=True)
class Part:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Message:
    """A decoded, schema-checked message: `kind` and its fields."""

    kind: str
    fields: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


@dataclass(frozen=True)
class BulkHeader:
    run: str
    round: int
    what: str
    index: int
    codec: str
    parts: tuple[Part, ...]
    meta: dict[str, float | int]
    nbytes: int
    blake2b: bytes


# ----------------------------------------------------------------------------- encoding
def encode(kind: str, **fields: Any) -> bytes:
    """msgpack bytes of a message; refuses what a peer would refuse (fail at the source)."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown message kind {kind!r}")
    doc = {"v": WIRE_VERSION, "kind": kind, **fields}
    data = msgpack.packb(doc, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{kind} message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def frame(data: bytes) -> bytes:
    """Length-prefixed stream framing of one encoded message."""
    return LENGTH_PREFIX.pack(len(data)) + data


def bulk_header(
    *,
    run: str,
    round: int,
    what: str,
    index: int,
    codec: str,
    parts: Sequence[tuple[str, np.ndarray]],
    meta: dict[str, float | int] | None = None,
) -> tuple[bytes, list[memoryview]]:
    """The framed header and the body views for named arrays `parts`."""
    views, specs = [], []
    for name, arr in parts:
        wire = dtype_name(arr.dtype)
        arr = np.ascontiguousarray(arr)
        specs.append([name, wire, list(arr.shape)])
        views.append(memoryview(arr.reshape(-1).view(np.uint8)))
    nbytes = sum(len(v) for v in views)
    header = encode(
        "bulk",
        run=run,
        round=round,
        what=what,
        index=index,
        codec=codec,
        parts=specs,
        meta=dict(meta or {}),
        nbytes=nbytes,
        blake2b=digest(views),
    )
    return frame(header), views


def dtype_name(dt: np.dtype) -> str:
    dt = np.dtype(dt)
    for name, ref in DTYPES.items():
        if dt == ref and name != "bf16":
            return name
    raise ValueError(f"dtype {dt} is not allowed on the wire")


# ----------------------------------------------------------------------------- decoding
# msgpack type bytes -> (length-field bytes, fixed payload bytes) for scalars and
# strings (bin/str/ext: the payload length is read from the length field).
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_FIXED.update({0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8})
_FIXED.update({0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17})  # fixext: type byte + data
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}  # bin, str
_EXT = {0xC7: 1, 0xC8: 2, 0xC9: 4}  # ext: length, type byte, data
_ARRAYS = {0xDC: 2, 0xDD: 4}
_MAPS = {0xDE: 2, 0xDF: 4}


def check_structure(data: bytes, peer: str) -> None:
    """Walk msgpack bytes without building objects (no recursion, O(objects) steps):
    nesting within MAX_DEPTH, at most MAX_OBJECTS objects, containers within their
    limits, every length inside the data. Raises WireError("malformed" / "oversized")."""
    n, pos, objects = len(data), 0, 0
    pending = [1]  # objects still to read at each open nesting level; the top holds one

    def need(k: int) -> None:
        if pos + k > n:
            raise WireError(peer, "malformed", f"msgpack value runs past the end at byte {pos}")

    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        objects += 1
        if objects > MAX_OBJECTS:
            raise WireError(peer, "oversized", f"more than {MAX_OBJECTS} values in one message")
        need(1)
        b = data[pos]
        pos += 1
        count = -1  # elements of a container opened here
        if b <= 0x7F or b >= 0xE0:
            continue
        if 0x80 <= b <= 0x8F:
            count = 2 * (b & 0x0F)
        elif 0x90 <= b <= 0x9F:
            count = b & 0x0F
        elif 0xA0 <= b <= 0xBF:
            need(b & 0x1F)
            pos += b & 0x1F
        elif b in _FIXED:
            need(_FIXED[b])
            pos += _FIXED[b]
        elif b in _SIZED or b in _EXT:
            width = _SIZED.get(b) or _EXT[b]
            need(width)
            length = int.from_bytes(data[pos : pos + width], "big") + (1 if b in _EXT else 0)
            pos += width
            need(length)
            pos += length
        elif b in _ARRAYS or b in _MAPS:
            width = _ARRAYS.get(b) or _MAPS[b]
            need(width)
            length = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            count = length if b in _ARRAYS else 2 * length
        else:  # 0xC1: never used
            raise WireError(peer, "malformed", f"byte 0x{b:02x} at {pos - 1} is not msgpack")
        if count >= 0:
            if count > 2 * MAX_MAP_LEN and (b in _MAPS or 0x80 <= b <= 0x8F):
                raise WireError(peer, "oversized", f"a map of {count // 2} entries")
            if count > MAX_MEMBERS:
                raise WireError(peer, "oversized", f"an array of {count} elements")
            if len(pending) >= MAX_DEPTH + 1:
                raise WireError(peer, "malformed", f"nesting deeper than {MAX_DEPTH} levels")
            pending.append(count)
    if pos != n:
        raise WireError(peer, "malformed", "trailing bytes after the message")


def decode_length(prefix: bytes, peer: str, limit: int = MAX_MESSAGE_BYTES) -> int:
    """The length of the next framed message; refuses it before any allocation."""
    if len(prefix) != LENGTH_PREFIX.size:
        raise WireError(peer, "truncated", f"length prefix of {len(prefix)} bytes")
    (n,) = LENGTH_PREFIX.unpack(prefix)
    if n == 0:
        raise WireError(peer, "schema", "empty message")
    if n > limit:
        raise WireError(peer, "oversized", f"{n}-byte message exceeds the {limit}-byte limit")
    return n


def decode(
    data: bytes,
    peer: str,
    *,
    expect: Iterable[str] | None = None,
    run: str | None = None,
    limit: int = MAX_MESSAGE_BYTES,
) -> Message:
    """Parse and validate one message from `peer`; raises WireError on anything wrong."""
    if len(data) > limit:
        raise WireError(peer, "oversized", f"{len(data)}-byte message exceeds {limit}")
    check_structure(data, peer)
    try:
        doc = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_STR,
            max_bin_len=max(DIGEST_BYTES * 4, MAX_FINGERPRINT_BYTES),
            max_array_len=MAX_MEMBERS,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise WireError(peer, "malformed", "trailing bytes after the message") from None
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise WireError(peer, "malformed", f"not valid msgpack: {type(e).__name__} {e}") from None
    if not isinstance(doc, dict):
        raise WireError(peer, "schema", f"message is a {type(doc).__name__}, not a map")
    version, kind = doc.pop("v", None), doc.pop("kind", None)
    if version != WIRE_VERSION or type(version) is not int:
        raise WireError(
            peer, "version", f"wire version {shown(version)}, this node speaks {WIRE_VERSION}"
        )
    if not isinstance(kind, str) or kind not in SCHEMAS:  # a list or map kind is unhashable
        raise WireError(peer, "schema", f"unknown message kind {shown(kind)}")
    allowed = set(expect) if expect is not None else None
    if allowed is not None and kind not in allowed:
        raise WireError(peer, "unexpected", f"got {kind} where {sorted(allowed)} was expected")
    schema = SCHEMAS[kind]
    for key, value in doc.items():
        if key not in schema:
            raise WireError(peer, "schema", f"{kind}: unknown field {shown(key)}")
        types_, _ = schema[key]
        if not isinstance(value, types_) or (isinstance(value, bool) and bool not in types_):
            raise WireError(peer, "schema", f"{kind}.{key} has type {type(value).__name__}")
    for key, (_, required) in schema.items():
        if required and key not in doc:
            raise WireError(peer, "schema", f"{kind}: missing field {key}")
    if run is not None and "run" in doc and doc["run"] != run:
        raise WireError(
            peer, "run", f"message for run {shown(doc['run'])}, this node is in {run!r}"
        )
    _CHECKS.get(kind, _no_check)(peer, doc)
    return Message(kind, doc)


def _no_check(peer: str, doc: dict[str, Any]) -> None:
    return None


def _check_round(peer: str, kind: str, value: int) -> None:
    if not 0 <= value < ROUND_LIMIT:
        raise WireError(peer, "schema", f"{kind}.round {value} out of range")


def _check_str_list(peer: str, where: str, items: list[Any], limit: int) -> None:
    if len(items) > limit or not all(isinstance(s, str) and s for s in items):
        raise WireError(peer, "schema", f"{where} must be at most {limit} non-empty strings")


def _check_hb(peer: str, doc: dict[str, Any]) -> None:
    _check_round(peer, "hb", doc["round"])
    if doc["phase"] not in PHASES:
        raise WireError(peer, "schema", f"hb.phase {shown(doc['phase'])} not in {PHASES}")
    _check_str_list(peer, "hb.addrs", doc["addrs"], MAX_ADDRS)
    if doc["seq"] < 0:
        raise WireError(peer, "schema", "hb.seq negative")
    admit = doc["admit"]
    if len(admit) > MAX_ADMIT_GROUPS or not all(
        isinstance(k, str) and 0 < len(k) <= MAX_NAME and isinstance(v, bytes) and len(v) == 8
        for k, v in admit.items()
    ):
        raise WireError(peer, "schema", "hb.admit must map short names to 8-byte digests")
    if "proof" in doc and len(doc["proof"]) != 32:
        raise WireError(peer, "schema", f"hb.proof of {len(doc['proof'])} bytes, not 32")


def _check_ready(peer: str, doc: dict[str, Any]) -> None:
    _check_str_list(peer, "merge.ready.members", doc["members"], MAX_MEMBERS)
    if doc["members"] != sorted(set(doc["members"])):
        raise WireError(peer, "schema", "merge.ready.members must be sorted and unique")
    if not 1 <= doc["shards"] <= 65536:
        raise WireError(peer, "schema", f"merge.ready.shards {shown(doc['shards'])} out of range")
    _check_attempt(peer, "merge.ready", doc)
    if doc["stage"] not in START_STAGES:
        raise WireError(peer, "schema", f"merge.ready.stage {shown(doc['stage'])}")
    fp = doc.get("fp")
    if fp is not None and (len(fp) > MAX_FINGERPRINT_BYTES or len(fp) % 4):
        raise WireError(peer, "schema", f"merge.ready.fp of {len(fp)} bytes")


def _check_start(peer: str, doc: dict[str, Any]) -> None:
    _check_str_list(peer, "start.ready.members", doc["members"], MAX_MEMBERS)
    if doc["members"] != sorted(set(doc["members"])):
        raise WireError(peer, "schema", "start.ready.members must be sorted and unique")
    if doc["stage"] not in START_STAGES:
        raise WireError(peer, "schema", f"start.ready.stage {shown(doc['stage'])}")


def _check_attempt(peer: str, kind: str, doc: dict[str, Any]) -> None:
    if not 0 <= doc.get("attempt", 0) < MAX_MERGE_ATTEMPT:
        raise WireError(peer, "schema", f"{kind}.attempt {doc['attempt']} out of range")


def _check_hash(peer: str, doc: dict[str, Any]) -> None:
    _check_attempt(peer, "merge.hash", doc)
    for key in ("hash", "digest"):
        v = doc[key]
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise WireError(peer, "schema", f"merge.hash.{key} is not a sha256 hex digest")


def _check_state_ready(peer: str, doc: dict[str, Any]) -> None:
    _check_round(peer, "state.ready", doc["round"])
    if not 0 <= doc["context"] < ROUND_LIMIT:
        raise WireError(peer, "schema", f"state.ready.context {doc['context']} out of range")
    count = doc.get("count", 1)
    if not (1 <= count <= MAX_ANNOUNCED_CONTEXTS and doc["context"] + count <= ROUND_LIMIT):
        raise WireError(peer, "schema", f"state.ready.count {count} out of range")


def _check_epoch(peer: str, kind: str, doc: dict[str, Any]) -> None:
    _check_attempt(peer, kind, doc)
    if not 0 <= doc["epoch"] < ROUND_LIMIT:
        raise WireError(peer, "schema", f"{kind}.epoch {doc['epoch']} out of range")


def _check_states_ready(peer: str, doc: dict[str, Any]) -> None:
    _check_epoch(peer, "states.ready", doc)
    _check_str_list(peer, "states.ready.members", doc["members"], MAX_MEMBERS)
    if doc["members"] != sorted(set(doc["members"])):
        raise WireError(peer, "schema", "states.ready.members must be sorted and unique")
    if doc["stage"] not in START_STAGES:
        raise WireError(peer, "schema", f"states.ready.stage {shown(doc['stage'])}")
    n, held = doc["contexts"], doc["held"]
    if not 0 <= n <= MAX_STATE_CONTEXTS or len(held) != (n + 7) // 8:
        raise WireError(
            peer, "schema", f"states.ready: {len(held)} held bytes for {shown(n)} contexts"
        )
    if n % 8 and held[-1] >> (n % 8):
        raise WireError(peer, "schema", "states.ready.held sets bits past its contexts")


def _check_states_hash(peer: str, doc: dict[str, Any]) -> None:
    _check_epoch(peer, "states.hash", doc)
    for key in ("hash", "digest"):
        v = doc[key]
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise WireError(peer, "schema", f"states.hash.{key} is not a sha256 hex digest")


def _check_get(peer: str, doc: dict[str, Any]) -> None:
    _check_round(peer, "get", doc["round"])
    if doc["what"] not in WHAT:
        raise WireError(peer, "schema", f"get.what {shown(doc['what'])} not in {WHAT}")
    if not (0 <= doc["index"] < ROUND_LIMIT and 0 <= doc["lo"] <= doc["hi"] < 1 << 48):
        raise WireError(peer, "schema", "get: index or [lo, hi) out of range")


def _check_bulk(peer: str, doc: dict[str, Any]) -> None:
    _check_round(peer, "bulk", doc["round"])
    if doc["what"] not in WHAT:
        raise WireError(peer, "schema", f"bulk.what {shown(doc['what'])} not in {WHAT}")
    if len(doc["blake2b"]) != DIGEST_BYTES:
        raise WireError(peer, "schema", "bulk.blake2b has the wrong length")
    if not 0 <= doc["nbytes"] <= MAX_BODY_BYTES:
        raise WireError(
            peer, "oversized", f"bulk body of {doc['nbytes']} bytes exceeds {MAX_BODY_BYTES}"
        )
    meta = doc["meta"]
    if not all(
        isinstance(k, str)
        and len(k) <= MAX_NAME
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and np.isfinite(v)
        for k, v in meta.items()
    ):
        raise WireError(peer, "schema", "bulk.meta must map short names to finite numbers")
    parts = _parse_parts(peer, doc["parts"])
    total = sum(p.nbytes for p in parts)
    if total != doc["nbytes"]:
        raise WireError(peer, "length", f"parts need {total} bytes, header says {doc['nbytes']}")
    doc["parts"] = parts


def _parse_parts(peer: str, raw: list[Any]) -> tuple[Part, ...]:
    if not 1 <= len(raw) <= MAX_PARTS:
        raise WireError(peer, "schema", f"bulk.parts must list 1 to {MAX_PARTS} arrays")
    parts, names = [], set()
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3):
            raise WireError(peer, "schema", "bulk part must be [name, dtype, shape]")
        name, dtype, shape = item
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or name in names:
            raise WireError(peer, "schema", f"bulk part name {shown(name)} invalid or repeated")
        if dtype not in DTYPES:
            raise WireError(peer, "dtype", f"dtype {shown(dtype)} is not on the whitelist")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            # no dimension beyond the largest body: with a 0 elsewhere numpy cannot hold it
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_BODY_BYTES
                for d in shape
            )
        ):
            raise WireError(peer, "schema", f"bulk part {shown(name)} has an invalid shape")
        if int(np.prod(shape, dtype=object)) * DTYPES[dtype].itemsize > MAX_BODY_BYTES:
            raise WireError(peer, "oversized", f"bulk part {shown(name)} is too large")
        names.add(name)
        parts.append(Part(name, dtype, tuple(shape)))
    return tuple(parts)


_CHECKS = {
    "hb": _check_hb,
    "start.ready": _check_start,
    "merge.ready": _check_ready,
    "merge.hash": _check_hash,
    "hash.get": lambda peer, doc: _check_attempt(peer, "hash.get", doc),
    "state.ready": _check_state_ready,
    "states.ready": _check_states_ready,
    "states.hash": _check_states_hash,
    "get": _check_get,
    "bulk": _check_bulk,
}


def as_bulk_header(msg: Message) -> BulkHeader:
    f = msg.fields
    return BulkHeader(
        f["run"],
        f["round"],
        f["what"],
        f["index"],
        f["codec"],
        f["parts"],
        f["meta"],
        f["nbytes"],
        f["blake2b"],
    )


def check_bulk_context(
    h: BulkHeader, peer: str, *, round: int, what: str, index: int, codec: str
) -> None:
    """The header answers the request that was made (round, what, chunk, codec)."""
    for name, got, want in (
        ("round", h.round, round),
        ("what", h.what, what),
        ("index", h.index, index),
        ("codec", h.codec, codec),
    ):
        if got != want:
            raise WireError(
                peer, name, f"bulk {name} {shown(got)} where {shown(want)} was requested"
            )


def check_body(h: BulkHeader, body: memoryview, peer: str) -> dict[str, np.ndarray]:
    """Verify a received body against its header; returns the named arrays (views)."""
    if len(body) != h.nbytes:
        raise WireError(peer, "truncated", f"body has {len(body)} of {h.nbytes} bytes")
    if digest([body]) != h.blake2b:
        raise WireError(peer, "hash", f"body of {h.what} chunk {h.index} fails its blake2b")
    out, pos = {}, 0
    for part in h.parts:
        arr = np.frombuffer(
            body, dtype=DTYPES[part.dtype], count=int(np.prod(part.shape)), offset=pos
        ).reshape(part.shape)
        if part.dtype in FLOAT_DTYPES and not np.isfinite(arr).all():
            raise WireError(
                peer,
                "nonfinite",
                f"{h.what} chunk {h.index} part {shown(part.name)} holds NaN or Inf",
            )
        out[part.name] = arr
        pos += part.nbytes
    return out
