"""Small SSD networks: an input stem, pre-norm SSD blocks (optional MLPs), a norm and a head.

One `SSDModel` class serves three uses, chosen by `SSDConfig`: sequential digits (real
features in, logits of the mean over steps out; registered as "ssd" via `SSDClassifier`), MQAR
(token fields in, per-step logits out) and the layer-streaming benchmark. Parameter names
are stable ("embed.*", "blocks.{i}.*", "readout.*"): streamed.py loads one such unit at a time
from a weight file, by its prefix.

Promise: `forward_with_states` takes and returns one LayerState per block, and running a
sequence in pieces while carrying the states gives the same outputs as running it whole.
Float32 throughout; device-agnostic.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fflnode.errors import ConfigError
from fflnode.ssm.ssd import DEFAULT_CHUNK_SIZE, RMSNorm, SSDLayer
from fflnode.ssm.states import LayerState, StateShape
from fflnode.train.data import NUM_CLASSES, SEQUENCE_LENGTH

READOUTS = ("last", "mean", "sequence")
CONFIG_METADATA_KEY = "fflnode.ssm.config"  # safetensors metadata entry holding the config


@dataclass(frozen=True)
class SSDConfig:
    """Shape of an SSDModel. Exactly one of d_input (real features) or vocab_sizes (token
    fields, one embedding table each, summed) describes the input."""

    d_input: int = 0  # features per step: input (b, T, d_input) float
    vocab_sizes: tuple[int, ...] = ()  # token fields: input (b, T, len(vocab_sizes)) int64
    d_model: int = 32
    n_layers: int = 2
    d_state: int = 16
    headdim: int = 16
    expand: int = 2
    mlp_ratio: int = 2  # hidden = mlp_ratio·d_model; 0: no MLP
    chunk_size: int = DEFAULT_CHUNK_SIZE
    n_outputs: int = NUM_CLASSES
    readout: str = "last"  # "last" | "mean" (logits (b, n_outputs)) | "sequence" (b, T, ·)
    a_init_range: tuple[float, float] = (1.0, 16.0)
    dt_init_range: tuple[float, float] = (1e-3, 1e-1)
    # > 0: a learned position embedding for steps 0..max_positions-1 is added to the
    # input projection ("embed.pos"). It makes outputs depend on absolute position, so
    # it is off for models whose states are composed across segments (MQAR, streaming).
    max_positions: int = 0

    def __post_init__(self) -> None:
        if (self.d_input > 0) == bool(self.vocab_sizes):
            raise ConfigError("SSDConfig: give exactly one of d_input > 0 or vocab_sizes")
        if self.readout not in READOUTS:
            raise ConfigError(f"SSDConfig: readout {self.readout!r}, choose one of {READOUTS}")
        if (self.expand * self.d_model) % self.headdim:
            raise ConfigError(
                f"SSDConfig: expand·d_model = {self.expand * self.d_model} is not a multiple "
                f"of headdim {self.headdim}"
            )

    @property
    def state_shape(self) -> StateShape:
        return (self.expand * self.d_model // self.headdim, self.headdim, self.d_state)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SSDConfig:
        try:
            doc = json.loads(text)
            doc["vocab_sizes"] = tuple(doc["vocab_sizes"])
            doc["a_init_range"] = tuple(doc["a_init_range"])
            doc["dt_init_range"] = tuple(doc["dt_init_range"])
            return cls(**doc)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"SSD model config is unreadable: {e}") from None


class SSDBlock(nn.Module):
    """u -> u + SSD(norm(u)) -> · + MLP(norm(·)), carrying the SSD layer's state."""

    def __init__(self, cfg: SSDConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model)
        self.mixer = SSDLayer(
            cfg.d_model,
            cfg.d_state,
            cfg.headdim,
            cfg.expand,
            cfg.chunk_size,
            cfg.a_init_range,
            cfg.dt_init_range,
        )
        self.mlp: nn.Module | None = None
        if cfg.mlp_ratio > 0:
            self.norm2 = RMSNorm(cfg.d_model)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
                nn.GELU(),
                nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
            )

    def forward(
        self, u: torch.Tensor, initial_state: LayerState | None = None
    ) -> tuple[torch.Tensor, LayerState]:
        y, state = self.mixer(self.norm1(u), initial_state)
        u = u + y
        if self.mlp is not None:
            u = u + self.mlp(self.norm2(u))
        return u, state


class Readout(nn.Module):
    """u (b, T, D) -> final RMSNorm -> last step, mean over steps, or every step -> head."""

    def __init__(self, cfg: SSDConfig) -> None:
        super().__init__()
        self.mode = cfg.readout
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_outputs)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u = self.norm(u)
        if self.mode == "last":
            u = u[:, -1]
        elif self.mode == "mean":
            u = u.mean(dim=1)
        return self.head(u)


class PositionalLinear(nn.Linear):
    """Linear input projection plus a learned per-position vector (zero-initialised)."""

    def __init__(self, d_input: int, d_model: int, max_positions: int) -> None:
        super().__init__(d_input, d_model)
        self.pos = nn.Parameter(torch.zeros(max_positions, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (b, T, d_input), T <= max
        T = x.shape[1]
        if self.pos.shape[0] < T:
            raise ConfigError(f"sequence of {T} steps, position embedding has {self.pos.shape[0]}")
        return super().forward(x) + self.pos[:T]


def make_embed(cfg: SSDConfig) -> nn.Module:
    """The input stem: Linear for real features (plus positions when max_positions > 0),
    summed embedding tables for token fields."""
    if cfg.d_input > 0:
        if cfg.max_positions > 0:
            return PositionalLinear(cfg.d_input, cfg.d_model, cfg.max_positions)
        return nn.Linear(cfg.d_input, cfg.d_model)
    return FieldEmbedding(cfg.vocab_sizes, cfg.d_model)


class SSDModel(nn.Module):
    """embed -> n_layers SSDBlocks ("blocks.{i}") -> readout (norm, pooling, head)."""

    def __init__(self, cfg: SSDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = make_embed(cfg)
        self.blocks = nn.ModuleList(SSDBlock(cfg) for _ in range(cfg.n_layers))
        self.readout = Readout(cfg)

    def state_spec(self) -> tuple[StateShape, ...]:
        """Per-layer (heads, head_dim, d_state): what states.from_wire must check against."""
        return tuple(self.cfg.state_shape for _ in self.blocks)

    def forward_with_states(
        self, x: torch.Tensor, initial_states: Sequence[LayerState] | None = None
    ) -> tuple[torch.Tensor, tuple[LayerState, ...]]:
        """x -> (logits, one LayerState per block: the state of initial ++ x)."""
        if initial_states is not None and len(initial_states) != len(self.blocks):
            raise ConfigError(
                f"{len(initial_states)} initial states for a {len(self.blocks)}-layer model"
            )
        u = self.embed(x)
        states = []
        for i, block in enumerate(self.blocks):
            u, s = block(u, None if initial_states is None else initial_states[i])
            states.append(s)
        return self.readout(u), tuple(states)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_states(x)[0]


@torch.no_grad()
def initialise(module: nn.Module) -> None:
    """(Re)initialise in place every parameter under `module` with the distributions the
    constructors use, drawn from torch's generator in module order: for a stage allocated
    from the meta device (fflnode.train.task.init_stage). Refuses a module it does not
    know, rather than leave its tensors undefined."""
    done: set[int] = set()  # tensors initialised (FieldEmbedding's, in its ParameterList)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
            if isinstance(m, PositionalLinear):
                m.pos.zero_()
        elif isinstance(m, RMSNorm):
            m.weight.fill_(1.0)
        elif isinstance(m, SSDLayer):
            m.reset_heads()
        elif isinstance(m, FieldEmbedding):
            m.reset_tables()
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if isinstance(m, nn.Linear | RMSNorm | SSDLayer):
            done.update(id(t) for t in own)  # their children are visited on their own
        elif isinstance(m, FieldEmbedding):
            done.update(id(t) for t in m.parameters())  # its tables sit in a ParameterList
        elif any(id(t) not in done for t in own):
            raise TypeError(f"no initialisation for {type(m).__name__}")


class FieldEmbedding(nn.Module):
    """x (b, T, F) int64 -> Σ_f E_f[x[..., f]] (b, T, D): one table per token field.

    Tables start uniform in ±√3 (unit variance, as nn.Embedding's N(0, 1)); uniform_ is
    used because it is cheap on the meta device (see SSDLayer's initialisation).
    """

    def __init__(self, vocab_sizes: Sequence[int], d_model: int) -> None:
        super().__init__()
        self.tables = nn.ParameterList(nn.Parameter(torch.empty(v, d_model)) for v in vocab_sizes)
        self.reset_tables()

    def reset_tables(self) -> None:
        for table in self.tables:
            nn.init.uniform_(table, -math.sqrt(3.0), math.sqrt(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x[..., None]
        return sum(F.embedding(x[..., f], table) for f, table in enumerate(self.tables))


class SSDClassifier(SSDModel):
    """Sequential digits: x (b, 64, 1) -> logits (b, 10). Registered as "ssd" in MODELS.

    Defaults chosen on the digits task with the GRU's budget (1600 Adam steps, batch 32,
    lr 3e-3, seeds 0-2; tools/bench_ssd_digits.py): four SSD blocks without MLPs and a
    mean over steps beat two blocks with MLPs, three blocks, or a last-step readout.
    expand = 1 (inner width = d_model, 2 heads): the step is elementwise-bound, and
    halving the inner width cut it from 49 to 30 ms here (one thread, batch 32).
    A learned position embedding (which pixel of the 8x8 grid a step is) lifted Adam
    with the WSD schedule from 89-93 % to 96.4-96.9 % at both batch 32 x 2400 steps and
    batch 128 x 600 (seeds 1, 2), and halved the steps to 90 %: what a 600-round testnet
    plus its baseline can afford in 5 minutes. About 19k parameters.
    """

    def __init__(
        self,
        d_model: int = 32,
        n_layers: int = 4,
        d_state: int = 16,
        headdim: int = 16,
        expand: int = 1,
        mlp_ratio: int = 0,
        chunk_size: int = SEQUENCE_LENGTH // 4,
    ) -> None:
        super().__init__(
            SSDConfig(
                d_input=1,
                d_model=d_model,
                n_layers=n_layers,
                d_state=d_state,
                headdim=headdim,
                expand=expand,
                mlp_ratio=mlp_ratio,
                chunk_size=chunk_size,
                n_outputs=NUM_CLASSES,
                readout="mean",
                max_positions=SEQUENCE_LENGTH,
            )
        )
