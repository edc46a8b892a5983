"""TensorStore: real safetensors checkpoints (single and sharded) stream bit-identically."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fflnode.errors import FormatError
from fflnode.prism.backends import ENV_BACKEND, probe_io_uring
from fflnode.prism.store import TensorStore
from fflnode.prism.writer import save_tensors
from fflnode.tensors import canonical_names, flatten

BACKENDS = ["io_uring", "threads", "buffered"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    if request.param == "io_uring":
        ok, why = probe_io_uring()
        if not ok:
            print(f"io_uring backend cannot be used here: {why}")
            if os.environ.get("FFLNODE_EXPECT_IO_URING") == "1":
                pytest.fail(f"FFLNODE_EXPECT_IO_URING=1 but io_uring is unusable: {why}")
            pytest.skip(f"io_uring unusable: {why}")
    return request.param


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "layers.0.weight": torch.randn(700, 1111, generator=g),  # ~3 MiB: several chunks
        "layers.0.bias": torch.randn(700, generator=g),
        "emb": torch.randn(333, 77, generator=g).to(torch.bfloat16),
        "half": torch.randn(1001, generator=g).half(),
        "steps": torch.arange(-5, 12345, dtype=torch.int64),
        "mask": torch.rand(999, generator=g) > 0.5,
        "bytes": torch.randint(0, 255, (4097,), dtype=torch.uint8, generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "ünïcode": torch.randn(3, generator=g),
    }


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prism-store") / "model.safetensors"
    save_file(mixed_tensors(), str(path), metadata={"format": "pt"})
    return path


async def test_a_safetensors_checkpoint_streams_bit_identically(
    backend: str, checkpoint: Path
) -> None:
    reference = load_file(str(checkpoint))
    with TensorStore.open(checkpoint, backend=backend) as store:
        assert store.names() == canonical_names(reference)
        for name, expected in reference.items():
            loaded = await store.load_tensor(name)
            assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
            assert raw(loaded) == raw(expected), name
            streamed = bytearray()
            async with store.tensor_chunks(name) as chunks:
                async for chunk in chunks:
                    with chunk:
                        assert chunk.element == len(streamed) // expected.element_size()
                        view = chunk.torch()
                        assert view.dtype == expected.dtype
                        streamed += raw(view)
            assert bytes(streamed) == raw(expected), name
            array = await store.read_tensor(name)
            assert array.shape == tuple(expected.shape) and array.tobytes() == raw(expected)


async def test_element_and_byte_ranges_of_a_tensor(backend: str, checkpoint: Path) -> None:
    reference = load_file(str(checkpoint))
    weight = reference["layers.0.weight"].reshape(-1)
    with TensorStore.open(checkpoint, backend=backend) as store:
        parts = []
        async with store.tensor_chunks("layers.0.weight", 12345, 600_001) as chunks:
            async for chunk in chunks:
                with chunk:
                    parts.append(chunk.numpy().copy())
        assert np.array_equal(np.concatenate(parts), weight[12345:600_001].numpy())
        info = store.info("half")
        out = bytearray(info.nbytes - 3)
        await store.read_bytes_into(info.start + 1, info.stop - 2, out)
        assert bytes(out) == raw(reference["half"])[1:-2]
        with pytest.raises(FormatError, match="outside tensor"):
            store.tensor_chunks("half", 0, 1002)
        with pytest.raises(FormatError, match="no tensor"):
            store.info("absent")


def write_scrambled_f32(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A float32 file whose tensors lie in reverse canonical order, header unaligned."""
    names = canonical_names(tensors)[::-1]
    doc, pos = {}, 0
    for name in names:
        n = tensors[name].numel() * 4
        doc[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [pos, pos + n],
        }
        pos += n
    header = json.dumps(doc).encode() + b"   "  # data starts at an odd offset
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for name in names:
            f.write(raw(tensors[name]))


def f32_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {f"block{i}.w": torch.randn(1 + 97 * i, 1031, generator=g) for i in range(6)} | {
        "a.bias": torch.randn(5, generator=g),
        "z.scale": torch.randn(1, generator=g),
    }


@pytest.mark.parametrize("layout", ["canonical", "scrambled"])
async def test_the_flat_vector_streams_in_canonical_order(
    backend: str, tmp_path: Path, layout: str
) -> None:
    tensors = f32_tensors()
    path = tmp_path / "flat.safetensors"
    if layout == "canonical":
        save_tensors(path, tensors)
    else:
        write_scrambled_f32(path, tensors)
    flat = flatten(tensors).numpy()
    with TensorStore.open(path, backend=backend) as store:
        assert store.headers[path.name].is_canonical_flat() == (layout == "canonical")
        assert store.numel == flat.size
        if layout == "canonical":
            assert len(store.flat_pieces(0, store.numel)) == 1
        for lo, hi in [(0, flat.size), (1, flat.size - 1), (12345, 400_000), (7, 8), (5, 5)]:
            got = np.empty(hi - lo, dtype=np.float32)
            await store.read_into(lo, hi, got)
            assert np.array_equal(got, flat[lo:hi]), (lo, hi)
            seen = lo
            async with store.flat_chunks(lo, hi) as chunks:
                async for chunk in chunks:
                    with chunk:
                        assert chunk.element == seen
                        assert np.array_equal(chunk.numpy(), flat[seen : seen + chunk.nbytes // 4])
                        seen += chunk.nbytes // 4
            assert seen == hi
        into_torch = torch.empty(1000)
        await store.read_into(100, 1100, into_torch)
        assert torch.equal(into_torch, torch.from_numpy(flat[100:1100]))
        with pytest.raises(FormatError, match="outside"):
            store.flat_chunks(0, flat.size + 1)


async def test_a_mixed_dtype_store_has_no_flat_vector(checkpoint: Path) -> None:
    with (
        TensorStore.open(checkpoint) as store,
        pytest.raises(FormatError, match="flat vector needs"),
    ):
        store.flat_chunks()


def write_shards(directory: Path, tensors: dict[str, torch.Tensor], shards: int) -> Path:
    names = canonical_names(tensors)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(directory / file))
        weight_map |= dict.fromkeys(part, file)
        total += sum(tensors[n].numel() * tensors[n].element_size() for n in part)
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


async def test_a_sharded_checkpoint_streams_like_one_file(backend: str, tmp_path: Path) -> None:
    tensors = f32_tensors()
    index = write_shards(tmp_path, tensors, shards=3)
    flat = flatten(tensors).numpy()
    for target in (index, tmp_path):
        with TensorStore.open(target, backend=backend) as store:
            assert len(store.files) == 3
            got = np.empty(flat.size, dtype=np.float32)
            await store.read_into(0, flat.size, got)
            assert np.array_equal(got, flat)
            for name in ("a.bias", "block3.w"):
                assert torch.equal(await store.load_tensor(name), tensors[name])
            assert len(store.stats()["open_streams"]) <= 2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: doc["weight_map"].pop("a.bias"), "does not map there"),
        (
            lambda doc: doc["weight_map"].update({"ghost": "model-00001-of-00003.safetensors"}),
            "does not hold",
        ),
        (lambda doc: doc["metadata"].update({"total_size": 1}), "total_size"),
        (
            lambda doc: doc["weight_map"].update({"a.bias": "../model-00001-of-00003.safetensors"}),
            "plain",
        ),
        (lambda doc: doc.update({"extra": {}}), "unknown index keys"),
    ],
)
def test_an_index_that_disagrees_with_its_shards_is_refused(
    tmp_path: Path, edit: object, message: str
) -> None:
    index = write_shards(tmp_path, f32_tensors(), shards=3)
    doc = json.loads(index.read_text())
    edit(doc)
    index.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=message):
        TensorStore.open(index)


def test_a_missing_shard_is_a_prism_error(tmp_path: Path) -> None:
    index = write_shards(tmp_path, f32_tensors(), shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(OSError, match="model-00002-of-00002"):
        TensorStore.open(index)


def test_an_ambiguous_directory_is_refused(tmp_path: Path) -> None:
    save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
    save_tensors(tmp_path / "b.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(FormatError, match="name the file"):
        TensorStore.open(tmp_path)


@pytest.fixture
def cuda() -> None:
    if not torch.cuda.is_available():
        reason = "CUDA is not available on this machine: the pinned-slot GPU path is not exercised"
        print(reason)
        pytest.skip(reason)


async def test_chunks_land_on_the_gpu_through_pinned_slots(cuda: None, checkpoint: Path) -> None:
    reference = load_file(str(checkpoint))
    with TensorStore.open(checkpoint) as store:
        for name, expected in reference.items():
            on_gpu = await store.load_tensor(name, device="cuda")
            assert on_gpu.device.type == "cuda"
            assert raw(on_gpu.cpu()) == raw(expected), name
        pinned = [s["cuda_pinned"] for s in store.stats()["open_streams"]]
        assert any(pinned), store.stats()
