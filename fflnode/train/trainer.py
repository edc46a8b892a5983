"""The local trainer: a task's model, inner steps on local data, the outer step on the flat vector.

One round: remember theta_start, take H inner optimizer steps on local batches; the node
mixes with its neighbours (fflnode.exchange) and hands back theta_mix; `outer_step`
applies the outer optimizer to the pseudo-gradient g = theta_start - theta_mix:
* "sgd" (DiLoCo): v <- mu v + g; theta <- theta_start - lr (g + mu v) (Nesterov);
  lr = 1, mu = 0 is plain gossip averaging.
* "adam" (FedOpt, Reddi et al. 2021): theta <- theta_start - lr Adam(g).
Inner optimizers: "sgd" (plain) or "adam" (its moments persist across rounds).

Why the default is inner SGD + outer Adam: per-node Adam under non-IID data drifts each
node towards its own labels between mixes, and averaging per-node Adam steps is not
Adam on the average. Measured on sequential digits with the SSD model, 4 nodes,
Dirichlet 0.5, 400 local steps each: inner Adam + plain averaging reached 30 % merged
at H = 10 and 82 % even when mixing after every step, while Adam on 4x larger batches
(what averaging is meant to emulate) reached 91 %. With inner SGD and outer Adam,
mixing after every step on a complete graph IS data-parallel Adam (Adam ignores the
pseudo-gradient's scale), and larger H degrades gracefully. See docs/benchmarks.md.
Everything here is synchronous torch: the node runs it in a worker thread.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fflnode.errors import ConfigError
from fflnode.prism.reader import SafetensorsFile
from fflnode.prism.writer import save_tensors
from fflnode.train.task import (
    LoadedTask,
    as_metrics,
    build_model,
    federated_buffers,
    federated_parameters,
)

# The centralized baseline's Adam learning rate: the best of 1e-3..2e-2 for both models
# (the SSD diverges from 1e-2; tools/bench_ssd_digits.py uses it too).
CENTRAL_LR = 3e-3


@dataclass(frozen=True)
class TrainSettings:
    seed: int
    local_steps: int
    inner_lr: float
    outer_lr: float
    outer_momentum: float
    inner_optimizer: str = "sgd"
    outer_optimizer: str = "adam"
    # The outer (and the baseline's) learning-rate schedule; see scheduled_lr.
    lr_schedule: str = "wsd"
    total_rounds: int = 0  # rounds of the run, for the schedule (0: constant)


# Outer Adam's moment decays and epsilon: PyTorch's defaults, which the centralized
# baseline's Adam uses too (so H = 1 on a complete graph reproduces it).
OUTER_BETAS = (0.9, 0.999)
OUTER_EPS = 1e-8


# Warmup-stable-decay: constant, then linear decay to 0 over the last quarter. Measured on
# sequential digits (SSD): the end-of-run accuracy swings by +-4 points from one
# evaluation to the next at a constant rate; WSD settles it (batch 32 x 2400 steps:
# 85.6 -> 90.8 %; batch 128 x 600: 85.8 -> 89.4 %), where a cosine over the whole run
# decays too early in a run this short (1600 steps: 91.1 -> 90.0 %; 4 nodes: 89.2 -> 82.5).
WSD_DECAY_FRACTION = 0.25


def scheduled_lr(base: float, schedule: str, t: int, total: int) -> float:
    """Learning rate at step t (0-based) of `total`: constant, wsd or cosine."""
    if schedule == "constant" or total <= 0:
        return base
    if schedule == "wsd":
        return base * min(1.0, max(0.0, total - t) / (WSD_DECAY_FRACTION * total))
    return 0.5 * base * (1 + math.cos(math.pi * min(t, total) / total))


class OuterOptimizer:
    """The outer step on the flat vector; its state is checkpointed with the node's."""

    def __init__(
        self, kind: str, lr: float, momentum: float, schedule: str = "constant", total: int = 0
    ) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(f"unknown outer optimizer {kind!r}")
        self.kind, self.base_lr, self.mu = kind, lr, momentum
        self.schedule, self.total = schedule, total
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.t = 0

    @property
    def lr(self) -> float:
        """This step's learning rate (the step counter is t, 0-based here)."""
        return scheduled_lr(self.base_lr, self.schedule, self.t, self.total)

    def step(self, theta_start: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The new weights from theta_start and the pseudo-gradient g."""
        lr = self.lr
        self.t += 1
        theta, self.m, self.v = self.apply(theta_start, g, self.m, self.v, lr, self.t)
        return theta

    def apply(
        self,
        theta_start: torch.Tensor,
        g: torch.Tensor,
        m: torch.Tensor | None,
        v: torch.Tensor | None,
        lr: float,
        t: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One outer step on any slice of the flat vector: (theta, m, v) from theta_start,
        g and the moments (None before the first step; updated in place otherwise), at
        learning rate lr, t the step count after this step. Elementwise only, so a
        chunk-by-chunk pass (the out-of-core trainer's) gives the whole vector's bits."""
        if self.kind == "sgd":
            if self.mu == 0:
                return theta_start - lr * g, m, v
            m = g.clone() if m is None else m.mul_(self.mu).add_(g)
            return theta_start - lr * (g + self.mu * m), m, v
        b1, b2 = OUTER_BETAS
        m = (1 - b1) * g if m is None else m.mul_(b1).add_(g, alpha=1 - b1)
        v = (1 - b2) * g * g if v is None else v.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        return theta_start - lr * m_hat / (v_hat.sqrt() + OUTER_EPS), m, v

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"outer.t": torch.tensor(self.t)}
        if self.m is not None:
            out["outer.m"] = self.m
        if self.v is not None:
            out["outer.v"] = self.v
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.t = int(state.get("outer.t", torch.tensor(0)))
        self.m = state.get("outer.m")
        self.v = state.get("outer.v")


class BatchStream:
    """A task's training batches, endless: when an epoch ends the task is asked again.

    `position` counts batches taken; a restarted node resumes by replaying to it (the
    task's data is deterministic in its arguments, fflnode.train.task)."""

    def __init__(self, make: Callable[[], Iterable[Any]]) -> None:
        self.make = make
        self.position = 0
        self._it: Iterator[Any] = iter(make())
        self._fresh = True  # the current epoch has given nothing yet

    def __next__(self) -> Any:
        for _ in range(2):  # an epoch that ends, then a fresh one; two empty ones: no data
            try:
                batch = next(self._it)
            except StopIteration:
                if self._fresh:
                    break
                self._it, self._fresh = iter(self.make()), True
                continue
            self._fresh = False
            self.position += 1
            return batch
        raise ConfigError("the task's train_data gave no batch at all")

    def skip_to(self, position: int) -> None:
        """Replay from the start to `position` batches taken."""
        self._it, self._fresh, self.position = iter(self.make()), True, 0
        while self.position < position:
            next(self)


class RoundState:
    """What a resync and a checkpoint read of any trainer, from its `flat`/`load_flat`,
    outer optimizer and batch stream (LocalTrainer, and the out-of-core trainer)."""

    outer: OuterOptimizer
    batches: BatchStream
    # Whether the round loop streams this trainer's round chunk by chunk (begin_round,
    # start_digest, delta_chunks, outer_step_chunks: the out-of-core trainer).
    streams_rounds: bool = False

    def flat(self) -> torch.Tensor:
        raise NotImplementedError

    def load_flat(self, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def state_vectors(self) -> list[torch.Tensor]:
        """The whole training state as flat vectors: weights, then the outer optimizer's
        moments that exist (what a resyncing node adopts, fflnode.exchange)."""
        return [self.flat(), *(t for t in (self.outer.m, self.outer.v) if t is not None)]

    def load_state_vectors(self, vectors: list[torch.Tensor], outer_step: int) -> None:
        self.load_flat(vectors[0])
        moments = list(vectors[1:]) + [None, None]
        self.outer.m, self.outer.v = (None if t is None else t.clone() for t in moments[:2])
        self.outer.t = outer_step

    def sampler_state(self) -> torch.Tensor:
        return torch.tensor([self.batches.position], dtype=torch.int64)

    def load_sampler_state(self, state: torch.Tensor) -> None:
        self.batches.skip_to(int(state.reshape(-1)[0]))


class LocalTrainer(RoundState):
    """A task's model trained locally, with the run's inner and outer optimizers.

    The federated state is the task's trainable float32 parameters as one flat vector in
    canonical order (fflnode.train.task.federated_parameters), plus float persistent
    buffers, which the final merge averages but rounds do not exchange."""

    def __init__(
        self,
        loaded: LoadedTask,
        model: nn.Module,
        settings: TrainSettings,
        batches: BatchStream,
    ) -> None:
        self.loaded = loaded
        self.task = loaded.task
        self.s = settings
        self.model = model
        named = federated_parameters(model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.buffers = federated_buffers(model)
        if settings.inner_optimizer == "adam":
            self.inner: torch.optim.Optimizer = torch.optim.Adam(self.params, lr=settings.inner_lr)
        else:
            self.inner = torch.optim.SGD(self.params, lr=settings.inner_lr)
        self.outer = OuterOptimizer(
            settings.outer_optimizer,
            settings.outer_lr,
            settings.outer_momentum,
            settings.lr_schedule,
            settings.total_rounds,
        )
        self.batches = batches
        self.steps_taken = 0

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    # -- flat vector (canonical order: federated parameters sorted by name) --
    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    def load_flat(self, flat: torch.Tensor) -> None:
        pos = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(flat[pos : pos + p.numel()].view_as(p))
                pos += p.numel()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What the final merge averages: the federated parameters and float buffers."""
        out = {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}
        out.update({n: b.detach().clone() for n, b in self.buffers})
        return out

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of what state_tensors() returns (the merge's layout)."""
        named = [*zip(self.names, self.params, strict=True), *self.buffers]
        return {n: tuple(t.shape) for n, t in named}

    def write_state_file(self, path: Path, metadata: dict[str, str]) -> None:
        """state_tensors() as one safetensors file, atomically (the premerge file)."""
        save_tensors(path, self.state_tensors(), metadata)

    def load_state_file(self, path: Path) -> None:
        """load_state_tensors() from a safetensors file (the merged model)."""
        with SafetensorsFile(path) as f:
            self.load_state_tensors(f.tensors())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load merged tensors (by name) into the model."""
        with torch.no_grad():
            for n, p in zip(self.names, self.params, strict=True):
                p.copy_(tensors[n].view_as(p))
            for n, b in self.buffers:
                b.copy_(tensors[n].view_as(b))

    # -- one round --
    def inner_steps(self, steps: int | None = None) -> float:
        """H local steps; returns the mean training loss."""
        self.model.train()
        total = 0.0
        n = steps if steps is not None else self.s.local_steps
        for _ in range(n):
            loss = self.task.loss(self.model, next(self.batches))  # type: ignore[union-attr]
            self.inner.zero_grad(set_to_none=True)
            loss.backward()
            self.inner.step()
            total += float(loss.detach())
            self.steps_taken += 1
        return total / max(n, 1)

    def outer_step(self, theta_start: torch.Tensor, g: torch.Tensor) -> None:
        """Apply the outer optimizer to the pseudo-gradient g = theta_start - theta_mix."""
        self.load_flat(self.outer.step(theta_start, g))

    def close(self) -> None:
        """Nothing to release (OutOfCoreTrainer closes its block files here)."""

    def evaluate(self) -> dict[str, float]:
        with torch.no_grad():
            metrics = self.task.evaluate(self.model)  # type: ignore[union-attr]
        self.model.train()
        return as_metrics(metrics, f"task {self.loaded.spec!r}")


def settings_from(cfg_train: object, seed: int, rounds: int = 0) -> TrainSettings:
    c = cfg_train
    return TrainSettings(
        seed=seed,
        local_steps=c.local_steps,
        inner_lr=c.inner_lr,
        outer_lr=c.outer_lr,
        outer_momentum=c.outer_momentum,
        inner_optimizer=c.inner_optimizer,
        outer_optimizer=c.outer_optimizer,
        lr_schedule=c.lr_schedule,
        total_rounds=rounds,
    )


def node_trainer(
    loaded: LoadedTask, settings: TrainSettings, partition: int, nodes: int
) -> LocalTrainer:
    """The trainer of partition `partition` of `nodes`: the model from the run seed and
    this node's share of the task's data."""
    model = build_model(loaded, settings.seed)
    task = loaded.task
    batches = BatchStream(lambda: task.train_data(partition, nodes, settings.seed))  # type: ignore[union-attr]
    return LocalTrainer(loaded, model, settings, batches)


def centralized_trainer(loaded: LoadedTask, settings: TrainSettings) -> LocalTrainer:
    """A baseline's trainer: the same model on the union of all node data (partition 0
    of 1), with the Adam a centralized trainer would use. Building it draws from torch's
    global generator (build_model), so build baselines one at a time: train them in
    threads only once built."""
    lr = float(getattr(loaded.task, "baseline_lr", CENTRAL_LR))  # a task may tune its own
    settings = dataclasses.replace(settings, inner_optimizer="adam", inner_lr=lr)
    return node_trainer(loaded, settings, 0, 1)


def run_centralized(
    trainer: LocalTrainer, steps: int, batches_per_step: int = 1
) -> tuple[dict[str, float], nn.Module]:
    """Train a centralized_trainer for `steps` Adam steps on the same schedule as the
    federated outer optimizer; returns (metrics, model).

    Each step takes the mean gradient of `batches_per_step` consecutive batches (the mean
    of their losses, backpropagated one batch at a time): with N batches it is
    synchronous data-parallel training on N workers, the step count and samples of an
    N-node run; with 1 it is a single worker taking every step in sequence."""
    if steps < 0 or batches_per_step < 1:
        raise ValueError(f"baseline of {steps} steps x {batches_per_step} batches")
    lr, schedule, task = trainer.s.inner_lr, trainer.s.lr_schedule, trainer.task
    trainer.model.train()
    for t in range(steps):
        for group in trainer.inner.param_groups:
            group["lr"] = scheduled_lr(lr, schedule, t, steps)
        trainer.inner.zero_grad(set_to_none=True)
        for _ in range(batches_per_step):
            loss = task.loss(trainer.model, next(trainer.batches))  # type: ignore[union-attr]
            (loss / batches_per_step if batches_per_step > 1 else loss).backward()
        trainer.inner.step()
    return trainer.evaluate(), trainer.model


def train_centralized(
    loaded: LoadedTask, settings: TrainSettings, steps: int, batches_per_step: int = 1
) -> tuple[dict[str, float], nn.Module]:
    """A centralized baseline built and trained (see run_centralized)."""
    return run_centralized(centralized_trainer(loaded, settings), steps, batches_per_step)
