"""Models a run can train, built identically on every node from the run seed.

Every node builds its model on the CPU under `torch.manual_seed(seed)` and only then
moves it to its device, so all nodes start from bit-identical weights whatever their
hardware (CPU and CUDA generators differ). Models are float32 throughout: the exact
merge and the wire format assume it.
"""

from __future__ import annotations

import torch
from torch import nn

from fflnode.errors import ConfigError
from fflnode.ssm.model import SSDClassifier
from fflnode.train.data import NUM_CLASSES


class GRUClassifier(nn.Module):
    """x (batch, T, 1) -> logits (batch, 10), read from the last hidden state."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.GRU(input_size=1, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


MODELS = {"gru": GRUClassifier, "ssd": SSDClassifier}
# The constructor argument that `train.width` sets, per model (0 keeps the default).
WIDTH_ARGUMENT = {"gru": "hidden", "ssd": "d_model"}


def build_model(name: str, seed: int, width: int = 0) -> nn.Module:
    """The model `name`, initialised from `seed` on the CPU (float32)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    kwargs = {WIDTH_ARGUMENT[name]: width} if width else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(**kwargs)
    return model.float()
