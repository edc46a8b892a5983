"""Projection workers (off the trio thread, bounded) and streaming model sketches."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import trio
from safetensors.torch import save_file

from fflnode.errors import ConfigError
from fflnode.prism.reader import SafetensorsFile
from fflnode.sketch import model_sketch
from fflnode.sketch.countsketch import ShiftFoldSketch
from fflnode.sketch.model_sketch import main, sketch_file, sketch_file_async
from fflnode.sketch.rng import ChunkSeed
from fflnode.sketch.workers import ProjectionPool


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread for these tests (restored after): with two, every torch op
    here ran ~30x slower whenever another process held a core of this 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the pool ------------------------------------------------------------------------------


async def test_calls_run_in_worker_threads_not_on_the_trio_thread() -> None:
    pool = ProjectionPool(2, "cpu")
    here = threading.get_ident()
    op = ShiftFoldSketch(256, 3, ChunkSeed(1, 2, 3))
    x = torch.randn(10_000)
    ident, got = await pool.run(lambda: (threading.get_ident(), op.project(x)))
    assert ident != here
    torch.testing.assert_close(got, op.project(x))


async def test_at_most_workers_calls_run_at_once_and_they_do_overlap() -> None:
    pool = ProjectionPool(2, "cpu")
    meet = threading.Barrier(2, timeout=30)  # bounded: a missing partner fails the test

    def job(i: int) -> int:
        meet.wait()  # two calls must be running together to get past this
        return i * i

    results: dict[int, int] = {}

    async def call(i: int) -> None:
        results[i] = await pool.run(job, i)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(call, i)
    assert results == {i: i * i for i in range(6)}
    assert pool.stats.max_running == 2
    assert pool.stats.calls == 6


async def test_map_ordered_consumes_in_order_with_bounded_depth() -> None:
    pool = ProjectionPool(3, "cpu")
    lock = threading.Lock()
    state = {"in_flight": 0, "peak": 0}

    def work(i: int) -> int:
        with lock:
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
        return i

    seen: list[int] = []

    async def consume(i: int) -> None:
        with lock:
            state["in_flight"] -= 1
        seen.append(i)

    n = await pool.map_ordered(work, range(40), consume, depth=4)
    assert n == 40 and seen == list(range(40))
    assert state["peak"] <= 4


async def test_errors_in_workers_propagate() -> None:
    pool = ProjectionPool(1, "cpu")

    def boom() -> None:
        raise ConfigError("no")

    with pytest.raises(ConfigError):
        await pool.run(boom)


def test_pool_parameters_are_checked() -> None:
    with pytest.raises(ConfigError):
        ProjectionPool(0, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError):
            ProjectionPool(1, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
async def test_cuda_pool_gives_each_worker_its_own_stream() -> None:
    pool = ProjectionPool(2, "cuda")
    assert len({id(s.stream) for s in pool._slots}) == 2
    op = ShiftFoldSketch(256, 3, ChunkSeed(1, 2, 3), "cuda")
    x = torch.randn(10_000)
    got = await pool.run(lambda: op.project(x.cuda()).cpu())
    want = ShiftFoldSketch(256, 3, ChunkSeed(1, 2, 3)).project(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


# ---- model sketches --------------------------------------------------------------------------


@pytest.fixture
def model_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "layer.weight": torch.randn(300, 70, generator=g),
        "embed": torch.randn(2000, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(513, generator=g).half(),
        "steps": torch.arange(10),  # not a float: skipped
    }
    tensors["layer.weight"][17, 3] = 100.0
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def flat_of(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    names = sorted((n for n in tensors if tensors[n].is_floating_point()), key=str.encode)
    return torch.cat([tensors[n].float().reshape(-1) for n in names])


def test_sketch_file_equals_the_sketch_of_the_flat_vector(model_file, monkeypatch) -> None:
    path, tensors = model_file
    reads: list[int] = []
    real = SafetensorsFile.read_range

    def spy(self: SafetensorsFile, start: int, stop: int) -> bytes:
        reads.append(stop - start)
        return real(self, start, stop)

    monkeypatch.setattr(SafetensorsFile, "read_range", spy)
    monkeypatch.setattr(SafetensorsFile, "tensor", lambda *a: pytest.fail("loaded a tensor"))
    result = sketch_file(path, 512, piece_bytes=4096, seed=3, heavy=1)
    flat = flat_of(tensors)
    want = ShiftFoldSketch(512, 5, ChunkSeed(3, 0, model_sketch.MODEL_CHUNK)).project(flat)
    torch.testing.assert_close(result.values, want, atol=1e-4, rtol=1e-5)
    assert max(reads) <= 4096 and result.max_piece_bytes <= 4096
    assert result.numel == flat.numel() and result.skipped == ["steps"]
    assert result.norm_sq == pytest.approx(float(flat.double().square().sum()))
    assert result.heavy[0][:2] == ("layer.weight", (17, 3))
    assert abs(result.heavy[0][2] - 100.0) < 5.0


async def test_async_sketch_through_the_pool_matches(model_file) -> None:
    path, _ = model_file
    sync = sketch_file(path, 256, piece_bytes=1000)
    pool = ProjectionPool(2, "cpu")
    got = await sketch_file_async(path, 256, pool, piece_bytes=1000, depth=3)
    torch.testing.assert_close(got.values, sync.values, atol=1e-4, rtol=1e-5)
    assert got.norm_sq == pytest.approx(sync.norm_sq)
    assert got.bytes_read == sync.bytes_read
    assert pool.stats.calls > 10


def test_cli_entry_prints_a_summary_and_writes_the_sketch(model_file, tmp_path, capsys) -> None:
    path, _ = model_file
    out = tmp_path / "sketch.safetensors"
    assert main([str(path), "--k", "128", "--heavy", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parameters      23,513" in text and "JL bound" in text
    assert "layer.weight[17, 3]" in text
    with SafetensorsFile(out) as f:
        assert f.header.metadata["rows"] == "5"
        widths = [int(w) for w in f.header.metadata["widths"].split(",")]
        assert f.tensor("sketch").numel() == sum(widths)
    assert main([str(path), "--k", "1"]) == 2  # too narrow: a config error, exit 2
    assert main([str(tmp_path / "missing.safetensors")]) == 1
