"""Sequential digits: scikit-learn's 8x8 digits read pixel by pixel, as a Task.

Each node's data is its share of a per-class Dirichlet(alpha) label split of the fixed
train split (fflnode.train.data); batches are drawn at random from it by a generator
seeded with (run seed, partition), so a node replays its batches after a restart. The
model is the 4-block SSD classifier ("ssd", default) or a GRU ("gru"); `width` sets its
d_model / hidden size (0: the model's default). Evaluation is on the fixed test split.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fflnode.errors import ConfigError
from fflnode.train.data import Split, digits_splits, dirichlet_partition
from fflnode.train.model import build_model

# Test-set evaluation batch: 128 sequences of 64 steps keep the SSD's activations
# ~12 MB (all 360 at once added ~50 MB of peak RSS).
EVAL_BATCH = 128
SAMPLER_SALT = 1_000_003  # batch sampler seed = run seed * salt + partition


@dataclass
class DigitsTask:
    model: Literal["ssd", "gru"] = "ssd"
    width: int = 0  # SSD d_model / GRU hidden size; 0 = the model's default
    alpha: float = 0.5  # Dirichlet concentration of the non-IID label split
    batch_size: int = 32

    primary_metric = "accuracy"

    def __post_init__(self) -> None:
        if self.model not in ("ssd", "gru"):
            raise ConfigError(f"digits: model {self.model!r}, choose 'ssd' or 'gru'")
        if self.width < 0 or self.alpha <= 0 or self.batch_size < 1:
            raise ConfigError("digits: width >= 0, alpha > 0 and batch_size >= 1 are needed")

    def build_model(self, seed: int) -> nn.Module:
        return build_model(self.model, seed, self.width)

    def split(self, partition: int, nodes: int, seed: int) -> Split:
        train, _ = digits_splits()
        if nodes == 1:
            return train
        parts = dirichlet_partition(train.y.numpy(), nodes, self.alpha, seed)
        return train.subset(parts[partition])

    def train_data(self, partition: int, nodes: int, seed: int) -> Iterator[tuple]:
        data = self.split(partition, nodes, seed)
        gen = torch.Generator().manual_seed(seed * SAMPLER_SALT + partition)
        while True:  # random batches, forever: the trainer takes what it needs
            idx = torch.randint(0, len(data), (self.batch_size,), generator=gen)
            yield data.x[idx], data.y[idx]

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Mapping[str, float]:
        _, test = digits_splits()
        model.eval()
        correct, total_loss = 0, 0.0
        for lo in range(0, len(test), EVAL_BATCH):
            logits = model(test.x[lo : lo + EVAL_BATCH])
            y = test.y[lo : lo + EVAL_BATCH]
            correct += int((logits.argmax(1) == y).sum())
            total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        model.train()
        n = max(len(test), 1)
        return {"accuracy": correct / n, "loss": total_loss / n}
