"""Out-of-core local training: a model bigger than the node's memory, streamed through Prism.

Owns: the inner steps of a task whose model is a chain of stages (Task.blocks, see
fflnode.train.task: input stem, blocks, head), with every stage's weights and its inner
optimizer's per-parameter state (Adam's m and v; nothing for SGD) in one BlockFile in the
data directory, and block-boundary activations spilled to a second one when they do not
fit. It offers LocalTrainer's interface, so the round loop drives either.

Theory of operation. One inner step over a batch of N rows, S stages, micro-batches of M:
* Forward, stages 0..S-2: read stage k's weights (only w) into arena k % 2 while stage
  k-1 computes from the other arena; run stage k over the batch M rows at a time (no
  autograd); its output h[k+1] is a block-boundary activation, kept in RAM if the memory
  plan has room for it, else written to the spill file (the write overlaps stage k+1).
  The head (stage S-1) is not run forward: the backward pass runs it once, with grad.
* Backward, stages S-1..0: read stage k's w and optimizer state (arena k % 2) while
  stage k+1 finishes; for each micro-batch recompute stage k's forward from its saved
  input h[k] (read back from the spill file, prefetched one stage ahead, if it was
  spilled) with autograd on, and backpropagate the gradient of its output (the head:
  the loss, weighted by M/N) into the stage's parameter gradients and the gradient of
  its input; then apply the inner update to the stage (torch.optim.Adam / SGD, the
  same code LocalTrainer uses, on the arena) and write w, m, v back; the write-back
  and the next-but-one stage's read are one I/O job that overlaps stage k-1's compute.
So each stage's weights are read twice per step (forward, backward) and its state once,
whatever the number of micro-batches, and written once.

Memory arithmetic (MemoryPlan): with B the largest stage's element count and s the
number of per-parameter tensors (1 for SGD, 3 for Adam), the arenas hold 2·s·B floats
(double buffering) plus B of gradients; A = the bytes of one boundary activation of the
whole batch; the backward pass holds the output gradient, the input gradient, the input
and a prefetched input (4·A), plus a micro-batch's autograd working set; what is left of
the budget keeps the latest boundaries resident (the backward pass wants them first), the
rest are spilled. Plus both block files' Prism pools. The budget the plan spends is what
is left after the exchange's encoded Deltas (`round_held`, from compose.held_encodings),
which stay in RAM through a round and the next one's steps. `peak_held` counts every
tensor the trainer allocates, at its peak; tests check it and the process's RSS against
the budget.

Equivalence. With M = N, a step runs the same operations in the same order as
LocalTrainer's (the chain's contract), and a gradient reaching a tensor used in two places
is a sum of two terms (commutative), so the weights are bit-identical (the test pins it).
With M < N, gradients are sums over micro-batches: equal up to float32 reassociation.

Where I/O happens: a private trio loop in one thread (BlockIO) owns both block files;
compute stays in the caller's thread (the node runs inner_steps in a worker thread) and
waits on futures. Reads and writes go through Prism's io_uring engine, O_DIRECT.

The round, chunk by chunk (fflnode.rounds streams an averaging round through these when
the stages are contiguous ranges of the flat vector, `streams_rounds`): the same file
holds one region per exchange chunk i of start.i (the weights the round started from),
m.i, v.i (the outer optimizer's moments) and res.i (the error-feedback residual).
begin_round copies the stages into start.i (only after a load; the outer step leaves
them there); start_digest hashes start.i, m.i, v.i in order (state_digest's bytes);
delta_chunks reads the stages once, in flat order, and yields start.i - local; the
exchange encodes each chunk as it comes (residual from and back to res.i); the outer
step reads start.i, m.i, v.i and the mean's chunk i, applies OuterOptimizer.apply and
writes the new weights to start.i and, stage by stage, to the stages, the moments back;
read_state serves start.i, m.i, v.i to resyncing peers until the next outer step.
A pass holds arena 0 and 1's w (one stage each) and ROUND_CHUNK_BUFFERS chunks: checked
against the budget at load. Still |θ|-sized, in RAM: state_vectors()/load_state_vectors()
(a resync, a resume from a checkpoint), flat()/state_tensors() (the final merge's
premerge file, a gossip or sharded or robust round, which do not stream). The model is
not: a task with `init_stage` (the text LM) hands over its meta-device skeleton, and each
stage is allocated, initialised, written to the block file and released in turn
(`_write_initial`); a task without it is built whole once at start, then written out.

Must never: hold more than two stages' weights and state at once, or change the result
of a step from the in-memory trainer's beyond what the micro-batch split implies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import trio
from torch import nn

from fflnode.checkpoint import Chunked
from fflnode.errors import ConfigError
from fflnode.prism.blockfile import BlockFile
from fflnode.prism.reader import SafetensorsFile
from fflnode.prism.safetensors import TORCH_DTYPE_NAMES
from fflnode.prism.writer import AtomicSafetensorsWriter
from fflnode.train.task import (
    BlockChain,
    LoadedTask,
    as_metrics,
    batch_rows,
    check_materialized,
    federated_buffers,
    federated_parameters,
    materialize_stage,
    slice_rows,
)
from fflnode.train.trainer import BatchStream, OuterOptimizer, RoundState, TrainSettings

# Per-parameter tensors each inner optimizer keeps in the block file: the weights, and
# Adam's first and second moments.
OPT_STATES = {"sgd": ("w",), "adam": ("w", "m", "v")}
WEIGHTS_FILE = "outofcore-weights.blk"
# The round's flat vectors kept in the weights file, one region per exchange chunk: the
# weights the round started from, the outer optimizer's moments, the error-feedback
# residual. The exchange's default chunk (config: exchange.chunk_elems).
ROUND_KINDS = ("start", "m", "v", "res")
DEFAULT_CHUNK_ELEMS = 1 << 20
# Chunk-sized buffers a round pass holds at once (the outer step: g, theta_start, m, v,
# the new theta, the float64 mean accumulator counted twice, a decoded estimate; the
# encode pass holds fewer), beside one stage in each of arena 0 and 1's w.
ROUND_CHUNK_BUFFERS = 8
SPILL_FILE = "outofcore-activations.blk"
# Queue depth of each block file: 4 x 1 MiB requests in flight. Prism's bench saturates
# the NVMe at depth 8 (DESIGN.md); depth 4 keeps both files' pools to 2 x 10 MiB of the
# budget (the pools are (depth + 2) + depth slots of 1 MiB).
IO_DEPTH = 4
IO_REQUEST_BYTES = 1 << 20
POOL_BYTES = ((IO_DEPTH + 2) + IO_DEPTH) * IO_REQUEST_BYTES  # per block file
# A micro-batch's autograd working set, in boundary-activation bytes per row. An
# estimate, not a measurement: an SSD block saves about a dozen D-wide tensors per row
# (two norms, the in-projection's x, z, B, C, dt, the scan's chunk states, the MLP's
# hidden and GELU at 2·D each) and the head its logits and their gradient (2·V/D). The
# RSS test (tests/test_outofcore.py) checks the whole process against the budget.
WORKING_FACTOR = 32
FLOAT_BYTES = 4
# glibc's mallopt parameter and its default value, which out-of-core training pins (see
# pin_allocator for the measurement).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 << 10


@dataclass(frozen=True)
class MemoryPlan:
    """How a budget is spent (bytes). `resident` of `boundaries` boundary activations stay
    in RAM; the others are spilled."""

    budget: int
    arenas: int  # double-buffered weights + optimizer state, plus one stage's gradients
    pools: int  # the block files' Prism pools
    boundary: int  # one boundary activation of the whole batch
    working: int  # 4 boundary buffers of the backward pass + a micro-batch's working set
    boundaries: int
    resident: int

    @property
    def spilled(self) -> int:
        return self.boundaries - self.resident

    @property
    def held(self) -> int:
        """The most the plan holds at once (bytes)."""
        return self.arenas + self.pools + self.working + self.resident * self.boundary


def plan_memory(
    budget: int,
    largest_stage: int,
    states: int,
    boundary: int,
    boundaries: int,
    rows: int,
    micro_rows: int,
) -> MemoryPlan:
    """Spend `budget` bytes; ConfigError when the fixed part alone does not fit.
    `largest_stage` in elements, `boundary` in bytes (one activation, all `rows`)."""
    arenas = FLOAT_BYTES * largest_stage * (2 * states + 1)
    pools = 2 * POOL_BYTES
    working = 4 * boundary + WORKING_FACTOR * boundary * micro_rows // max(rows, 1)
    spare = budget - arenas - pools - working
    if spare < 0:
        raise ConfigError(
            f"train.memory_budget_mb: {budget >> 20} MiB cannot hold even the streaming "
            f"minimum: {arenas >> 20} MiB for two stages' weights and optimizer state, "
            f"{pools >> 20} MiB of I/O pools, {working >> 20} MiB of activation buffers "
            "and a micro-batch's working set; raise the budget, use smaller blocks or a "
            "smaller batch"
        )
    resident = min(boundaries, spare // boundary) if boundary else boundaries
    return MemoryPlan(budget, arenas, pools, boundary, working, boundaries, resident)


def in_memory_bytes(numel: int, inner_optimizer: str) -> int:
    """What LocalTrainer holds for a model of `numel` parameters: weights, gradients and
    the inner optimizer's state (activations and the round loop's copies not counted)."""
    return FLOAT_BYTES * numel * (1 + len(OPT_STATES[inner_optimizer]))


class BlockIO:
    """A private trio loop in its own thread; other threads submit coroutine functions
    and get concurrent.futures.Futures. Block files are used from this loop only."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), name="ooc-io")
        self._thread.daemon = True  # close() joins it; daemon only so a crash cannot hang exit
        self._thread.start()
        self._ready.wait()

    async def _main(self) -> None:
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await self._stop.wait()

    def submit(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> Future:
        fut: Future = Future()

        async def job() -> None:
            try:
                fut.set_result(await afn(*args))
            except Exception as e:  # handed to the waiting thread
                fut.set_exception(e)

        assert self._token is not None and self._nursery is not None
        self._token.run_sync_soon(self._nursery.start_soon, job)
        return fut

    def run(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return self.submit(afn, *args).result()

    def close(self) -> None:
        if self._thread.is_alive():
            assert self._token is not None and self._stop is not None
            self._token.run_sync_soon(self._stop.set)
            self._thread.join()


class OutOfCoreTrainer(RoundState):
    """LocalTrainer's interface, with the model's stages streamed from a block file.

    `sample_batch` (one of the task's batches), when given, checks the budget at once.
    `model` is the task's freshly built model: its stages' parameters are written to the
    block file and their storage released; from then on a stage's parameters point into
    an arena only while that stage computes."""

    def __init__(
        self,
        loaded: LoadedTask,
        model: nn.Module,
        chain: BlockChain,
        settings: TrainSettings,
        batches: BatchStream,
        *,
        directory: Path,
        memory_budget: int,
        micro_batch: int = 0,
        backend: str | None = "auto",
        sample_batch: Any = None,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        round_held: Callable[[int], int] | None = None,
    ) -> None:
        self.loaded, self.task, self.s, self.batches = loaded, loaded.task, settings, batches
        self.model, self.chain = model, chain
        self.memory_budget, self.micro_batch = memory_budget, micro_batch
        named = federated_parameters(model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.buffers = federated_buffers(model)
        self.shapes = {id(p): tuple(p.shape) for p in self.params}
        # Arenas, activations and compute live on the model's device (the CPU here); a
        # skeleton's (meta) stages are materialized on the CPU one at a time.
        self.skeleton = any(p.is_meta for p in self.params)
        self.materialized: set[int] = set()  # skeleton stages given storage and values
        self.device = torch.device("cpu") if self.skeleton else self.params[0].device
        self.flat_offset: dict[int, int] = {}
        pos = 0
        for p in self.params:
            self.flat_offset[id(p)] = pos
            pos += p.numel()
        self.numel = pos
        self.kinds = OPT_STATES[settings.inner_optimizer]
        federated = {id(p) for p in self.params}
        self.stage_params: list[list[nn.Parameter]] = []
        for stage in chain.stages:
            seen: dict[int, nn.Parameter] = {}
            for p in stage.module.parameters():
                if id(p) in federated:
                    seen.setdefault(id(p), p)
            self.stage_params.append(list(seen.values()))
        self.stage_numel = [sum(p.numel() for p in ps) for ps in self.stage_params]
        self.largest = max(self.stage_numel)
        self.adam_steps = {id(p): 0 for p in self.params}
        # The round's flat-vector passes read the stages in canonical (flat) order: each
        # stage must be one contiguous range of the flat vector (the text LM's are).
        self.stage_lo = [
            min((self.flat_offset[id(p)] for p in ps), default=0) for ps in self.stage_params
        ]
        self.flat_stages = sorted(
            (k for k, n in enumerate(self.stage_numel) if n), key=lambda k: self.stage_lo[k]
        )
        pos = 0
        for k in self.flat_stages:
            pos = self.stage_lo[k] + self.stage_numel[k] if self.stage_lo[k] == pos else -1
        self.streams_rounds = pos == self.numel
        self.spans = [
            (a, min(a + chunk_elems, self.numel)) for a in range(0, self.numel, chunk_elems)
        ]
        self.chunk_elems = min(chunk_elems, self.numel)
        # The outer optimizer's moments (on disk, chunk by chunk) and whether start.i
        # holds the weights the current round started from.
        self.moments: tuple[str, ...] = ()
        self.start_valid = False
        self.has_residual = False
        # Bumped whenever start.i, m.i, v.i change (an outer step, a load): a state served
        # to peers, and the cached digest of it, belong to one generation.
        self.generation = 0
        self._digest: tuple[int, int] | None = None  # (generation, digest)
        self.outer = OuterOptimizer(
            settings.outer_optimizer,
            settings.outer_lr,
            settings.outer_momentum,
            settings.lr_schedule,
            settings.total_rounds,
        )
        self.steps_taken = 0
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        # Accounting: bytes of tensors the trainer holds now and at most, I/O volume.
        self.held = 0
        self.peak_held = 0
        self.io = {"read": 0, "written": 0, "wait_s": 0.0, "compute_s": 0.0}
        self.plan: MemoryPlan | None = None
        self._spill: BlockFile | None = None
        self._spill_numel = 0
        # The exchange keeps encoded Deltas in RAM through the round and the next one's
        # inner steps (compose.held_encodings): they come out of the budget first.
        self.encodings = round_held(self.numel) if round_held is not None else 0
        if sample_batch is not None:  # check the budget now, not at the first step
            if self.skeleton:
                self._materialize(0)
            with torch.no_grad():
                h = chain.stages[0](chain.model_input(sample_batch))
            rows = batch_rows(sample_batch)
            lo, hi = self._micro_batches(rows)[0]
            shape = (self.largest, len(self.kinds), h.numel() * h.element_size())
            rest = (len(chain.stages) - 1, rows, hi - lo)
            del h
            plan = plan_memory(memory_budget, *shape, *rest)  # the minimum, alone
            fixed = plan.arenas + plan.pools
            round_pass = ROUND_CHUNK_BUFFERS * FLOAT_BYTES * self.chunk_elems
            if self.streams_rounds and fixed + round_pass > memory_budget:
                fits = (memory_budget - fixed) // (ROUND_CHUNK_BUFFERS * FLOAT_BYTES)
                raise ConfigError(
                    f"train.memory_budget_mb: {memory_budget >> 20} MiB cannot hold a round's "
                    f"chunk-by-chunk passes: {plan.arenas >> 20} MiB of stage arenas, "
                    f"{plan.pools >> 20} MiB of I/O pools and {round_pass >> 20} MiB for "
                    f"{ROUND_CHUNK_BUFFERS} buffers of exchange.chunk_elems = {chunk_elems}; "
                    f"set exchange.chunk_elems to at most {max(fits, 0)} (every node of the "
                    "run the same) or raise the budget"
                )
            # Inner steps hold the working set, round passes the chunk buffers; encoded
            # Deltas stay through both.
            busiest = fixed + max(plan.working, round_pass if self.streams_rounds else 0)
            if busiest + self.encodings > memory_budget:
                raise ConfigError(
                    f"train.memory_budget_mb: {memory_budget >> 20} MiB cannot hold "
                    f"{busiest >> 20} MiB of stage arenas, I/O pools and a step's or a "
                    f"round's buffers beside {self.encodings >> 20} MiB of encoded Deltas "
                    "(this node's for the last rounds and one per peer); choose a codec with "
                    'fewer bits (exchange.codec = "holo", exchange.bits = 1) or raise the '
                    "budget"
                )
            self.plan = plan_memory(memory_budget - self.encodings, *shape, *rest)
        self._blockio = BlockIO()
        regions = {
            f"{k}.{kind}": max(n, 1) for k, n in enumerate(self.stage_numel) for kind in self.kinds
        }
        if self.streams_rounds:  # the round's vectors, one region per exchange chunk
            for i, (lo, hi) in enumerate(self.spans):
                regions.update({f"{kind}.{i}": hi - lo for kind in ROUND_KINDS})
        self._file = BlockFile(
            self.directory / WEIGHTS_FILE,
            regions,
            backend=backend,
            depth=IO_DEPTH,
            request_bytes=IO_REQUEST_BYTES,
        )
        self.arenas = [
            {kind: torch.zeros(max(self.largest, 1), device=self.device) for kind in self.kinds}
            for _ in range(2)
        ]
        # The arenas, and one stage's parameter gradients (autograd allocates them).
        self._hold((2 * len(self.kinds) + 1) * self.largest * FLOAT_BYTES)
        self.boundary_shape: tuple[int, ...] = ()
        self._write_initial()

    # -- accounting --
    def _hold(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak_held = max(self.peak_held, self.held)

    def _release(self, nbytes: int) -> None:
        self.held -= nbytes

    # -- the block file --
    def _write_initial(self) -> None:
        """Write every stage's weights (and zero optimizer state), release the storage. A
        skeleton's stage is materialized (allocated and initialised by the task) just
        before it is written, so the model is never whole in memory."""
        arena = self.arenas[0]
        for k, ps in enumerate(self.stage_params):
            if self.skeleton:
                self._materialize(k)
            n = self.stage_numel[k]
            pos = 0
            for p in ps:
                arena["w"][pos : pos + p.numel()].copy_(p.detach().reshape(-1))
                pos += p.numel()
            for kind in self.kinds[1:]:
                arena[kind][:n].zero_()
            self._blockio.run(self._write_stage, k, 0, self.kinds)
            for p in ps:
                p.data = torch.empty(0, device=self.device)
        if self.skeleton:
            check_materialized(self.loaded, self.model)
        pin_allocator()

    def _materialize(self, k: int) -> None:
        """Give skeleton stage k its storage and the task's values, once (every stage,
        even one whose tensors the skeleton already holds on the CPU: the in-memory
        build initialises every stage, so the bits must come from init_stage here too)."""
        if k not in self.materialized:
            materialize_stage(self.loaded, self.chain.stages[k], self.s.seed, self.device)
            self.materialized.add(k)

    async def _read_stage(self, k: int, slot: int, kinds: tuple[str, ...]) -> None:
        n = max(self.stage_numel[k], 1)
        for kind in kinds:
            await self._file.read_into(f"{k}.{kind}", self.arenas[slot][kind][:n])
        self.io["read"] += FLOAT_BYTES * n * len(kinds)

    async def _write_stage(self, k: int, slot: int, kinds: tuple[str, ...]) -> None:
        n = max(self.stage_numel[k], 1)
        for kind in kinds:
            await self._file.write_from(f"{k}.{kind}", self.arenas[slot][kind][:n])
        self.io["written"] += FLOAT_BYTES * n * len(kinds)

    async def _write_then_read(self, k_write: int, k_read: int | None, slot: int) -> None:
        await self._write_stage(k_write, slot, self.kinds)
        if k_read is not None:
            await self._read_stage(k_read, slot, self.kinds)

    def _wait(self, fut: Future) -> Any:
        t0 = time.perf_counter()
        result = fut.result()
        self.io["wait_s"] += time.perf_counter() - t0
        return result

    def _sync(self) -> None:
        """Wait for the device's queued kernels before the I/O thread touches a buffer
        they use (a no-op on the CPU, where compute is synchronous). Reads into a CUDA
        arena copy on Prism's side stream, which does not wait for the compute stream."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _stage_spans(self, k: int) -> Iterator[tuple[nn.Parameter, int, int, int]]:
        """Stage k's parameters, each with where it lies in an arena slot (`pos`, in
        parameter order), in canonical flat order from the stage's start (`off`), and
        its size `n`."""
        pos = 0
        for p in self.stage_params[k]:
            n = _numel(self.shapes[id(p)])
            yield p, pos, self.flat_offset[id(p)] - self.stage_lo[k], n
            pos += n

    def _bind(self, k: int, slot: int) -> None:
        """Point stage k's parameters into arena `slot`."""
        for p, pos, _, n in self._stage_spans(k):
            p.data = self.arenas[slot]["w"][pos : pos + n].view(self.shapes[id(p)])

    def _unbind(self, k: int) -> None:
        for p in self.stage_params[k]:
            p.data = torch.empty(0, device=self.device)
            p.grad = None

    # -- one step --
    def _micro_batches(self, rows: int) -> list[tuple[int, int]]:
        m = self.micro_batch if 0 < self.micro_batch < rows else rows
        return [(lo, min(lo + m, rows)) for lo in range(0, rows, m)]

    def _ensure_plan(self, boundary: torch.Tensor, rows: int, micro_rows: int) -> MemoryPlan:
        nbytes = boundary.numel() * boundary.element_size()
        plan = self.plan
        if plan is None or plan.boundary != nbytes:
            plan = plan_memory(
                self.memory_budget - self.encodings,
                self.largest,
                len(self.kinds),
                nbytes,
                len(self.chain.stages) - 1,
                rows,
                micro_rows,
            )
            self.plan = plan
        self.boundary_shape = tuple(boundary.shape)
        if plan.spilled and self._spill_numel != boundary.numel():
            if self._spill is not None:
                self._blockio.run(self._spill.aclose)
            self._spill = BlockFile(
                self.directory / SPILL_FILE,
                {f"h{k}": boundary.numel() for k in range(1, plan.boundaries + 1)},
                backend=self.backend,
                depth=IO_DEPTH,
                request_bytes=IO_REQUEST_BYTES,
            )
            self._spill_numel = boundary.numel()
        return plan

    def _check_spillable(self, h: Any, k: int) -> None:
        if not (isinstance(h, torch.Tensor) and h.dtype == torch.float32):
            raise ConfigError(
                f"out-of-core: stage {self.chain.stages[k - 1].name!r} output is not a float32 "
                "tensor, so it cannot be spilled"
            )
        if h.numel() != self._spill_numel:
            raise ConfigError(
                f"out-of-core: boundary activations differ in size (stage "
                f"{self.chain.stages[k - 1].name!r}: {h.numel()} elements, the first: "
                f"{self._spill_numel}); spilling needs them all alike"
            )

    async def _spill_write(self, k: int, h: torch.Tensor) -> None:
        assert self._spill is not None
        await self._spill.write_from(f"h{k}", h.reshape(-1))
        self.io["written"] += h.numel() * FLOAT_BYTES

    async def _spill_read(self, k: int, out: torch.Tensor) -> None:
        assert self._spill is not None
        await self._spill.read_into(f"h{k}", out.reshape(-1))
        self.io["read"] += out.numel() * FLOAT_BYTES

    def step(self, batch: Any) -> float:
        """One inner step over `batch`; returns its loss."""
        t_start = time.perf_counter()
        wait_before = self.io["wait_s"]
        chain, S = self.chain, len(self.chain.stages)
        batch = _to_device(batch, self.device)
        rows = batch_rows(batch)
        mbs = self._micro_batches(rows)
        x = chain.model_input(batch)
        saved: dict[int, Any] = {0: x}  # boundary index -> resident activation
        spilled: set[int] = set()
        plan: MemoryPlan | None = None
        # Forward over stages 0..S-2 (the head runs once, in the backward pass).
        fut = self._blockio.submit(self._read_stage, 0, 0, ("w",) if S > 1 else self.kinds)
        h, out = x, None
        pending_spill: tuple[Future, int] | None = None
        for k in range(S - 1):
            slot = k % 2
            self._wait(fut)
            self._sync()  # stage k-1's kernels are done with the arena about to be refilled
            nxt_kinds = ("w",) if k + 1 < S - 1 else self.kinds
            fut = self._blockio.submit(self._read_stage, k + 1, 1 - slot, nxt_kinds)
            self._bind(k, slot)
            stage = chain.stages[k]
            with torch.no_grad():
                parts = [stage(h[lo:hi]) for lo, hi in mbs]
                out = parts[0] if len(parts) == 1 else torch.cat(parts)
            del parts
            self._unbind(k)
            nbytes = out.numel() * out.element_size()
            self._hold(nbytes)
            if plan is None:
                plan = self._ensure_plan(out, rows, mbs[0][1] - mbs[0][0])
            if pending_spill is not None:  # the previous boundary is on disk: drop it
                self._wait(pending_spill[0])
                dropped = saved.pop(pending_spill[1])
                self._release(dropped.numel() * dropped.element_size())
                pending_spill = None
            saved[k + 1] = out
            if k + 1 <= plan.spilled:  # the earliest boundaries go to disk
                self._check_spillable(out, k + 1)
                self._sync()
                pending_spill = (self._blockio.submit(self._spill_write, k + 1, out), k + 1)
                spilled.add(k + 1)
            h = out
        if pending_spill is not None:
            self._wait(pending_spill[0])
            dropped = saved.pop(pending_spill[1])
            self._release(dropped.numel() * dropped.element_size())
        del h, out
        self._sync()
        # Stage S-1 (all its state) is being read; S-2's weights are in its arena, but
        # its optimizer state is not: read it whole again while the head computes.
        reads = {S - 1: fut}
        if S >= 2:
            reads[S - 2] = self._blockio.submit(self._read_stage, S - 2, (S - 2) % 2, self.kinds)
        writes: list[Future] = []
        # Backward over stages S-1..0.
        staging: list[torch.Tensor | None] = [None, None]
        act_fut: Future | None = None

        def prefetch_input(k: int) -> Future | None:
            if k not in spilled:
                return None
            buf = staging[k % 2]
            if buf is None:
                buf = staging[k % 2] = torch.empty(self._spill_numel, device=self.device)
                self._hold(buf.numel() * FLOAT_BYTES)
            return self._blockio.submit(self._spill_read, k, buf)

        act_fut = prefetch_input(S - 1)
        g_out: torch.Tensor | None = None
        total = 0.0
        for k in reversed(range(S)):
            slot = k % 2
            self._wait(reads.pop(k))
            if act_fut is not None:
                self._wait(act_fut)
            next_act = prefetch_input(k - 1) if k >= 1 else None
            if k in spilled:
                buf = staging[k % 2]
                assert buf is not None
                h_in = buf.view(self.boundary_shape)
            else:
                h_in = saved[k]
            self._bind(k, slot)
            stage = chain.stages[k]
            wants_grad = k > 0
            g_in = torch.empty_like(h_in) if wants_grad else None
            if g_in is not None:
                self._hold(g_in.numel() * g_in.element_size())
            for lo, hi in mbs:
                xin = h_in[lo:hi].detach()
                if wants_grad:
                    xin.requires_grad_(True)
                y = stage(xin)
                if k == S - 1:
                    loss = chain.loss(y, slice_rows(batch, lo, hi))
                    if len(mbs) > 1:
                        loss = loss * ((hi - lo) / rows)
                    loss.backward()
                    total += float(loss.detach())
                else:
                    assert g_out is not None
                    y.backward(g_out[lo:hi])
                if g_in is not None:
                    g_in[lo:hi] = xin.grad
                del y, xin
            if g_out is not None:
                self._release(g_out.numel() * g_out.element_size())
            g_out = g_in
            self._inner_update(k, slot)
            self._unbind(k)
            if k in saved and k > 0:
                dropped = saved.pop(k)
                self._release(dropped.numel() * dropped.element_size())
            del h_in
            # Write stage k back, then read stage k-2 into the same arena: one job that
            # overlaps stage k-1's compute.
            self._sync()  # the update has landed before it is written back
            job = self._blockio.submit(self._write_then_read, k, k - 2 if k >= 2 else None, slot)
            if k >= 2:
                reads[k - 2] = job
            else:
                writes.append(job)
            act_fut = next_act
        for job in writes:  # the last write-backs
            self._wait(job)
        if g_out is not None:
            self._release(g_out.numel() * g_out.element_size())
        for buf in staging:
            if buf is not None:
                self._release(buf.numel() * FLOAT_BYTES)
        self.io["compute_s"] += time.perf_counter() - t_start - (self.io["wait_s"] - wait_before)
        return total

    def _inner_update(self, k: int, slot: int) -> None:
        """The inner optimizer on stage k's parameters, its state in arena `slot`: the
        same torch.optim code LocalTrainer runs, so the same bits."""
        ps = [p for p in self.stage_params[k] if p.grad is not None]
        if not ps:
            return
        if self.s.inner_optimizer == "sgd":
            torch.optim.SGD(ps, lr=self.s.inner_lr).step()
            return
        opt = torch.optim.Adam(ps, lr=self.s.inner_lr)
        pos = 0
        views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for p in self.stage_params[k]:
            n = p.numel()
            views[id(p)] = (
                self.arenas[slot]["m"][pos : pos + n].view_as(p),
                self.arenas[slot]["v"][pos : pos + n].view_as(p),
            )
            pos += n
        for p in ps:
            m, v = views[id(p)]
            opt.state[p] = {
                "step": torch.tensor(float(self.adam_steps[id(p)]), dtype=torch.float32),
                "exp_avg": m,
                "exp_avg_sq": v,
            }
        opt.step()
        for p in ps:
            self.adam_steps[id(p)] = int(opt.state[p]["step"])

    # -- LocalTrainer's interface --
    def inner_steps(self, steps: int | None = None) -> float:
        """H local steps; returns the mean training loss."""
        n = steps if steps is not None else self.s.local_steps
        total = 0.0
        for _ in range(n):
            total += self.step(next(self.batches))
            self.steps_taken += 1
        return total / max(n, 1)

    def flat(self) -> torch.Tensor:
        """The weights as one flat vector in canonical order (|θ| floats in RAM)."""
        out = torch.empty(self.numel)
        for k, ps in enumerate(self.stage_params):
            self._blockio.run(self._read_stage, k, 0, ("w",))
            pos = 0
            for p in ps:
                n = _numel(self.shapes[id(p)])
                off = self.flat_offset[id(p)]
                out[off : off + n].copy_(self.arenas[0]["w"][pos : pos + n])
                pos += n
        return out

    def load_flat(self, flat: torch.Tensor) -> None:
        """Write the weights from a flat vector (optimizer state is kept)."""
        self.start_valid = False
        for k, ps in enumerate(self.stage_params):
            pos = 0
            for p in ps:
                n = int(torch.Size(self.shapes[id(p)]).numel())
                off = self.flat_offset[id(p)]
                self.arenas[0]["w"][pos : pos + n].copy_(flat[off : off + n])
                pos += n
            self._blockio.run(self._write_stage, k, 0, ("w",))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        flat = self.flat()
        out = {
            n: flat[self.flat_offset[id(p)] : self.flat_offset[id(p)] + _numel(self.shapes[id(p)])]
            .view(self.shapes[id(p)])
            .clone()
            for n, p in zip(self.names, self.params, strict=True)
        }
        out.update({n: b.detach().clone() for n, b in self.buffers})
        return out

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of what state_tensors() returns, without reading the weights."""
        out = {n: self.shapes[id(p)] for n, p in zip(self.names, self.params, strict=True)}
        out.update({n: tuple(b.shape) for n, b in self.buffers})
        return out

    def write_state_file(self, path: Path, metadata: dict[str, str]) -> None:
        """state_tensors() as one safetensors file, stage by stage from the block file:
        the same bytes as save_tensors(state_tensors()), one stage in RAM."""
        specs = {n: ("F32", shape) for n, shape in self.state_shapes().items()}
        for n, b in self.buffers:
            specs[n] = (TORCH_DTYPE_NAMES[str(b.dtype)], tuple(b.shape))
        by_id = {id(p): n for n, p in zip(self.names, self.params, strict=True)}
        with AtomicSafetensorsWriter(path, specs, metadata) as w:
            for k, ps in enumerate(self.stage_params):
                self._blockio.run(self._read_stage, k, 0, ("w",))
                pos = 0
                for p in ps:
                    n = _numel(self.shapes[id(p)])
                    w.write_tensor(by_id[id(p)], self.arenas[0]["w"][pos : pos + n].cpu())
                    pos += n
            for name, b in self.buffers:
                w.write_tensor(name, b.detach().contiguous().cpu())
            w.commit()

    def load_state_file(self, path: Path) -> None:
        """load_state_tensors() from a safetensors file, stage by stage (one stage, one
        parameter read at a time in RAM)."""
        by_id = {id(p): n for n, p in zip(self.names, self.params, strict=True)}
        with SafetensorsFile(path) as f:
            for k, ps in enumerate(self.stage_params):
                pos = 0
                for p in ps:
                    n = _numel(self.shapes[id(p)])
                    self.arenas[0]["w"][pos : pos + n].copy_(f.tensor(by_id[id(p)]).reshape(-1))
                    pos += n
                self._sync()
                self._blockio.run(self._write_stage, k, 0, ("w",))
            with torch.no_grad():
                for name, b in self.buffers:
                    b.copy_(f.tensor(name).view_as(b))
        self.start_valid = False

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        flat = torch.empty(self.numel)
        for n, p in zip(self.names, self.params, strict=True):
            off = self.flat_offset[id(p)]
            flat[off : off + _numel(self.shapes[id(p)])].copy_(tensors[n].reshape(-1))
        self.load_flat(flat)
        with torch.no_grad():
            for n, b in self.buffers:
                b.copy_(tensors[n].view_as(b))

    def outer_step(self, theta_start: torch.Tensor, g: torch.Tensor) -> None:
        self.load_flat(self.outer.step(theta_start, g))

    # -- the round's flat-vector passes (fflnode.rounds streams these) --
    def _read_region(self, name: str, n: int) -> torch.Tensor:
        out = torch.empty(n)
        self._blockio.run(self._file.read_into, name, out)
        self.io["read"] += FLOAT_BYTES * n
        return out

    def _write_region(self, name: str, data: torch.Tensor) -> None:
        self._blockio.run(self._file.write_from, name, data.contiguous())
        self.io["written"] += FLOAT_BYTES * data.numel()

    def _stage_flat(self, k: int) -> torch.Tensor:
        """Stage k's weights in canonical (flat) order, in arena 1 (arena 0 reads)."""
        self._blockio.run(self._read_stage, k, 0, ("w",))
        src, dst = self.arenas[0]["w"], self.arenas[1]["w"]
        for _, pos, off, n in self._stage_spans(k):
            dst[off : off + n].copy_(src[pos : pos + n])
        return dst[: self.stage_numel[k]]

    def _write_stage_flat(self, k: int) -> None:
        """Write stage k's weights from arena 1, in canonical order (as _stage_flat left them)."""
        src, dst = self.arenas[1]["w"], self.arenas[0]["w"]
        for _, pos, off, n in self._stage_spans(k):
            dst[pos : pos + n].copy_(src[off : off + n])
        self._sync()  # the copies above have landed before the I/O thread reads arena 0
        self._blockio.run(self._write_stage, k, 0, ("w",))

    def _local_chunks(self) -> Iterator[torch.Tensor]:
        """The current weights, chunk i of spans after chunk i: each stage read once."""
        buf = torch.empty(self.chunk_elems)
        order = iter(self.flat_stages)
        cur, cur_lo, cur_hi = None, 0, 0
        for lo, hi in self.spans:
            out = buf[: hi - lo]
            pos = lo
            while pos < hi:
                if cur is None or pos >= cur_hi:
                    k = next(order)
                    cur, cur_lo = self._stage_flat(k), self.stage_lo[k]
                    cur_hi = cur_lo + self.stage_numel[k]
                n = min(hi, cur_hi) - pos
                out[pos - lo : pos - lo + n].copy_(cur[pos - cur_lo : pos - cur_lo + n])
                pos += n
            yield out

    def _stage_feeder(self) -> Callable[[int, torch.Tensor], None]:
        """feed(lo, values): flat elements [lo, lo + len) in order from 0 into arena 1,
        each stage written back (in its own order) as soon as its range is complete."""
        order = iter(self.flat_stages)
        at = {"k": -1, "lo": 0, "hi": 0}

        def feed(lo: int, values: torch.Tensor) -> None:
            pos, end = lo, lo + values.numel()
            while pos < end:
                if pos >= at["hi"]:
                    k = next(order)
                    at.update(k=k, lo=self.stage_lo[k], hi=self.stage_lo[k] + self.stage_numel[k])
                n = min(end, at["hi"]) - pos
                dst = self.arenas[1]["w"][pos - at["lo"] : pos - at["lo"] + n]
                dst.copy_(values[pos - lo : pos - lo + n])
                pos += n
                if pos == at["hi"]:
                    self._write_stage_flat(at["k"])

        return feed

    def _round_pass(self) -> _Held:
        return _Held(self, ROUND_CHUNK_BUFFERS * self.chunk_elems * FLOAT_BYTES)

    def begin_round(self) -> None:
        """Make start.i hold the weights this round starts from (after a load, a resync or
        the first round; the streamed outer step leaves them there otherwise)."""
        if self.start_valid:
            return
        with self._round_pass():
            for i, local in enumerate(self._local_chunks()):
                self._write_region(f"start.{i}", local)
        self.start_valid = True

    def start_digest(self) -> int:
        """state_digest(state_vectors(), outer.t), read chunk by chunk from disk (once
        per generation: serving the state after a round computes the next round's)."""
        generation = self.generation
        if self._digest is not None and self._digest[0] == generation:
            return self._digest[1]
        h = hashlib.sha256(self.outer.t.to_bytes(8, "big"))
        with self._round_pass():
            for kind in ("start", *self.moments):
                for i, (lo, hi) in enumerate(self.spans):
                    h.update(self._read_region(f"{kind}.{i}", hi - lo).numpy().tobytes())
        digest = int.from_bytes(h.digest()[:8], "big") >> 1
        self._digest = (generation, digest)
        return digest

    def read_state(self, lo: int, hi: int) -> list[torch.Tensor]:
        """Elements [lo, hi) of the state on disk after a round (weights, then the outer
        moments): what a resyncing peer pulls (fflnode.exchange.DiskState), valid while
        `generation` does not change. Safe beside the round's own passes (BlockIO)."""
        out = []
        for kind in ("start", *self.moments):
            parts = []
            for i, (a, b) in enumerate(self.spans):
                if a < hi and lo < b:
                    chunk = self._read_region(f"{kind}.{i}", b - a)
                    parts.append(chunk[max(lo, a) - a : min(hi, b) - a])
            out.append(torch.cat(parts))
        return out

    def delta_chunks(self) -> Iterator[torch.Tensor]:
        """Delta = theta_start - theta_local, chunk by chunk (spans order)."""
        with self._round_pass():
            for i, local in enumerate(self._local_chunks()):
                start = self._read_region(f"start.{i}", local.numel())
                yield start - local

    def residual_store(self) -> _ResidualChunks:
        """The exchange's error-feedback residual, kept in the res.i regions."""
        return _ResidualChunks(self)

    def outer_step_chunks(self, g_of: Callable[[int], torch.Tensor]) -> None:
        """outer_step(theta_start, g) chunk by chunk, g_of(i) the pseudo-gradient's chunk i:
        the new weights go to start.i (the next round's start) and to the stages, the
        moments back to m.i, v.i; OuterOptimizer.apply, so the bits are outer_step's."""
        opt = self.outer
        self.generation += 1
        lr = opt.lr
        opt.t += 1
        moments: tuple[str, ...] = self.moments
        with self._round_pass():
            feed = self._stage_feeder()
            for i, (lo, hi) in enumerate(self.spans):
                g = g_of(i)
                start = self._read_region(f"start.{i}", hi - lo)
                m = self._read_region(f"m.{i}", hi - lo) if "m" in self.moments else None
                v = self._read_region(f"v.{i}", hi - lo) if "v" in self.moments else None
                theta, m, v = opt.apply(start, g, m, v, lr, opt.t)
                moments = tuple(n for n, t in (("m", m), ("v", v)) if t is not None)
                for name, t in (("m", m), ("v", v)):
                    if t is not None:
                        self._write_region(f"{name}.{i}", t)
                self._write_region(f"start.{i}", theta)
                feed(lo, theta)
        self.moments = moments
        self.start_valid = True

    def chunked_state(self) -> tuple[list[Chunked], Chunked | None]:
        """The state for a checkpoint, chunk by chunk from disk: [weights, *moments] and
        the error-feedback residual (None before the first). Read at once by the
        checkpoint writer: the next outer step rewrites these regions."""

        def region(kind: str) -> Chunked:
            def chunks() -> Iterator[tuple[int, torch.Tensor]]:
                with self._round_pass():
                    for i, (lo, hi) in enumerate(self.spans):
                        yield lo, self._read_region(f"{kind}.{i}", hi - lo)

            return Chunked(self.numel, chunks)

        def weights() -> Iterator[tuple[int, torch.Tensor]]:
            with self._round_pass():
                yield from zip((lo for lo, _ in self.spans), self._local_chunks(), strict=True)

        first = region("start") if self.start_valid else Chunked(self.numel, weights)
        residual = region("res") if self.has_residual else None
        return [first, *(region(kind) for kind in self.moments)], residual

    def load_residual(self, read: Callable[[int, int], torch.Tensor]) -> None:
        """A checkpoint's error-feedback residual (read(lo, hi): its elements), back to
        the res.i regions."""
        for i, (lo, hi) in enumerate(self.spans):
            self._write_region(f"res.{i}", read(lo, hi))
        self.has_residual = True

    def state_vectors(self) -> list[torch.Tensor]:
        """The whole state as flat vectors (|θ| each: checkpoints and resyncs only)."""
        if self.outer.m is not None or not self.moments:  # the in-memory outer step's
            return super().state_vectors()
        return [self.flat(), *(self._read_vector(kind) for kind in self.moments)]

    def _read_vector(self, kind: str) -> torch.Tensor:
        out = torch.empty(self.numel)
        for i, (lo, hi) in enumerate(self.spans):
            self._blockio.run(self._file.read_into, f"{kind}.{i}", out[lo:hi])
        return out

    def load_state_vectors(self, vectors: list[torch.Tensor], outer_step: int) -> None:
        """Load a whole state (a checkpoint, a resync): weights to the stages, the outer
        moments to m.i, v.i when the rounds stream (else in memory, as LocalTrainer)."""
        if not self.streams_rounds:
            super().load_state_vectors(vectors, outer_step)
            return
        self.load_state_ranges([lambda lo, hi, v=v: v[lo:hi] for v in vectors], outer_step)

    def load_state_ranges(
        self, parts: list[Callable[[int, int], torch.Tensor]], outer_step: int
    ) -> None:
        """load_state_vectors from readers, parts[j](lo, hi) the elements [lo, hi) of the
        weights, then the moments: chunk by chunk (a resume from a lazily loaded
        checkpoint holds no |θ|-sized vector). The weights go to the stages and start.i."""
        self.moments = ("m", "v")[: len(parts) - 1]
        self.generation += 1
        with self._round_pass():
            feed = self._stage_feeder()
            for i, (lo, hi) in enumerate(self.spans):
                w = parts[0](lo, hi)
                self._write_region(f"start.{i}", w)
                feed(lo, w)
                for kind, read in zip(self.moments, parts[1:], strict=False):
                    self._write_region(f"{kind}.{i}", read(lo, hi))
        self.outer.m = self.outer.v = None
        self.outer.t = outer_step
        self.start_valid = True

    def evaluate(self) -> dict[str, float]:
        """The task's evaluation on a stand-in model that streams the stages."""
        streamed = _StreamedModel(self)
        with torch.no_grad():
            metrics = self.task.evaluate(streamed)  # type: ignore[union-attr]
        self.model.train()
        return as_metrics(metrics, f"task {self.loaded.spec!r}")

    def forward_streamed(self, x: Any) -> Any:
        """model(x), one stage's weights at a time (no prefetch: evaluation is rare)."""
        h = x
        for k, stage in enumerate(self.chain.stages):
            self._blockio.run(self._read_stage, k, 0, ("w",))
            self._bind(k, 0)
            try:
                h = stage(h)
            finally:
                self._unbind(k)
        return h

    def close(self) -> None:
        """Close the block files and the I/O thread (the files stay, as scratch)."""
        try:
            for f in (self._file, self._spill):
                if f is not None:
                    self._blockio.run(f.aclose)
        finally:
            self._blockio.close()


class _Held:
    """Counts a round pass's chunk buffers in the trainer's held bytes while it runs."""

    def __init__(self, trainer: OutOfCoreTrainer, nbytes: int) -> None:
        self.trainer, self.nbytes = trainer, nbytes

    def __enter__(self) -> None:
        self.trainer._hold(self.nbytes)

    def __exit__(self, *exc: object) -> None:
        self.trainer._release(self.nbytes)


class _ResidualChunks:
    """fflnode.exchange.ResidualStore on the trainer's res.i regions."""

    def __init__(self, trainer: OutOfCoreTrainer) -> None:
        self.trainer = trainer

    def get(self, i: int) -> torch.Tensor | None:
        t = self.trainer
        if not t.has_residual:
            return None
        lo, hi = t.spans[i]
        return t._read_region(f"res.{i}", hi - lo)

    def put(self, i: int, residual: torch.Tensor) -> None:
        t = self.trainer
        t._write_region(f"res.{i}", residual)
        if i == len(t.spans) - 1:  # every chunk written: the next round adds them
            t.has_residual = True


class _StreamedModel(nn.Module):
    """What a task's evaluate() sees: model(x) computed stage by stage from the file."""

    def __init__(self, trainer: OutOfCoreTrainer) -> None:
        super().__init__()
        object.__setattr__(self, "_trainer", trainer)  # not a submodule

    def forward(self, x: Any) -> Any:
        return self._trainer.forward_streamed(x)

    def train(self, mode: bool = True) -> _StreamedModel:
        self._trainer.model.train(mode)
        return super().train(mode)


def pin_allocator() -> None:
    """Keep RSS honest under glibc: pin the mmap threshold, then hand free heap pages
    back to the OS (malloc_trim). Call it before the model is built (compose does).
    glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed,
    after which stage-sized temporaries come from the heap and its free pages stay
    resident. Measured, RSS over the baseline after a step: 48M-parameter SSD LM under
    96 MiB, 220 MB dynamic, 72 MB pinned; 100M parameters, 288 MB pinned only after
    the model was built, 87 MB pinned before. A no-op on another C library."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())
