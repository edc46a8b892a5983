"""Strict safetensors headers and sharded indexes: hostile input is a FormatError, cheaply."""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fflnode.errors import FormatError
from fflnode.prism.safetensors import (
    MAX_HEADER_BYTES,
    build_header,
    parse_header,
    parse_index,
    read_header_size,
)
from fflnode.prism.store import TensorStore, read_header


def header_bytes(doc: object) -> bytes:
    return json.dumps(doc).encode()


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def parse(raw: bytes, data: int = 8) -> object:
    return parse_header(raw, "test.safetensors", 8 + len(raw) + data)


def test_a_valid_header_parses() -> None:
    header = parse(header_bytes(GOOD))
    assert header.tensors["a"].nbytes == 8


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "does not start"),
        (b"{", "not JSON"),
        (b'{"a": 1, "a": 2}', "duplicate JSON key"),
        (
            b'{"x": {"dtype": "F32", "dtype": "F32", "shape": [], "data_offsets": [0, 4]}}',
            "duplicate",
        ),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests"),
        (
            b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
            "JSON",
        ),
        (b"{" + b'"k":[],' * 700_000 + b'"z":1}', "objects/arrays"),
        (header_bytes({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}), "dtype"),
        (header_bytes({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}), "shape"),
        (header_bytes({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 8]}}), "shape"),
        (header_bytes({"a": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}), "shape"),
        (header_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}), "needs"),
        (
            header_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}),
            "data_offsets",
        ),
        (
            header_bytes({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}),
            "needs",
        ),
        (
            header_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}),
            "exactly",
        ),
        (header_bytes({"__metadata__": {"k": 1}, **GOOD}), "__metadata__"),
        (header_bytes({"a": GOOD["a"], "b": GOOD["a"]}), "overlaps"),
        (header_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}), "gap"),
    ],
)
def test_hostile_headers_are_format_errors(raw: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse(raw)


@pytest.mark.parametrize("data", [0, 4, 9])
def test_a_data_buffer_that_does_not_match_the_header_is_refused(data: int) -> None:
    with pytest.raises(FormatError, match="truncated or padded"):
        parse(header_bytes(GOOD), data=data)


def test_a_huge_header_claim_is_refused_before_reading_it() -> None:
    prefix = struct.pack("<Q", 2**63)
    with pytest.raises(FormatError, match="limit"):
        read_header_size(prefix, "x", 1 << 40)
    with pytest.raises(FormatError, match="file has"):
        read_header_size(struct.pack("<Q", 1000), "x", 100)
    with pytest.raises(FormatError, match="too short"):
        read_header_size(b"\x01", "x", 1)


def test_a_container_bomb_is_refused_before_it_is_built() -> None:
    # 8 MiB of empty lists would become ~150 MB of Python lists if decoded.
    raw = b'{"a":[' + b"[]," * ((8 << 20) // 3) + b"[]]}"
    assert len(raw) <= MAX_HEADER_BYTES
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="objects/arrays"):
            parse(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"refusing the bomb allocated {peak} bytes"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_a_header_or_a_format_error(raw: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse(b"{" + raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=4), st.integers(0, 64))
def test_arbitrary_json_documents_are_a_header_or_a_format_error(doc: dict, data: int) -> None:
    with contextlib.suppress(FormatError):
        parse(header_bytes(doc), data=data)


def test_importing_prism_does_not_import_torch() -> None:
    # torch costs ~220 MB of RSS; the bounded-memory streaming path must not pay it.
    code = (
        "import sys, fflnode.prism, fflnode.prism.writer, fflnode.tensors; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


def test_a_file_truncated_on_disk_is_refused_at_open(tmp_path: Path) -> None:
    header, _ = build_header({"w": ("F32", (1000,))})
    path = tmp_path / "t.safetensors"
    path.write_bytes(header + b"\0" * 3999)
    with pytest.raises(FormatError, match="truncated"):
        read_header(path)
    path.write_bytes(header[:20])
    with pytest.raises(FormatError):
        TensorStore.open(path)


# ------------------------------------------------------------------------ index


def index_bytes(weight_map: object, **extra: object) -> bytes:
    return json.dumps({"weight_map": weight_map, **extra}).encode()


def test_a_valid_index_parses() -> None:
    index = parse_index(
        index_bytes({"a": "m-1.safetensors", "b": "m-2.safetensors"}, metadata={"total_size": 8}),
        "m.index.json",
    )
    assert index.files() == ["m-1.safetensors", "m-2.safetensors"]
    assert index.total_size == 8


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (index_bytes({}), "non-empty"),
        (index_bytes({"a": "../m.safetensors"}), "plain"),
        (index_bytes({"a": "/abs/m.safetensors"}), "plain"),
        (index_bytes({"a": "sub/m.safetensors"}), "plain"),
        (index_bytes({"a": "m.bin"}), "plain"),
        (index_bytes({"a": ".safetensors"}), "plain"),
        (index_bytes({"a": 3}), "plain"),
        (index_bytes({"": "m.safetensors"}), "empty tensor name"),
        (index_bytes({"a": "m.safetensors"}, extra=1), "unknown index keys"),
        (index_bytes({"a": "m.safetensors"}, metadata={"total_size": -1}), "total_size"),
        (index_bytes({"a": "m.safetensors"}, metadata={"total_size": True}), "strings or integers"),
        (index_bytes({"a": "m.safetensors"}, metadata=[1]), "metadata"),
        (b'{"weight_map": {"a": "m.safetensors", "a": "n.safetensors"}}', "duplicate"),
        (b'{"weight_map": [1]}', "non-empty object"),
    ],
)
def test_hostile_indexes_are_format_errors(raw: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_index(raw, "m.index.json")
