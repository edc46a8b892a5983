"""Out-of-core training (fflnode.train.outofcore) and the Task API's block chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fflnode.errors import ConfigError
from fflnode.train.task import (
    BlockChain,
    Stage,
    build_model,
    build_skeleton,
    load_task,
    task_chain,
)

TINY_TEXT = {"seq_len": 32, "batch_size": 4, "d_model": 32, "n_layers": 3, "d_state": 8}


def text_task(**options: object):
    return load_task("text", {**TINY_TEXT, **options}, Path("."))


def test_text_chain_gives_the_task_loss_bit_for_bit() -> None:
    loaded = text_task()
    model = build_model(loaded, 7)
    chain = task_chain(loaded, model)
    assert chain is not None
    assert [s.name for s in chain.stages] == [
        "embed",
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "readout",
    ]
    batch = next(iter(loaded.task.train_data(0, 1, 7)))
    assert torch.equal(chain.run_loss(batch), loaded.task.loss(model, batch))


def test_chain_that_misses_a_parameter_is_refused() -> None:
    loaded = text_task()
    model = build_model(loaded, 7)
    chain = task_chain(loaded, model)
    assert chain is not None
    partial = BlockChain(chain.stages[:-1], chain.model_input, chain.loss)
    with pytest.raises(ConfigError, match="readout.*belongs to no stage"):
        from fflnode.train.task import check_chain

        check_chain(partial, model, "test")


def test_chain_with_a_shared_parameter_is_refused() -> None:
    from fflnode.train.task import check_chain

    a = nn.Linear(2, 2)
    model = nn.Sequential(a, a)
    chain = BlockChain((Stage("0", a), Stage("1", model)), lambda b: b, lambda o, b: o.mean())
    with pytest.raises(ConfigError, match="shared by stages"):
        check_chain(chain, model, "test")


class StagedTask:
    """Two Linear stages initialised by init_stage; `stray` adds a buffer outside them,
    `broken` makes init_stage raise, `lazy` makes it skip stage "1", `twins` names both
    stages "0"."""

    def __init__(
        self, stray: bool = False, broken: bool = False, lazy: bool = False, twins: bool = False
    ) -> None:
        self.stray, self.broken, self.lazy, self.twins = stray, broken, lazy, twins

    def build_model(self, seed: int) -> nn.Module:
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        if self.stray:
            model.register_buffer("stray", torch.zeros(2))
        return model

    def init_stage(self, module: nn.Module, name: str, seed: int) -> None:
        if self.broken:
            raise RuntimeError("no weights today")
        if not (self.lazy and name == "1"):
            module.reset_parameters()

    def blocks(self, model: nn.Module) -> BlockChain:
        stages = (Stage("0", model[0]), Stage("0" if self.twins else "1", model[1]))
        return BlockChain(stages, lambda b: b, lambda out, b: out.pow(2).mean())

    def train_data(self, partition: int, nodes: int, seed: int):
        return iter([torch.ones(2, 3)])

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch).pow(2).mean()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"loss": 0.0}


def staged(task: StagedTask):
    from fflnode.train.task import LoadedTask

    return LoadedTask(spec="staged", task=task, options={}, source="tests")


def test_a_stage_by_stage_model_is_the_same_built_whole_or_per_stage() -> None:
    """init_stage draws each stage from (seed, stage name) alone: the model built whole
    equals its skeleton materialized in any order, and another seed gives other bits."""
    from fflnode.train.task import federated_parameters, materialize_stage

    loaded = staged(StagedTask())
    whole = build_model(loaded, 4)
    model, chain = build_skeleton(loaded, 4)
    for stage in reversed(chain.stages):
        materialize_stage(loaded, stage, 4)
    pairs = zip(federated_parameters(whole), federated_parameters(model), strict=True)
    assert all(torch.equal(a, b) for (_, a), (_, b) in pairs)
    other = build_model(loaded, 5)
    assert not torch.equal(other[0].weight, whole[0].weight)


def test_init_stage_errors_are_one_line_naming_the_task() -> None:
    with pytest.raises(ConfigError, match=r"stray is in no stage of blocks\(\)"):
        build_model(staged(StagedTask(stray=True)), 1)
    with pytest.raises(ConfigError, match=r"'staged'.*init_stage\('0'\) raised RuntimeError"):
        build_model(staged(StagedTask(broken=True)), 1)
    with pytest.raises(ConfigError, match=r"init_stage\('1'\) left 1.weight unset"):
        build_model(staged(StagedTask(lazy=True)), 1)
    with pytest.raises(ConfigError, match="names two stages '0'"):
        build_model(staged(StagedTask(twins=True)), 1)


# ----------------------------------------------------------------------------- trainer
def make_trainers(
    tmp_path: Path,
    inner: str,
    micro_batch: int = 0,
    resident: int = 1,
    chunk_elems: int = 1 << 20,
    skeleton: bool = True,
):
    """An in-memory trainer and an out-of-core one of the same tiny text LM. With
    `skeleton` the out-of-core one starts from the model's meta skeleton, its stages
    materialized one at a time (as a node does); else from the model built whole."""
    from fflnode.train.outofcore import (
        FLOAT_BYTES,
        OPT_STATES,
        POOL_BYTES,
        WORKING_FACTOR,
        OutOfCoreTrainer,
    )
    from fflnode.train.trainer import BatchStream, TrainSettings, node_trainer

    loaded = text_task()
    settings = TrainSettings(
        seed=3,
        local_steps=3,
        inner_lr=1e-2,
        outer_lr=1e-3,
        outer_momentum=0.0,
        inner_optimizer=inner,
    )
    memory = node_trainer(loaded, settings, 0, 1)
    if skeleton:
        staged = build_skeleton(loaded, settings.seed)
        assert staged is not None
        model, chain = staged
        # No storage, but for the per-head vectors SSDLayer draws on the CPU.
        assert all(p.is_meta for p in model.parameters() if p.dim() > 1)
    else:
        model = build_model(loaded, settings.seed)
        chain = task_chain(loaded, model)
    assert chain is not None
    states = len(OPT_STATES[inner])
    largest = max(sum(p.numel() for p in s.module.parameters()) for s in chain.stages)
    rows, seq, width = TINY_TEXT["batch_size"], TINY_TEXT["seq_len"], TINY_TEXT["d_model"]
    boundary = FLOAT_BYTES * rows * seq * width
    micro = micro_batch or rows
    # Exactly `resident` boundaries fit beside the fixed part: the others are spilled.
    budget = (
        FLOAT_BYTES * largest * (2 * states + 1)
        + 2 * POOL_BYTES
        + 4 * boundary
        + WORKING_FACTOR * boundary * micro // rows
        + resident * boundary
    )
    batches = BatchStream(lambda: loaded.task.train_data(0, 1, settings.seed))
    ooc = OutOfCoreTrainer(
        loaded,
        model,
        chain,
        settings,
        batches,
        directory=tmp_path,
        memory_budget=budget,
        micro_batch=micro_batch,
        chunk_elems=chunk_elems,
    )
    return memory, ooc


@pytest.mark.parametrize("inner", ["adam", "sgd"])
def test_streamed_steps_give_bit_identical_weights_when_the_micro_batch_is_the_batch(
    tmp_path: Path, inner: str
) -> None:
    """'Same' = torch.equal on every parameter after 3 steps: with one micro-batch the
    streamed step runs the in-memory step's operations in the same order."""
    memory, ooc = make_trainers(tmp_path, inner)
    try:
        loss_mem = memory.inner_steps(3)
        loss_ooc = ooc.inner_steps(3)
        assert ooc.plan is not None and ooc.plan.spilled == 3 and ooc.plan.resident == 1
        assert loss_ooc == loss_mem
        got = ooc.state_tensors()
        for name, want in memory.state_tensors().items():
            assert torch.equal(got[name], want), name
        assert ooc.peak_held <= ooc.memory_budget
        assert ooc.io["read"] > 0 and ooc.io["written"] > 0
    finally:
        ooc.close()


def test_micro_batches_agree_with_the_whole_batch_within_reassociation(tmp_path: Path) -> None:
    """With 4 micro-batches of 1 row, a gradient is a sum of 4 partial sums, not one
    sum: float32 reassociation, ~1e-7 relative per gradient. After 3 SGD steps at lr
    1e-2 the weights may differ by that, scaled by lr; the bound leaves 100x margin."""
    memory, ooc = make_trainers(tmp_path, "sgd", micro_batch=1, skeleton=False)
    try:
        start = memory.flat()
        memory.inner_steps(3)
        ooc.inner_steps(3)
        got, want = ooc.flat(), memory.flat()
        assert not torch.equal(want, start)
        assert (got - want).abs().max() <= 1e-6, float((got - want).abs().max())
    finally:
        ooc.close()


# ----------------------------------------------------------------------------- memory
MiB = 1 << 20
# What the issue allows beyond the budget besides the interpreter-and-torch baseline:
# allocator slack, autograd's bookkeeping, the I/O thread's trio run.
RSS_ALLOWANCE = 100 * MiB
CHILD_TIMEOUT_S = 240  # two steps of a 17M-parameter model on one shared core: ~20 s here
RSS_CHILD = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from fflnode.prism.fs import peak_rss, reset_peak_rss, resident_bytes, status_bytes
from fflnode.train.outofcore import WEIGHTS_FILE, OutOfCoreTrainer, in_memory_bytes
from fflnode.train.outofcore import pin_allocator
from fflnode.train.task import build_skeleton, load_task
from fflnode.train.trainer import BatchStream, TrainSettings

directory, budget, steps, inner = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
opts = json.loads(sys.argv[5])
loaded = load_task("text", opts, Path("."))
# torch's lazily loaded parts (the optimizer step imports torch._dynamo, ~60 MB; the
# autograd engine starts its thread) belong to the interpreter-and-torch baseline.
w = torch.zeros(4, requires_grad=True)
(w * 2).sum().backward()
torch.optim.Adam([w]).step()
sample = next(iter(loaded.task.train_data(0, 1, 1)))
baseline = status_bytes("VmRSS")  # interpreter, torch, the task's data
reset_peak_rss()  # from here on, VmHWM covers building the model and training it
settings = TrainSettings(seed=1, local_steps=2, inner_lr=1e-3, outer_lr=1e-3,
                         outer_momentum=0.0, inner_optimizer=inner)
pin_allocator()  # as compose does when a budget is set
model, chain = build_skeleton(loaded, 1)  # never whole: stages materialize one by one
numel = sum(p.numel() for p in model.parameters())
batches = BatchStream(lambda: loaded.task.train_data(0, 1, 1))
trainer = OutOfCoreTrainer(loaded, model, chain, settings, batches, directory=directory,
                           memory_budget=budget, sample_batch=sample,
                           chunk_elems=1 << 18)  # a round's passes fit the budget
after_init = status_bytes("VmRSS")
peak_init = peak_rss()
loss = trainer.inner_steps(steps) if steps else 0.0
peak = peak_rss()
out = dict(baseline=baseline, peak=peak, peak_init=peak_init, after_init=after_init,
           numel=numel, in_memory=in_memory_bytes(numel, inner), peak_held=trainer.peak_held,
           resident=trainer.plan.resident, spilled=trainer.plan.spilled,
           cached=resident_bytes(directory / WEIGHTS_FILE), io=trainer.io, loss=loss)
trainer.close()
print(json.dumps(out))
"""


def rss_child(tmp_path: Path, budget: int, steps: int, inner: str, opts: dict) -> dict:
    """RSS_CHILD in a fresh process: its peak RSS is its own."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(tmp_path), str(budget), str(steps), inner,
         json.dumps(opts)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print(r)
    return r


def test_rss_stays_within_the_budget_for_a_model_four_times_its_size(tmp_path: Path) -> None:
    """A fresh process builds and trains a 17M-parameter SSD LM with Adam (270 MB in
    memory) under a 48 MiB budget: its peak RSS (VmHWM) from before the model is built
    to the end of two steps stays within baseline + budget + RSS_ALLOWANCE, and the
    weights file is not cached. Measured here (steps only, before the model was built
    stage by stage): peak +57 MB over the baseline (the trainer's own tensors peak at
    21 MB, Prism's pools are 20 MiB; the rest is autograd and allocator slack)."""
    budget = 48 * MiB
    opts = dict(seq_len=32, batch_size=4, d_model=256, n_layers=24, d_state=16)
    r = rss_child(tmp_path, budget, 2, "adam", opts)
    assert r["in_memory"] >= 4 * budget
    # Its boundaries (128 KiB each) all fit: activation spilling is pinned by the
    # equivalence tests above, where the budget leaves room for one boundary.
    assert r["peak_held"] <= budget
    assert r["peak"] - r["baseline"] <= budget + RSS_ALLOWANCE, r
    assert r["cached"] <= 16 * MiB  # O_DIRECT: the cold weights stay out of the page cache


def test_a_model_bigger_than_budget_and_allowance_is_never_whole_in_memory(
    tmp_path: Path,
) -> None:
    """d_model 512, 20 blocks: 54M parameters, 215 MB of weights alone, more than the
    64 MiB budget + RSS_ALLOWANCE, so a model built whole before being written out (as
    before init_stage) breaks the bound. Built from its skeleton, stage by stage into the
    block file, the process's VmHWM over the baseline stays within budget + allowance."""
    budget = 64 * MiB
    opts = dict(seq_len=32, batch_size=2, d_model=512, n_layers=20, d_state=16)
    r = rss_child(tmp_path, budget, 0, "sgd", opts)
    assert 4 * r["numel"] > budget + RSS_ALLOWANCE
    assert r["peak_init"] - r["baseline"] <= budget + RSS_ALLOWANCE, r
    assert r["cached"] <= 16 * MiB


# ----------------------------------------------------------------------------- config
NODE_TOML = """
[node]
data_dir = "data"
[run]
run_id = "r1"
seed = 1
nodes = 1
rounds = 1
[train]
task = "text"
inner_optimizer = "adam"
outer_optimizer = "sgd"
memory_budget_mb = {budget}
[exchange]
codec = "holo"
bits = 1
scheme = "all-gather"
chunk_elems = {chunk_elems}
[task]
seq_len = 32
batch_size = 4
d_model = {d_model}
n_layers = 8
d_state = 8
"""


# Exchange chunks small enough for the round's passes under these budgets (8 buffers).
NODE_CHUNK_ELEMS = 1 << 18


def node_config(
    tmp_path: Path, budget: int, d_model: int = 32, chunk_elems: int = NODE_CHUNK_ELEMS
):
    from fflnode import config

    p = tmp_path / "node.toml"
    p.write_text(NODE_TOML.format(budget=budget, d_model=d_model, chunk_elems=chunk_elems))
    return config.load(p)


def test_memory_budget_is_validated_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="memory_budget_mb"):
        node_config(tmp_path, -1)


def test_a_model_that_fits_trains_in_memory(tmp_path: Path) -> None:
    from fflnode.compose import compose
    from fflnode.train.trainer import LocalTrainer

    assert isinstance(compose(node_config(tmp_path, 0)).trainer, LocalTrainer)
    assert isinstance(compose(node_config(tmp_path, 4096)).trainer, LocalTrainer)


def test_a_model_over_the_budget_trains_out_of_core_from_the_data_dir(tmp_path: Path) -> None:
    """d_model 256, 8 blocks, Adam: 5.4M parameters, 87 MB in memory, over a 64 MiB budget."""
    from fflnode.compose import compose
    from fflnode.train.outofcore import WEIGHTS_FILE, OutOfCoreTrainer

    comp = compose(node_config(tmp_path, 64, d_model=256))
    trainer = comp.trainer
    assert isinstance(trainer, OutOfCoreTrainer)
    try:
        assert (comp.cfg.data_dir / "outofcore" / WEIGHTS_FILE).is_file()
        assert comp.layout.numel == trainer.numel
        before = trainer.flat()
        loss = trainer.inner_steps(1)
        assert loss > 0 and not torch.equal(trainer.flat(), before)
        assert "perplexity" in trainer.evaluate()
    finally:
        trainer.close()


def test_a_budget_below_the_streaming_minimum_is_refused_at_load(tmp_path: Path) -> None:
    from fflnode.compose import compose

    with pytest.raises(ConfigError, match="cannot hold even the streaming minimum"):
        compose(node_config(tmp_path, 8, d_model=256))


@pytest.mark.parametrize(
    "change, words",
    [
        (('scheme = "all-gather"', 'scheme = "auto"'), "reduce-scatter"),
        (("seed = 1", 'seed = 1\ntopology = "ring"'), "topology 'ring' gossips"),
    ],
)
def test_a_round_that_cannot_stream_is_refused_for_an_out_of_core_node(
    tmp_path: Path, change: tuple[str, str], words: str
) -> None:
    """Only an all-gathered plain mean streams from the block file ("auto" reduce-scatters
    it, with any codec): a node streaming its
    model would hold the whole Delta in RAM in any other round, so it is refused at load
    with the setting to change."""
    from fflnode import config
    from fflnode.compose import compose

    path = tmp_path / "node.toml"
    text = NODE_TOML.format(budget=64, d_model=256, chunk_elems=NODE_CHUNK_ELEMS)
    path.write_text(text.replace(*change))
    with pytest.raises(ConfigError, match=words):
        compose(config.load(path))


def test_stages_that_are_not_contiguous_in_the_flat_order_are_refused_with_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chain whose stages are not contiguous ranges of the canonical flat vector cannot
    stream its rounds (OutOfCoreTrainer.streams_rounds); compose refuses it when the run
    has rounds. The text LM's stages are contiguous, so a trainer that says otherwise
    stands in for such a task."""
    from fflnode import compose as composemod
    from fflnode.train.outofcore import OutOfCoreTrainer

    class Scattered(OutOfCoreTrainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.streams_rounds = False

    monkeypatch.setattr(composemod, "OutOfCoreTrainer", Scattered)
    with pytest.raises(ConfigError, match="not contiguous ranges"):
        composemod.compose(node_config(tmp_path, 64, d_model=256))


def test_encoded_deltas_are_counted_in_the_budget(tmp_path: Path) -> None:
    """The exchange keeps this node's encoded Deltas for KEEP_ROUNDS rounds and one per
    peer: at 1 bit they fit beside the trainer; at 8 bits, with 16 nodes, they do not."""
    from fflnode import config
    from fflnode.compose import compose, held_encodings
    from fflnode.exchange import KEEP_ROUNDS

    cfg = node_config(tmp_path, 64, d_model=256)
    trainer = compose(cfg).trainer
    try:
        numel = trainer.numel
        kept = KEEP_ROUNDS + 1  # a lone node: ours for KEEP_ROUNDS, and the one being made
        assert kept * numel // 8 <= trainer.encodings <= 1.1 * kept * numel / 8
    finally:
        trainer.close()
    path = tmp_path / "node.toml"
    text = path.read_text().replace("bits = 1", "bits = 8").replace("nodes = 1", "nodes = 16")
    path.write_text(text)
    wide = config.load(path)
    assert held_encodings(wide, numel) > 64 << 20
    with pytest.raises(ConfigError, match="MiB of encoded Deltas"):
        compose(wide)


def test_exchange_chunks_too_big_for_the_rounds_passes_are_refused_at_load(
    tmp_path: Path,
) -> None:
    """64 MiB: 17 MiB of arenas + 20 MiB of pools leave room for 8 chunks of 855948
    elements, not of the default 1048576."""
    from fflnode.compose import compose

    with pytest.raises(ConfigError, match="exchange.chunk_elems to at most 855948"):
        compose(node_config(tmp_path, 64, d_model=256, chunk_elems=1 << 20))


# ----------------------------------------------------------------------------- testnet
TESTNET_TIMEOUT_S = 480  # 2 nodes x 2 rounds of a 3M-parameter model: ~1-2 min here
# 38 MiB of arenas and pools, and 3 MiB of 2-bit encoded Deltas (4 rounds of this
# node's and one from the peer) that the exchange keeps beside them.
TESTNET_BUDGET_MB = 44
# The recipe and data both runs share: only the model's size and the budget differ.
TESTNET_COMMON = (
    "--rounds", "2", "--local-steps", "2", "--task", "text",
    "--task-option", "seq_len=32", "--task-option", "batch_size=4",
    "--set", 'train.inner_optimizer="adam"',
    "--set", 'train.outer_optimizer="sgd"', "--set", "train.outer_lr=0.7",
    # folding SSM states needs the model in memory: an out-of-core node has none
    "--set", 'states.federate="off"',
    "--codec", "holo", "--bits", "2", "--no-baseline", "--no-plot", "--eval-every", "2",
    # an out-of-core node's rounds stream only from an all-gather (compose)
    "--set", 'exchange.scheme="all-gather"',
)  # fmt: skip


@pytest.mark.slow
def test_two_node_testnet_trains_out_of_core_within_its_budget_and_merges_exactly(
    tmp_path: Path,
) -> None:
    """d_model 192, 8 blocks, Adam: 3M parameters, 48 MB in memory, over a 44 MiB budget:
    both nodes stream their blocks and their rounds, exchange holo-encoded deltas and
    merge exactly, and each node's peak RSS (VmHWM) stays within the budget + the peak
    of a baseline node (the same run with a 1-block d_model-16 model in memory, measured
    here at the same time: interpreter, torch, libp2p, the task's data, evaluation and
    the merge) + RSS_ALLOWANCE."""
    import json
    import subprocess

    from tests.conftest import REPO, fflnode_cmd

    out, base = tmp_path / "net", tmp_path / "baseline"
    ooc_model = ("--task-option", "d_model=192", "--task-option", "n_layers=8")
    tiny_model = ("--task-option", "d_model=16", "--task-option", "n_layers=1")
    budget = (
        "--set", f"train.memory_budget_mb={TESTNET_BUDGET_MB}",
        "--set", f"exchange.chunk_elems={NODE_CHUNK_ELEMS}",
    )  # fmt: skip
    runs = [
        subprocess.Popen(
            fflnode_cmd("testnet", "--nodes", str(n), *TESTNET_COMMON, *extra, "--out", str(d)),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for n, extra, d in ((2, ooc_model + budget, out), (1, tiny_model, base))
    ]
    for proc in runs:
        output, _ = proc.communicate(timeout=TESTNET_TIMEOUT_S)
        assert proc.returncode == 0, output[-4000:]
    report = json.loads((out / "report.json").read_text())
    merge = report["merge"]
    assert merge["hashes_agree"] and merge["files_equal_reference"]
    baseline = json.loads((base / "node0" / "result.json").read_text())["peak_rss_mb"]
    limit = baseline + TESTNET_BUDGET_MB + RSS_ALLOWANCE / MiB
    for name in ("node0", "node1"):
        assert report["nodes"][name]["exit_code"] == 0
        assert (out / name / "outofcore" / "outofcore-weights.blk").is_file()
        result = json.loads((out / name / "result.json").read_text())
        assert result["peak_rss_mb"] <= limit, (name, result["peak_rss_mb"], baseline)


def test_a_rounds_holo_encoded_delta_is_bit_identical(tmp_path: Path) -> None:
    """One round (3 Adam steps, micro-batch = batch): theta_start - theta_local encoded
    with the holo codec gives the same bytes in memory and out of core."""
    import numpy as np

    from fflnode.codecs import make_codec
    from fflnode.codecs.base import ChunkContext

    memory, ooc = make_trainers(tmp_path, "adam")
    try:
        codec = make_codec("holo", bits=2, scale="unbiased")
        encodings = []
        for trainer in (memory, ooc):
            start = trainer.flat()
            trainer.inner_steps(3)
            delta = start - trainer.flat()
            encodings.append(codec.encode(delta, ChunkContext(1, 0, 0, delta.numel())))
        a, b = encodings
        assert a.parts.keys() == b.parts.keys() and a.meta == b.meta
        for k in a.parts:
            assert np.array_equal(a.parts[k], b.parts[k]), k
    finally:
        ooc.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_streamed_steps_on_cuda_match_the_in_memory_steps(tmp_path: Path) -> None:
    """The same schedule with arenas, activations and compute on the GPU (reads land via
    Prism's pinned pool and side stream). 'Same' here is a bound, not bits: CUDA's
    embedding and cross-entropy backward accumulate with atomics in no fixed order, so
    two runs of the in-memory step differ too; 1e-5 after 3 SGD steps at lr 1e-2."""
    from fflnode.train.outofcore import OutOfCoreTrainer
    from fflnode.train.trainer import BatchStream, TrainSettings

    loaded = text_task()
    settings = TrainSettings(
        seed=3, local_steps=3, inner_lr=1e-2, outer_lr=1e-3, outer_momentum=0.0,
        inner_optimizer="sgd",
    )  # fmt: skip
    reference = build_model(loaded, settings.seed).cuda()
    opt = torch.optim.SGD(reference.parameters(), lr=settings.inner_lr)
    data = iter(loaded.task.train_data(0, 1, settings.seed))
    for _ in range(3):
        loss = loaded.task.loss(reference, next(data).cuda())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model = build_model(loaded, settings.seed).cuda()
    chain = task_chain(loaded, model)
    assert chain is not None
    batches = BatchStream(lambda: loaded.task.train_data(0, 1, settings.seed))
    ooc = OutOfCoreTrainer(
        loaded, model, chain, settings, batches, directory=tmp_path, memory_budget=256 * MiB
    )
    try:
        ooc.inner_steps(3)
        got = ooc.state_tensors()
        for name, p in reference.named_parameters():
            diff = (got[name] - p.detach().cpu()).abs().max()
            assert diff <= 1e-5, (name, float(diff))
    finally:
        ooc.close()


def test_the_premerge_file_is_written_and_the_merged_one_read_stage_by_stage(
    tmp_path: Path,
) -> None:
    """write_state_file streams the stages into the bytes save_tensors(state_tensors())
    writes; load_state_file puts a file's tensors back, stage by stage."""
    from fflnode.prism.writer import save_tensors

    memory, ooc = make_trainers(tmp_path, "adam")
    try:
        ooc.inner_steps(1)
        meta = {"fflnode.run": "r1"}
        ooc.write_state_file(tmp_path / "streamed.safetensors", meta)
        whole = ooc.state_tensors()
        save_tensors(tmp_path / "whole.safetensors", whole, meta)
        streamed = (tmp_path / "streamed.safetensors").read_bytes()
        assert streamed == (tmp_path / "whole.safetensors").read_bytes()
        other = {k: v + 1 for k, v in whole.items()}
        save_tensors(tmp_path / "merged.safetensors", other, meta)
        ooc.load_state_file(tmp_path / "merged.safetensors")
        got = ooc.state_tensors()
        assert got.keys() == other.keys()
        assert all(torch.equal(got[k], other[k]) for k in other)
        assert memory.state_shapes() == ooc.state_shapes()
    finally:
        ooc.close()


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NO_CUDA)])
def test_streamed_round_passes_equal_the_whole_vector_round(tmp_path: Path, device: str) -> None:
    """Arenas on `device` (the GPU too): the round's passes gather and scatter stages
    there and compute on CPU chunks, so Delta, the digest and the outer step equal the
    whole-vector ones computed from flat() on the CPU, bit for bit (outer Adam, 13
    chunks)."""
    from fflnode.exchange import state_digest
    from fflnode.train.outofcore import OutOfCoreTrainer
    from fflnode.train.trainer import BatchStream, OuterOptimizer, TrainSettings

    loaded = text_task()
    settings = TrainSettings(
        seed=3, local_steps=2, inner_lr=1e-2, outer_lr=1e-3, outer_momentum=0.0,
        inner_optimizer="adam",
    )  # fmt: skip
    model = build_model(loaded, settings.seed).to(device)
    chain = task_chain(loaded, model)
    assert chain is not None
    batches = BatchStream(lambda: loaded.task.train_data(0, 1, settings.seed))
    ooc = OutOfCoreTrainer(
        loaded, model, chain, settings, batches, directory=tmp_path,
        memory_budget=256 * MiB, chunk_elems=ROUND_CHUNK_ELEMS,
    )  # fmt: skip
    spans = ooc.spans
    try:
        reference = OuterOptimizer("adam", settings.outer_lr, 0.0)
        g = torch.Generator().manual_seed(5)
        for _ in range(2):
            start = ooc.flat()
            ooc.begin_round()
            ooc.inner_steps()
            assert ooc.start_digest() == state_digest(
                [start, *(t for t in (reference.m, reference.v) if t is not None)], reference.t
            )
            delta = torch.cat(list(ooc.delta_chunks()))
            assert torch.equal(delta, start - ooc.flat())
            mean = 1e-3 * torch.randn(ooc.numel, generator=g)
            ooc.outer_step_chunks(lambda i, mean=mean: mean[spans[i][0] : spans[i][1]])
            assert torch.equal(ooc.flat(), reference.step(start, mean))
    finally:
        ooc.close()


def test_state_federation_on_is_refused_for_a_model_streamed_out_of_core(tmp_path: Path) -> None:
    """Folding SSM states runs the whole model in memory, which an out-of-core node does
    not hold: "on" is refused at load, "auto" (the default) leaves the phase out."""
    from fflnode import config
    from fflnode.compose import compose

    p = tmp_path / "node.toml"
    p.write_text(
        NODE_TOML.format(budget=64, d_model=256, chunk_elems=NODE_CHUNK_ELEMS)
        + '[states]\nfederate = "on"\n'
    )
    with pytest.raises(ConfigError, match="needs the model in memory"):
        compose(config.load(p))
    (tmp_path / "auto").mkdir()
    comp = compose(node_config(tmp_path / "auto", 64, d_model=256))
    try:
        assert comp.states is None
    finally:
        comp.trainer.close()


# ----------------------------------------------------------------------------- rounds
# Exchange chunks of the streamed-round test: 50020 parameters in 13 chunks, so chunks
# straddle stage boundaries and stages straddle chunk boundaries.
ROUND_CHUNK_ELEMS = 4096


def averaging(chunk_elems: int, peer: object | None):
    """A holo-coded, error-feedback Averaging exchange with no host: `peer`, when given,
    is a member whose contribution the test hands over instead of the network."""
    from libp2p.peer.id import ID

    from fflnode.codecs import make_codec
    from fflnode.exchange import Averaging
    from fflnode.p2p.bulk import Traffic

    return Averaging(
        None,
        "r1",
        5,
        make_codec("holo", bits=2, scale="mse"),
        error_feedback=True,
        me=ID(b"\x00\x04me!!"),
        peers=[] if peer is None else [peer],
        chunk_elems=chunk_elems,
        round_timeout_s=1.0,
        traffic=Traffic(),
    )


def test_a_streamed_round_equals_the_in_memory_round(tmp_path: Path) -> None:
    """Three averaging rounds (3 inner Adam steps each, holo 2 bits with error feedback,
    outer Adam, one peer's Delta mixed in): the out-of-core trainer's chunk-by-chunk
    passes (start digest, Delta, encoding and residual, streamed mean, outer step) give
    the in-memory round's start digests, encoded bytes, weights and outer moments,
    bit for bit. Every operation is per element or per chunk, in the same order."""
    import numpy as np
    import trio
    from libp2p.peer.id import ID

    from fflnode import checkpoint
    from fflnode.exchange import STATE_PARTS, DiskState, StateSnapshot, state_digest

    peer = ID(b"\x00\x04peer")
    memory, ooc = make_trainers(tmp_path, "adam", chunk_elems=ROUND_CHUNK_ELEMS)
    try:
        assert ooc.streams_rounds and len(ooc.spans) == 13
        ex_m, ex_o = averaging(ROUND_CHUNK_ELEMS, peer), averaging(ROUND_CHUNK_ELEMS, peer)
        g = torch.Generator().manual_seed(11)
        for r in range(3):
            # The peer: a Delta encoded by its own exchange, handed over decoded (pull_delta)
            # or as its encodings (pull_encoded), with our start digest (in sync).
            ex_p = averaging(ROUND_CHUNK_ELEMS, None)
            peer_pub = ex_p.encode(r, 1e-3 * torch.randn(memory.numel, generator=g), 0)

            start_vectors = memory.state_vectors()
            memory.inner_steps()
            digest = state_digest(start_vectors, memory.outer.t)
            delta = start_vectors[0] - memory.flat()
            pub_m = ex_m.encode(r, delta, digest)
            ex_m.publish(r, pub_m)

            async def pull_delta(p, rnd, numel, est=peer_pub.estimate, d=digest):
                return est, d

            ex_m.pull_delta = pull_delta  # type: ignore[method-assign]
            mean, rep = trio.run(ex_m.gather, r)
            assert rep.received == 1 and rep.in_sync
            memory.outer_step(start_vectors[0], mean)

            ooc.begin_round()
            ooc.inner_steps()
            assert ooc.start_digest() == digest, r
            pub_o = ex_o.encode_chunks(r, ooc.delta_chunks(), digest, ooc.residual_store())
            ex_o.publish(r, pub_o)

            async def pull_encoded(p, rnd, numel, chunks=peer_pub.chunks, d=digest):
                return chunks, d

            ex_o.pull_encoded = pull_encoded  # type: ignore[method-assign]
            mean_of, rep_o = trio.run(ex_o.gather_streamed, r, ooc.numel)
            assert rep_o.received == 1 and rep_o.in_sync
            assert len(pub_m.chunks) == len(pub_o.chunks) == 13
            for a, b in zip(pub_m.chunks, pub_o.chunks, strict=True):
                assert a.parts.keys() == b.parts.keys()
                assert all(np.array_equal(a.parts[k], b.parts[k]) for k in a.parts), r
            streamed = torch.cat([mean_of(i) for i in range(len(ooc.spans))])
            assert torch.equal(streamed, mean), r
            ooc.outer_step_chunks(mean_of)
            assert ooc.outer.t == memory.outer.t
            for a, b in zip(memory.state_vectors(), ooc.state_vectors(), strict=True):
                assert torch.equal(a, b), r
            assert torch.equal(ex_m.residual, ooc._read_vector("res"))
        # The state a resyncing peer pulls, served from disk: the in-memory snapshot's.
        want = StateSnapshot.of(memory.state_vectors(), memory.outer.t)
        generation = ooc.generation
        ex_o.record_state(
            2,
            DiskState(
                ooc.numel,
                ooc.outer.t,
                ooc.read_state,
                ooc.start_digest,
                lambda: ooc.generation == generation,
            ),
        )
        ex_m.record_state(2, want)
        lo, hi = ROUND_CHUNK_ELEMS - 100, 2 * ROUND_CHUNK_ELEMS - 100  # straddles two chunks
        served = [trio.run(ex._resolve_weights, 2, lo, hi) for ex in (ex_m, ex_o)]
        assert served[0][2] == served[1][2]  # step and digest
        assert [n for n, _ in served[0][1]] == [n for n, _ in served[1][1]] == list(STATE_PARTS)
        for (_, a), (_, b) in zip(served[0][1], served[1][1], strict=True):
            assert np.array_equal(a, b)
        # The checkpoint written chunk by chunk from disk is the in-memory one, byte for byte.
        (weights, *moments), residual = ooc.chunked_state()
        assert residual is not None and len(moments) == 2
        written = []
        for name, w, outer, ef in (
            ("memory", memory.flat(), {"m": memory.outer.m, "v": memory.outer.v}, ex_m.residual),
            ("ooc", weights, dict(zip(("m", "v"), moments, strict=True)), residual),
        ):
            ckpt = checkpoint.Checkpoint(
                "r1", 2, ["a"], memory.outer.t, w, outer, {"ef.residual": ef},
                memory.sampler_state(),
            )  # fmt: skip
            (tmp_path / name).mkdir()
            written.append(checkpoint.save(tmp_path / name, ckpt).read_bytes())
        assert written[0] == written[1]
        # ... and resuming from it (whole, as a resync does, or read lazily chunk by
        # chunk, as a resume does) puts the same state back on disk.
        want = state_digest(memory.state_vectors(), memory.outer.t)
        back = checkpoint.load(tmp_path / "ooc", "r1", ooc.numel)
        assert back is not None
        ooc.load_state_vectors([back.weights, back.outer["m"], back.outer["v"]], back.outer_step)
        ooc.begin_round()
        assert ooc.start_digest() == want
        lazy = checkpoint.load(tmp_path / "ooc", "r1", ooc.numel, lazy=True)
        assert lazy is not None and isinstance(lazy.weights, checkpoint.FileVector)
        ooc.start_valid, ooc.has_residual = False, False
        parts = [lazy.weights, lazy.outer["m"], lazy.outer["v"]]
        ooc.load_state_ranges([v.read for v in parts], lazy.outer_step)
        ooc.load_residual(lazy.exchange["ef.residual"].read)
        assert ooc.start_valid and ooc.start_digest() == want
        assert torch.equal(ooc.flat(), memory.flat())
        assert torch.equal(ooc._read_vector("res"), ex_m.residual)
    finally:
        ooc.close()
