"""Wire format: round trips, and every malformed input rejected with the typed error."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fflnode import wire
from fflnode.errors import WireError

PEER = "12D3KooWTestPeer000000000000000000000000000000000"
RUN = "run-a"


def framed_bulk(values: np.ndarray, **overrides):
    header, views = wire.bulk_header(
        run=RUN, round=3, what="delta", index=1, codec="none", parts=[("values", values)]
    )
    return header, b"".join(bytes(v) for v in views)


def decode_framed(framed: bytes, **kw) -> wire.Message:
    n = wire.decode_length(framed[:4], PEER)
    return wire.decode(framed[4 : 4 + n], PEER, **kw)


def test_every_kind_round_trips():
    samples = {
        "hb": dict(
            run=RUN,
            round=2,
            phase="train",
            addrs=["/ip4/127.0.0.1/tcp/1"],
            seq=7,
            admit={"seed": b"\x01" * 8},
            proof=b"\x02" * 32,
        ),
        "start.ready": dict(run=RUN, members=["a", "b"], stage="lock"),
        "merge.ready": dict(run=RUN, members=["a", "b"], shards=2, stage="lock"),
        "merge.hash": dict(run=RUN, hash="a" * 64, digest="b" * 64),
        "states.ready": dict(
            run=RUN,
            epoch=0,
            attempt=1,
            members=["a", "b"],
            stage="lock",
            contexts=9,
            held=b"\xff\x01",
        ),  # fmt: skip
        "states.hash": dict(run=RUN, epoch=2, attempt=0, hash="a" * 64, digest="b" * 64),
        "get": dict(run=RUN, round=1, what="premerge", index=0, lo=0, hi=10, codec="none"),
        "ack": dict(ok=True),
        "error": dict(code="gone", reason="round 1 no longer held"),
    }
    for kind, fields in samples.items():
        msg = wire.decode(wire.encode(kind, **fields), PEER, run=RUN)
        assert msg.kind == kind
        assert msg.fields == fields


def test_bulk_body_round_trips_exactly():
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    framed, body = framed_bulk(values)
    h = wire.as_bulk_header(decode_framed(framed, expect={"bulk"}, run=RUN))
    arrays = wire.check_body(h, memoryview(body), PEER)
    assert np.array_equal(arrays["values"], values)
    wire.check_bulk_context(h, PEER, round=3, what="delta", index=1, codec="none")


def rejects(reason: str, data: bytes, **kw) -> WireError:
    with pytest.raises(WireError) as info:
        wire.decode(data, PEER, **kw)
    assert info.value.reason == reason, info.value
    assert PEER[:8] in str(info.value)  # the message names the peer
    return info.value


def test_oversized_message_refused_before_parsing():
    rejects("oversized", b"\x00" * (wire.MAX_MESSAGE_BYTES + 1))
    with pytest.raises(WireError) as info:
        wire.decode_length((wire.MAX_MESSAGE_BYTES + 1).to_bytes(4, "big"), PEER)
    assert info.value.reason == "oversized"


def test_schema_violations_are_rejected():
    good = dict(v=1, kind="hb", run=RUN, round=1, phase="join", addrs=[], seq=1, admit={})
    pack = msgpack.packb
    rejects("schema", pack({**good, "extra": 1}))
    rejects("schema", pack({k: v for k, v in good.items() if k != "seq"}))
    rejects("schema", pack({**good, "round": "1"}))
    rejects("schema", pack({**good, "round": True}))
    rejects("schema", pack({**good, "phase": "dancing"}))
    rejects("schema", pack({**good, "round": -1}))
    rejects("schema", pack({**good, "kind": "nope"}))
    rejects("schema", pack([1, 2, 3]))
    rejects("version", pack({**good, "v": 2}))
    rejects("version", pack({**good, "v": True}))
    rejects("run", pack({**good, "run": "other"}), run=RUN)
    rejects("unexpected", pack(good), expect={"get"})
    rejects("malformed", b"\xc1")
    rejects("malformed", pack(good) + b"\x00")


def bulk_doc(**overrides):
    doc = dict(
        v=1,
        kind="bulk",
        run=RUN,
        round=0,
        what="delta",
        index=0,
        codec="none",
        parts=[["values", "f32", [4]]],
        meta={},
        nbytes=16,
        blake2b=b"\x00" * 16,
    )
    doc.update(overrides)
    return msgpack.packb(doc, use_bin_type=True)


def test_bulk_header_checks():
    rejects("dtype", bulk_doc(parts=[["values", "f64", [2]]]))
    rejects("dtype", bulk_doc(parts=[["values", "object", [2]]]))
    rejects("length", bulk_doc(nbytes=12))
    rejects("oversized", bulk_doc(nbytes=wire.MAX_BODY_BYTES + 1))
    rejects("oversized", bulk_doc(parts=[["values", "f32", [1 << 30]]], nbytes=1 << 32))
    rejects("schema", bulk_doc(parts=[["values", "f32", [-4]]]))
    rejects("schema", bulk_doc(parts=[["v", "f32", [2]], ["v", "f32", [2]]]))
    rejects("schema", bulk_doc(blake2b=b"\x00" * 3))
    rejects("schema", bulk_doc(meta={"scale": float("nan")}))
    rejects("schema", bulk_doc(what="everything"))


def test_bodies_failing_checks_are_rejected():
    values = np.arange(8, dtype=np.float32)
    framed, body = framed_bulk(values)
    h = wire.as_bulk_header(decode_framed(framed))
    with pytest.raises(WireError, match="truncated"):
        wire.check_body(h, memoryview(body[:-1]), PEER)
    corrupted = bytearray(body)
    corrupted[5] ^= 1
    with pytest.raises(WireError, match="hash"):
        wire.check_body(h, memoryview(bytes(corrupted)), PEER)
    bad = values.copy()
    bad[2] = np.nan
    framed, body = framed_bulk(bad)
    h = wire.as_bulk_header(decode_framed(framed))
    with pytest.raises(WireError) as info:
        wire.check_body(h, memoryview(body), PEER)
    assert info.value.reason == "nonfinite"
    with pytest.raises(WireError) as info:
        wire.check_bulk_context(h, PEER, round=4, what="delta", index=1, codec="none")
    assert info.value.reason == "round"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes):
    try:
        msg = wire.decode(data, PEER, run=RUN)
    except WireError:
        return
    assert msg.kind in wire.SCHEMAS  # anything accepted passed the whole schema


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_messages_are_accepted_or_rejected_cleanly(data):
    fields = dict(run=RUN, round=1, what="premerge", index=0, lo=0, hi=10, codec="none")
    raw = bytearray(wire.encode("get", **fields))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    try:
        msg = wire.decode(bytes(raw[:cut]), PEER, run=RUN)
    except WireError:
        return
    assert msg.kind in wire.SCHEMAS
    assert set(msg.fields) <= set(wire.SCHEMAS[msg.kind])


def test_state_ready_announcement_round_trips_and_is_checked():
    fields = dict(run=RUN, context=7, round=2)
    msg = wire.decode(wire.encode("state.ready", **fields), PEER, run=RUN, expect={"state.ready"})
    assert msg.kind == "state.ready" and msg.fields == fields
    good = dict(v=1, kind="state.ready", run=RUN, context=7, round=2)
    pack = msgpack.packb
    rejects("schema", pack({**good, "context": -1}))
    rejects("schema", pack({**good, "context": wire.ROUND_LIMIT}))
    rejects("schema", pack({**good, "round": -1}))
    rejects("schema", pack({**good, "context": 1.5}))
    rejects("schema", pack({**good, "context": True}))
    rejects("schema", pack({k: v for k, v in good.items() if k != "context"}))
    rejects("schema", pack({**good, "h": b"\x00" * 16}))  # a state never rides pubsub
    batch = dict(run=RUN, context=0, round=2, count=256)  # one announcement for a batch
    assert wire.decode(wire.encode("state.ready", **batch), PEER).fields == batch
    rejects("schema", pack({**good, "count": 0}))
    rejects("schema", pack({**good, "count": wire.MAX_ANNOUNCED_CONTEXTS + 1}))
    rejects("schema", pack({**good, "context": wire.ROUND_LIMIT - 1, "count": 2}))
    rejects("schema", pack({**good, "count": True}))
    rejects("run", pack({**good, "run": "other"}), run=RUN)


# ----------------------------------------------------------------- nesting and log safety
def nested(depth: int, leaf: object = 1) -> object:
    """A list nested `depth` deep, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def python_depth(value: object) -> int:
    """Container nesting depth of a decoded value, computed iteratively (the oracle)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, list | dict):
            deepest = max(deepest, d + 1)
            todo += [(x, d + 1) for x in (v if isinstance(v, list) else [*v, *v.values()])]
    return deepest


@pytest.mark.parametrize("where", ["kind", "v", "run", "part-name", "extra"])
def test_deep_nesting_is_refused_before_decoding_wherever_it_hides(where: str) -> None:
    deep = nested(1000)
    doc = dict(v=1, kind="hb", run=RUN, round=1, phase="join", addrs=[], seq=1)
    if where == "part-name":
        doc = msgpack.unpackb(bulk_doc())
        doc["parts"] = [[deep, "f32", [4]]]
    elif where == "extra":
        doc["x"] = deep
    else:
        doc[where] = deep
    data = msgpack.packb(doc, use_bin_type=True)
    assert len(data) < 1200  # about 1 KB: the size of the attack
    err = rejects("malformed", data)
    assert "nesting deeper than" in str(err)
    assert len(str(err)) < 300


def test_every_legitimate_message_fits_the_depth_and_object_limits() -> None:
    biggest = dict(
        run=RUN,
        members=sorted(f"12D3KooW{i:044d}" for i in range(wire.MAX_MEMBERS)),
        shards=4,
        stage="commit",
        attempt=0,
        fp=b"\x00" * 4096,
    )
    assert wire.decode(wire.encode("merge.ready", **biggest), PEER).kind == "merge.ready"
    header, _ = wire.bulk_header(
        run=RUN,
        round=0,
        what="delta",
        index=0,
        codec="holo",
        parts=[(f"p{i}", np.zeros((1, 1, 1, 2), np.float32)) for i in range(wire.MAX_PARTS)],
    )
    assert wire.decode(header[4:], PEER).kind == "bulk"


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=8)
        | st.binary(max_size=8),
        lambda kids: (
            st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4)
        ),
        max_leaves=30,
    )
)
def test_structure_check_matches_an_independent_depth_count(value: object) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    depth = python_depth(value)
    try:
        wire.check_structure(data, PEER)
        accepted = True
    except WireError:
        accepted = False
    assert accepted == (depth <= wire.MAX_DEPTH)


@pytest.mark.parametrize(
    "field, value",
    [("run", "\x1b[31m" + "A" * 100_000), ("phase", "\n" * 4000), ("kind", "x" * 4000)],
)
def test_error_messages_about_hostile_values_are_bounded_and_escaped(field, value) -> None:
    doc = dict(v=1, kind="hb", run=RUN, round=1, phase="join", addrs=[], seq=1)
    doc[field] = value
    with pytest.raises(WireError) as info:
        wire.decode(msgpack.packb(doc), PEER, run=RUN)
    text = str(info.value)
    assert len(text) <= 300
    assert text.isprintable()  # no terminal escapes or newlines reach a log line


def test_a_truncated_container_is_malformed_not_a_crash() -> None:
    data = msgpack.packb(dict(v=1, kind="hb", run=RUN, round=1, phase="join", addrs=[], seq=1))
    for cut in range(1, len(data)):
        with pytest.raises(WireError):
            wire.decode(data[:cut], PEER)


def test_admission_and_start_fields_are_checked():
    good = dict(v=1, kind="hb", run=RUN, round=1, phase="join", addrs=[], seq=1, admit={})
    pack = msgpack.packb
    rejects("schema", pack({**good, "admit": {"seed": b"\x00" * 7}}, use_bin_type=True))
    rejects("schema", pack({**good, "admit": {"": b"\x00" * 8}}, use_bin_type=True))
    many = {f"g{i}": b"\x00" * 8 for i in range(wire.MAX_ADMIT_GROUPS + 1)}
    rejects("schema", pack({**good, "admit": many}, use_bin_type=True))
    rejects("schema", pack({**good, "proof": b"\x00" * 31}, use_bin_type=True))
    start = dict(v=1, kind="start.ready", run=RUN, members=["a", "b"], stage="lock")
    rejects("schema", pack({**start, "stage": "maybe"}))
    rejects("schema", pack({**start, "members": ["b", "a"]}))
    rejects("schema", pack({**start, "members": ["a", "a"]}))
