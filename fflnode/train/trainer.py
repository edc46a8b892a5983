"""The local trainer: inner steps on local data and the outer step on the flat vector.

One round (DiLoCo-style): remember theta_start, take H inner optimizer steps on local
batches, report the pseudo-gradient Delta = theta_start - theta_local; the node mixes
Deltas with its neighbours and hands the mix back to `outer_step`, which applies
    v <- mu * v + mixed;  theta <- theta_start - lr * (mixed + mu * v)   (Nesterov; mu=0:
plain averaging when lr = 1). Inner optimizer state (Adam moments) persists across
rounds. Everything here is synchronous torch: the node runs it in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fflnode.train.data import Split, digits_splits, node_train_split
from fflnode.train.model import build_model

EVAL_BATCH = 512  # test-set evaluation batch: the whole digits test split in one go


@dataclass(frozen=True)
class TrainSettings:
    model: str
    hidden: int
    seed: int
    local_steps: int
    batch_size: int
    inner_lr: float
    outer_lr: float
    outer_momentum: float


class LocalTrainer:
    def __init__(self, settings: TrainSettings, data: Split, sample_seed: int) -> None:
        self.s = settings
        self.data = data
        self.model: nn.Module = build_model(settings.model, settings.seed, hidden=settings.hidden)
        self.params = [p for _, p in sorted(self.model.named_parameters(), key=_name_key)]
        self.names = [n for n, _ in sorted(self.model.named_parameters(), key=_name_key)]
        self.inner = torch.optim.Adam(self.params, lr=settings.inner_lr)
        self.momentum: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(sample_seed)  # local batches only
        self.steps_taken = 0

    # -- flat vector (canonical order: parameters sorted by name) --
    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    def load_flat(self, flat: torch.Tensor) -> None:
        pos = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(flat[pos : pos + p.numel()].view_as(p))
                pos += p.numel()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}

    # -- one round --
    def inner_steps(self, steps: int | None = None) -> float:
        """H local steps; returns the mean training loss."""
        self.model.train()
        total = 0.0
        n = steps if steps is not None else self.s.local_steps
        for _ in range(n):
            idx = torch.randint(0, len(self.data), (self.s.batch_size,), generator=self.gen)
            loss = nn.functional.cross_entropy(self.model(self.data.x[idx]), self.data.y[idx])
            self.inner.zero_grad(set_to_none=True)
            loss.backward()
            self.inner.step()
            total += loss.item()
            self.steps_taken += 1
        return total / max(n, 1)

    def outer_step(self, theta_start: torch.Tensor, mixed_delta: torch.Tensor) -> None:
        """theta <- theta_start - lr * (Nesterov-)momentum(mixed_delta)."""
        mu = self.s.outer_momentum
        update = mixed_delta
        if mu > 0:
            self.momentum = mixed_delta.clone() if self.momentum is None else (
                self.momentum.mul_(mu).add_(mixed_delta)
            )
            update = mixed_delta + mu * self.momentum
        self.load_flat(theta_start - self.s.outer_lr * update)

    @torch.no_grad()
    def accuracy(self, split: Split) -> float:
        return evaluate(self.model, split)


def _name_key(item: tuple[str, object]) -> bytes:
    return item[0].encode("utf-8")


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> float:
    model.eval()
    correct = 0
    for lo in range(0, len(split), EVAL_BATCH):
        logits = model(split.x[lo : lo + EVAL_BATCH])
        correct += int((logits.argmax(1) == split.y[lo : lo + EVAL_BATCH]).sum())
    return correct / max(len(split), 1)


def settings_from(cfg_train: object, seed: int) -> TrainSettings:
    c = cfg_train
    return TrainSettings(
        model=c.model, hidden=c.hidden, seed=seed, local_steps=c.local_steps,
        batch_size=c.batch_size, inner_lr=c.inner_lr, outer_lr=c.outer_lr,
        outer_momentum=c.outer_momentum,
    )


def node_trainer(settings: TrainSettings, part: int, parts: int, alpha: float) -> LocalTrainer:
    data = node_train_split(part, parts, alpha, settings.seed)
    # Batches differ per node: seed the sampler with the partition index too.
    return LocalTrainer(settings, data, sample_seed=settings.seed * 1_000_003 + part)


def train_centralized(settings: TrainSettings, total_steps: int) -> tuple[float, nn.Module]:
    """The baseline: the same model and inner optimizer on the union of all node data
    (the whole train split) for `total_steps` steps; returns (test accuracy, model)."""
    train, test = digits_splits()
    trainer = LocalTrainer(settings, train, sample_seed=settings.seed)
    trainer.inner_steps(total_steps)
    return trainer.accuracy(test), trainer.model


def test_split() -> Split:
    return digits_splits()[1]
