"""The Task API: what a user brings to a run, and how fflnode loads it.

A task is ordinary Python code, loaded by reference from `[train] task`:
* "package.module:attr" (importable), or "path/to/file.py:attr" (relative to the
  config file's directory), where `attr` is a Task object or a callable (a class or a
  factory function) that returns one; the `[task]` table of the config is passed to it
  as keyword arguments.
* a name without a colon: a built-in task (BUILTIN_TASKS: digits, mqar, synthetic, text).

A Task (the protocol below; docs/tasks.md has a complete example) supplies:
* `build_model(seed)`: an ordinary torch.nn.Module, built identically on every node from
  the run seed (fflnode also seeds torch's generator with it, CPU-side, before calling).
* `train_data(partition, nodes, seed)`: this node's training batches, any iterable. It
  is iterated round after round; when it ends it is called again (a new epoch). It
  must be deterministic in its arguments, so a restarted node replays its position.
  `partition` 0 of `nodes` 1 is the whole data set (the centralized baseline's).
* `loss(model, batch)`: a scalar tensor to minimise.
* `evaluate(model)`: named metrics, e.g. {"loss": 2.1, "perplexity": 8.2}. The first is
  the headline unless the task sets `primary_metric`.

What is federated: every floating-point parameter that requires a gradient, each once
(tied weights are one parameter), plus floating-point persistent buffers (averaged by the
final merge). All must be float32: the exact merge and the wire format assume it. Other
parameters and buffers are left as the seed built them, identical on every node.

Optionally, a task declares its model as a chain of blocks, for out-of-core training
(fflnode.train.outofcore): `blocks(model)` returns a BlockChain: stages in order (the
input stem, the blocks, the head), each a module whose parameters are a disjoint share
of the federated ones, `model_input(batch)` (the first stage's input) and
`loss(output, batch)` (the last stage's output to the task's loss). Its contract:
* running the stages in order on model_input(batch) and applying `loss` gives exactly
  task.loss(model, batch) (the same operations, so the same bits);
* a stage's input and output are tensors with the batch's rows along dimension 0, and
  rows do not interact (row i of a stage's output depends only on row i of its input);
* `loss` is a mean over the batch's rows, so a micro-batch of m of N rows contributes
  loss(micro-batch) x m / N; the batch (a tensor, or a tuple of tensors) is sliced by
  rows along dimension 0;
* every federated parameter belongs to exactly one stage (check_chain verifies it).

A task with blocks may also initialise them one at a time, so that a model bigger than
the node's memory is never built whole: `init_stage(module, name, seed)` fills, in place,
every parameter and buffer of stage `name` (allocated, contents undefined). fflnode then
builds the model on torch's meta device (no storage), and each stage is allocated and
initialised on its own, under torch's generator seeded from (run seed, stage name)
(`stage_seed`): the same bits whether the model is built whole in memory or stage by
stage into an out-of-core trainer's block file. Every parameter and buffer must then be
in a stage, and `build_model` must not read tensor values (they are meta).

A merge-only task (the built-in `synthetic`, for merge benchmarks) implements
MergeOnlyTask instead: no training, it writes its premerge weights piece by piece.

Optional, the state capability (StateTask, docs/tasks.md "Federated memory"): a task
whose model has SSM layers with composable states (fflnode.ssm.states) says which
contexts this node reads (`local_contexts`: context id -> this node's segment, a tensor
whose first dimension is time), how the model folds segments into per-layer states
(`fold`), their shapes (`state_spec`), and how the model does when conditioned on states
(`evaluate_states`); `respond` (optional) answers a prompt from one context's state, for
`fflnode query`. After the weight merge the node federates those states (fflnode.
states_phase): the same segments of one context read by several nodes compose, in
ascending peer-ID order, into the state of their concatenation.

Loading errors are ConfigError (exit 2) with one line naming the spec and the file:
import failure, missing attribute, bad options, a model that is not float32.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fflnode.errors import ConfigError
from fflnode.ssm.states import LayerState, StateShape

# Built-in tasks by name: module and attribute, imported only when chosen.
BUILTIN_TASKS = {
    "digits": ("fflnode.train.tasks.digits", "DigitsTask"),
    "synthetic": ("fflnode.train.tasks.synthetic", "SyntheticTask"),
    "text": ("fflnode.train.tasks.text", "TextTask"),
    "mqar": ("fflnode.train.tasks.mqar", "MqarTask"),
}
TASK_METHODS = ("build_model", "train_data", "loss", "evaluate")
# Metric names where lower is better, for a task that does not say.
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte", "nmse", "error")


@runtime_checkable
class Task(Protocol):
    def build_model(self, seed: int) -> nn.Module: ...

    def train_data(self, partition: int, nodes: int, seed: int) -> Iterable[Any]: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class Stage:
    """One stage of a BlockChain: `name` is the prefix of its parameters in the model
    ("blocks.0"); `forward(module, x)` maps the previous stage's output to this one's
    (None: `module(x)`)."""

    name: str
    module: nn.Module
    forward: Callable[[nn.Module, Any], Any] | None = None

    def __call__(self, x: Any) -> Any:
        return self.module(x) if self.forward is None else self.forward(self.module, x)


@dataclass(frozen=True)
class BlockChain:
    """A model as a chain of stages (see the module docstring for the contract)."""

    stages: tuple[Stage, ...]
    model_input: Callable[[Any], Any]  # batch -> the first stage's input
    loss: Callable[[torch.Tensor, Any], torch.Tensor]  # last output, batch -> mean loss

    def run_loss(self, batch: Any) -> torch.Tensor:
        """The task's loss computed stage by stage (what the contract equates to loss)."""
        h = self.model_input(batch)
        for stage in self.stages:
            h = stage(h)
        return self.loss(h, batch)


def task_chain(loaded: LoadedTask, model: nn.Module) -> BlockChain | None:
    """The task's BlockChain for `model`, checked; None when the task declares none."""
    make = getattr(loaded.task, "blocks", None)
    if make is None:
        return None
    where = f"task {loaded.spec!r} ({loaded.source})"
    try:
        chain = make(model)
    except Exception as e:  # user code
        raise ConfigError(f"{where}: blocks() raised {type(e).__name__}: {e}") from None
    if not isinstance(chain, BlockChain):
        raise ConfigError(f"{where}: blocks() returned {type(chain).__name__}, not a BlockChain")
    check_chain(chain, model, where)
    return chain


def check_chain(chain: BlockChain, model: nn.Module, where: str) -> None:
    """Every federated parameter in exactly one stage, and nothing else trainable there."""
    if not chain.stages:
        raise ConfigError(f"{where}: blocks() declared no stage")
    names = [stage.name for stage in chain.stages]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"{where}: blocks() names two stages {twice!r}; names must differ")
    owner: dict[int, str] = {}
    for stage in chain.stages:
        for p in stage.module.parameters():
            if id(p) in owner and owner[id(p)] != stage.name:
                raise ConfigError(
                    f"{where}: a parameter is shared by stages {owner[id(p)]!r} and "
                    f"{stage.name!r}; out-of-core training needs each in one stage"
                )
            owner[id(p)] = stage.name
    for name, p in federated_parameters(model):
        if id(p) not in owner:
            raise ConfigError(f"{where}: parameter {name} belongs to no stage of blocks()")
    federated = {id(p) for _, p in federated_parameters(model)}
    for stage in chain.stages:
        for n, p in stage.module.named_parameters():
            if id(p) not in federated and p.requires_grad:
                raise ConfigError(f"{where}: stage {stage.name!r} parameter {n} is not federated")


def slice_rows(batch: Any, lo: int, hi: int) -> Any:
    """Rows [lo, hi) of a batch: a tensor, or a tuple/list of tensors, along dimension 0."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    if isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        return type(batch)(slice_rows(b, lo, hi) for b in batch)
    raise ConfigError(
        f"out-of-core training slices batches by rows: a {type(batch).__name__} is neither "
        "a tensor nor a tuple of tensors"
    )


def batch_rows(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return batch_rows(batch[0])


@runtime_checkable
class StateTask(Protocol):
    """The state capability: methods a Task may add so its SSM states are federated.

    Segments are tensors whose first dimension is time: the segments of one context held
    by several nodes, concatenated along it in ascending peer-ID order, are the
    "centralized" reading that the composed state equals (exactly for one layer)."""

    def state_spec(self, model: nn.Module) -> Sequence[StateShape]: ...

    def local_contexts(
        self, partition: int, nodes: int, seed: int, epoch: int
    ) -> Mapping[int, torch.Tensor]: ...

    def fold(self, model: nn.Module, segments: Sequence[torch.Tensor]) -> Sequence[LayerState]: ...

    def evaluate_states(
        self,
        model: nn.Module,
        states: Mapping[int, Sequence[LayerState]],
        partition: int,
        nodes: int,
        seed: int,
        epoch: int,
    ) -> Mapping[str, float]: ...


@runtime_checkable
class Responder(Protocol):
    """Optional beside StateTask: answer a prompt from one context's state (fflnode query)."""

    def respond(
        self,
        model: nn.Module,
        states: Sequence[LayerState] | None,
        prompt: str,
        context: int,
        seed: int,
        epoch: int,
    ) -> str: ...


@runtime_checkable
class MergeOnlyTask(Protocol):
    def layout(self, seed: int) -> dict[str, tuple[int, ...]]: ...

    def write_premerge(self, path: Path, seed: int, partition: int) -> None: ...


@dataclass(frozen=True)
class LoadedTask:
    """A task as the node uses it: the object, where it came from, its options."""

    spec: str
    task: Task | MergeOnlyTask
    options: dict[str, Any]
    source: str  # the file it was loaded from ("<built-in>" for built-ins)

    @property
    def trains(self) -> bool:
        return isinstance(self.task, Task)

    @property
    def primary_metric(self) -> str | None:
        return getattr(self.task, "primary_metric", None)

    @property
    def federates_states(self) -> bool:
        """The task has the state capability (StateTask) as well as training."""
        return self.trains and isinstance(self.task, StateTask)


def load_task(spec: str, options: Mapping[str, Any], base_dir: Path) -> LoadedTask:
    """Import and build the task `spec` names, with `options`; ConfigError otherwise."""
    target, source = _resolve(spec, base_dir)
    try:
        task = target(**options) if callable(target) and not _is_task(target) else target
    except TypeError as e:
        raise ConfigError(
            f"task {spec!r} ({source}): bad [task] options {sorted(options)}: {e}"
            + _signature_hint(target)
        ) from None
    except ConfigError as e:
        raise ConfigError(f"task {spec!r} ({source}): {e}") from None
    except Exception as e:  # user code: report it as one line, not a traceback
        raise ConfigError(
            f"task {spec!r} ({source}): building it raised {type(e).__name__}: {e}"
        ) from None
    if not _is_task(task):
        missing = [m for m in TASK_METHODS if not hasattr(task, m)]
        raise ConfigError(
            f"task {spec!r} ({source}): {type(task).__name__} is not a Task: it lacks "
            f"{', '.join(missing)} (see docs/tasks.md)"
        )
    if options and not callable(target):
        raise ConfigError(f"task {spec!r} ({source}): [task] options given to an object")
    return LoadedTask(spec, task, dict(options), source)


def _is_task(obj: object) -> bool:
    return not isinstance(obj, type) and isinstance(obj, Task | MergeOnlyTask)


def _signature_hint(target: object) -> str:
    try:
        params = inspect.signature(target).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    return f" (it takes: {', '.join(params) or 'no options'})"


def _resolve(spec: str, base_dir: Path) -> tuple[Any, str]:
    if ":" not in spec:
        if spec not in BUILTIN_TASKS:
            raise ConfigError(
                f"task {spec!r}: no built-in task of that name (built-ins: "
                f"{', '.join(sorted(BUILTIN_TASKS))}); a task of your own is "
                "'package.module:attr' or 'path/to/file.py:attr'"
            )
        module, attr = BUILTIN_TASKS[spec]
        return getattr(importlib.import_module(module), attr), "<built-in>"
    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise ConfigError(f"task {spec!r}: expected 'module:attr' or 'file.py:attr'")
    if where.endswith(".py"):
        path = Path(where)
        path = path if path.is_absolute() else (base_dir / path)
        module = _import_file(spec, path.resolve())
        source = str(path.resolve())
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:  # ImportError, or whatever the module raises at import
            raise ConfigError(
                f"task {spec!r}: cannot import module {where!r}: {type(e).__name__}: {e}"
            ) from None
        source = getattr(module, "__file__", None) or where
    try:
        return getattr(module, attr), source
    except AttributeError:
        raise ConfigError(f"task {spec!r} ({source}): no attribute {attr!r}") from None


def _import_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"task {spec!r}: no such file {path}")
    name = f"fflnode_task_{abs(hash(str(path)))}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"task {spec!r}: {path} is not an importable Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(
            f"task {spec!r}: importing {path} raised {type(e).__name__}: {e}"
        ) from None
    return module


# ----------------------------------------------------------------------------- models
def build_model(loaded: LoadedTask, seed: int) -> nn.Module:
    """The task's model from `seed`, built on the CPU under torch's seeded generator (so
    CPU and GPU nodes start from the same bits), checked to be federatable. A task that
    initialises stage by stage (`init_stage`) is built from its skeleton, one stage at a
    time, with the bits an out-of-core trainer gives the same stages."""
    staged = build_skeleton(loaded, seed)
    if staged is not None:
        return materialize_model(loaded, *staged, seed)
    model = _built(loaded, seed)
    check_federatable(model, f"task {loaded.spec!r} ({loaded.source})")
    return model


def _built(loaded: LoadedTask, seed: int) -> nn.Module:
    """task.build_model(seed) under torch's generator seeded with `seed`."""
    task = loaded.task
    assert isinstance(task, Task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = task.build_model(seed)
        except Exception as e:  # user code
            raise ConfigError(
                f"task {loaded.spec!r} ({loaded.source}): build_model raised "
                f"{type(e).__name__}: {e}"
            ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"task {loaded.spec!r} ({loaded.source}): build_model returned "
            f"{type(model).__name__}, not a torch.nn.Module"
        )
    return model


def build_skeleton(loaded: LoadedTask, seed: int) -> tuple[nn.Module, BlockChain] | None:
    """The task's model on torch's meta device (shapes, no storage) and its chain, when
    the task declares blocks and `init_stage`; None otherwise. Stages become real one at
    a time through materialize_stage."""
    if getattr(loaded.task, "init_stage", None) is None:
        return None
    if getattr(loaded.task, "blocks", None) is None:
        raise ConfigError(
            f"task {loaded.spec!r} ({loaded.source}): init_stage() needs blocks() to say "
            "what a stage is"
        )
    with torch.device("meta"):
        model = _built(loaded, seed)
    check_federatable(model, f"task {loaded.spec!r} ({loaded.source})")
    chain = task_chain(loaded, model)
    assert chain is not None
    return model, chain


def stage_seed(seed: int, name: str) -> int:
    """Torch's generator seed for initialising stage `name`: from the run seed and the
    stage's name alone, so its bits do not depend on which stages were built before."""
    digest = hashlib.sha256(f"fflnode-stage/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def materialize_stage(
    loaded: LoadedTask, stage: Stage, seed: int, device: torch.device | str = "cpu"
) -> None:
    """Give every parameter and buffer of `stage` storage on `device` (the same tensor
    objects: torch.utils.swap_tensors keeps ties and references), then let the task's
    init_stage fill them under torch's generator seeded with stage_seed(seed, name)."""
    seen: set[int] = set()
    for t in [*stage.module.parameters(), *stage.module.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        fresh = torch.empty(t.shape, dtype=t.dtype, device=device)
        if fresh.is_floating_point():
            fresh.fill_(float("nan"))  # what init_stage leaves unset shows (checked below)
        if isinstance(t, nn.Parameter):
            fresh = nn.Parameter(fresh, requires_grad=t.requires_grad)
        torch.utils.swap_tensors(t, fresh)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(stage_seed(seed, stage.name))
        try:
            loaded.task.init_stage(stage.module, stage.name, seed)  # type: ignore[union-attr]
        except Exception as e:  # user code
            raise ConfigError(
                f"task {loaded.spec!r} ({loaded.source}): init_stage({stage.name!r}) raised "
                f"{type(e).__name__}: {e}"
            ) from None
    named = [*stage.module.named_parameters(), *stage.module.named_buffers()]
    for name, t in named:
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            raise ConfigError(
                f"task {loaded.spec!r} ({loaded.source}): init_stage({stage.name!r}) left "
                f"{stage.name}.{name} unset (NaN); it must fill every parameter and buffer"
            )


def materialize_model(
    loaded: LoadedTask, model: nn.Module, chain: BlockChain, seed: int
) -> nn.Module:
    """A skeleton (build_skeleton) made whole in memory, stage by stage: the in-memory
    build of a task with init_stage."""
    for stage in chain.stages:
        materialize_stage(loaded, stage, seed)
    check_materialized(loaded, model)
    return model


def check_materialized(loaded: LoadedTask, model: nn.Module) -> None:
    """After every stage was materialized: nothing left on the meta device."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ConfigError(
                f"task {loaded.spec!r} ({loaded.source}): {name} is in no stage of blocks(), "
                "so init_stage() never gave it values; with init_stage every parameter and "
                "buffer must be in a stage"
            )


def federated_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable floating-point parameters, each once (tied weights share one name: the
    first), in canonical order (ascending UTF-8 bytes of the name)."""
    named = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()
    ]
    return sorted(named, key=lambda item: item[0].encode("utf-8"))


def federated_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Floating-point persistent buffers (e.g. batch-norm statistics): merged, not trained."""
    persistent = set(model.state_dict(keep_vars=True))
    named = [
        (n, b)
        for n, b in model.named_buffers()
        if b is not None and b.is_floating_point() and n in persistent
    ]
    return sorted(named, key=lambda item: item[0].encode("utf-8"))


def check_federatable(model: nn.Module, where: str) -> None:
    params = federated_parameters(model)
    if not params:
        raise ConfigError(f"{where}: the model has no trainable floating-point parameters")
    for name, t in [*params, *federated_buffers(model)]:
        if t.dtype != torch.float32:
            raise ConfigError(
                f"{where}: {name} is {t.dtype}; fflnode federates float32 tensors (the exact "
                "merge and the wire format assume it): build the model in float32"
            )


def primary_metric(loaded: LoadedTask, metrics: Mapping[str, float]) -> str | None:
    """The metric the summary leads with: the task's choice, else the first."""
    return loaded.primary_metric or next(iter(metrics), None)


def higher_is_better(metric: str) -> bool:
    return not any(word in metric for word in LOWER_IS_BETTER)


def as_metrics(metrics: Mapping[str, float], where: str) -> dict[str, float]:
    """evaluate()'s result as a plain dict of floats (NaN allowed: a diverged run)."""
    out: dict[str, float] = {}
    for k, v in dict(metrics).items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: evaluate() returned {k!r} = {v!r}, not a number") from None
    return out


__all__ = [
    "BUILTIN_TASKS",
    "BlockChain",
    "Stage",
    "batch_rows",
    "check_chain",
    "slice_rows",
    "task_chain",
    "LoadedTask",
    "MergeOnlyTask",
    "Responder",
    "StateTask",
    "as_metrics",
    "Task",
    "build_model",
    "check_federatable",
    "federated_buffers",
    "federated_parameters",
    "higher_is_better",
    "load_task",
    "primary_metric",
]
