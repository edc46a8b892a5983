"""The Task API: what a user brings to a run, and how fflnode loads it.

A task is ordinary Python code, loaded by reference from `[train] task`:
* "package.module:attr" (importable), or "path/to/file.py:attr" (relative to the
  config file's directory), where `attr` is a Task object or a callable (a class or a
  factory function) that returns one; the `[task]` table of the config is passed to it
  as keyword arguments.
* a name without a colon: a built-in task (BUILTIN_TASKS: digits, synthetic, text).

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

A merge-only task (the built-in `synthetic`, for merge benchmarks) implements
MergeOnlyTask instead: no training, it writes its premerge weights piece by piece.

Loading errors are ConfigError (exit 2) with one line naming the spec and the file:
import failure, missing attribute, bad options, a model that is not float32.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fflnode.errors import ConfigError

# Built-in tasks by name: module and attribute, imported only when chosen.
BUILTIN_TASKS = {
    "digits": ("fflnode.train.tasks.digits", "DigitsTask"),
    "synthetic": ("fflnode.train.tasks.synthetic", "SyntheticTask"),
    "text": ("fflnode.train.tasks.text", "TextTask"),
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
    CPU and GPU nodes start from the same bits), checked to be federatable."""
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
    check_federatable(model, f"task {loaded.spec!r} ({loaded.source})")
    return model


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
    "LoadedTask",
    "MergeOnlyTask",
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
