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
        "hb": dict(run=RUN, round=2, phase="train", addrs=["/ip4/127.0.0.1/tcp/1"], seq=7),
        "merge.ready": dict(run=RUN, members=["a", "b"], shards=2, committed=False),
        "merge.hash": dict(run=RUN, hash="a" * 64, digest="b" * 64),
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
    good = dict(v=1, kind="hb", run=RUN, round=1, phase="join", addrs=[], seq=1)
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
        v=1, kind="bulk", run=RUN, round=0, what="delta", index=0, codec="none",
        parts=[["values", "f32", [4]]], meta={}, nbytes=16, blake2b=b"\x00" * 16,
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
