"""Multi-query associative recall (MQAR) as a Task with the state capability.

Training: every node trains the SSD model of fflnode/ssm/mqar.py on whole sequences it
samples itself (PAIRS key->value pairs, then one query per key; the loss is on the
queries only), so the run's merge leaves every node with the same, exact weights.

States (fflnode.train.task.StateTask): `contexts` sequences per epoch are drawn from the
run seed; node j of N reads only its share of every one of them, PAIRS/N contiguous
pairs (fflnode.ssm.mqar.segment). Its state of context c therefore knows the pairs it
read and nothing of the others ("foreign" pairs, recalled at chance: 1/VALUES). The
members' states of context c, composed in ascending peer-ID order, are exactly the state
of one node reading every share in that order (one layer; deeper layers approximately),
which is what `evaluate_states` measures: recall of the foreign pairs' values.

Promises: deterministic in (seed, partition) for training and in (seed, epoch) for the
contexts; the context space is the same on every node.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fflnode.errors import ConfigError
from fflnode.ssm import mqar
from fflnode.ssm.model import SSDModel
from fflnode.ssm.states import LayerState, StateShape, batch_for, stack_layers, unstack_layers

TRAIN_SALT = 0x4D51  # training batches: rng(seed, salt, partition)
CONTEXT_SALT = 0x4354  # the state contexts of epoch e: rng(seed, salt, e)
TEST_SALT = 0x5445  # the fixed test sequences of `evaluate` (read whole)
MAX_CONTEXTS = 1024  # a node holds at most federation.MAX_OWN_CONTEXTS states


@dataclass
class MqarTask:
    layers: int = 1
    contexts: int = 256  # MQAR sequences per state epoch, split over the nodes
    batch_size: int = 32
    eval_sequences: int = 256  # test sequences of `evaluate`

    primary_metric = "recall"
    # The centralized baseline: mqar.QUICK_LR, the rate the one-node recipe uses.
    baseline_lr = mqar.QUICK_LR

    def __post_init__(self) -> None:
        if not 1 <= self.layers <= 8:
            raise ConfigError("mqar: layers must be between 1 and 8")
        if not 1 <= self.contexts <= MAX_CONTEXTS:
            raise ConfigError(f"mqar: contexts must be between 1 and {MAX_CONTEXTS}")
        if self.batch_size < 1 or self.eval_sequences < 1:
            raise ConfigError("mqar: batch_size and eval_sequences must be at least 1")

    # ------------------------------------------------------------------ training
    def build_model(self, seed: int) -> nn.Module:
        return SSDModel(mqar.config(self.layers))

    def train_data(self, partition: int, nodes: int, seed: int) -> Iterator[mqar.Batch]:
        rng = np.random.Generator(np.random.PCG64([seed, TRAIN_SALT, partition]))
        while True:  # endless, replayable from the seed
            yield mqar.sample(rng, self.batch_size)

    def loss(self, model: nn.Module, batch: mqar.Batch) -> torch.Tensor:
        logits = model(torch.cat([batch.pairs, batch.queries], dim=1))[:, mqar.PAIRS :]
        return F.cross_entropy(logits.reshape(-1, mqar.VALUES), batch.answers.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Mapping[str, float]:
        """Recall of every query on fixed test sequences read whole by one model."""
        b = mqar.sample(np.random.Generator(np.random.PCG64([0, TEST_SALT])), self.eval_sequences)
        logits = model(torch.cat([b.pairs, b.queries], dim=1))[:, mqar.PAIRS :]
        loss = F.cross_entropy(logits.reshape(-1, mqar.VALUES), b.answers.reshape(-1))
        return {"recall": float(mqar.hits(logits, b.answers).float().mean()), "loss": float(loss)}

    # ------------------------------------------------------------------ states
    def epoch_batch(self, seed: int, epoch: int) -> mqar.Batch:
        """The `contexts` sequences of state epoch `epoch` (every node draws the same)."""
        return mqar.sample(np.random.Generator(np.random.PCG64([seed, CONTEXT_SALT, epoch])),
                           self.contexts)  # fmt: skip

    def state_spec(self, model: nn.Module) -> Sequence[StateShape]:
        assert isinstance(model, SSDModel)
        return model.state_spec()

    def local_contexts(
        self, partition: int, nodes: int, seed: int, epoch: int
    ) -> Mapping[int, torch.Tensor]:
        """Context c -> this node's share of sequence c's pairs, (PAIRS / nodes, 2)."""
        if mqar.PAIRS % nodes:
            raise ConfigError(
                f"mqar: {mqar.PAIRS} pairs do not split evenly over {nodes} nodes "
                "(run.nodes must divide it: 1, 2, 4, 8, 16 or 32)"
            )
        share = mqar.segment(self.epoch_batch(seed, epoch).pairs, nodes, partition)
        return {c: share[c] for c in range(self.contexts)}

    @torch.no_grad()
    def fold(self, model: nn.Module, segments: Sequence[torch.Tensor]) -> Sequence[LayerState]:
        """Per layer, the states of reading each segment from h = 0 (batched over them)."""
        assert isinstance(model, SSDModel)
        if len({int(s.shape[0]) for s in segments}) == 1:
            return model.forward_with_states(torch.stack(list(segments)))[1]
        # ragged (not this task's own contexts): one by one
        return stack_layers([unstack_layers(model.forward_with_states(s[None])[1])[0]
                             for s in segments])  # fmt: skip

    @torch.no_grad()
    def evaluate_states(
        self,
        model: nn.Module,
        states: Mapping[int, Sequence[LayerState]],
        partition: int,
        nodes: int,
        seed: int,
        epoch: int,
    ) -> Mapping[str, float]:
        """Recall (and loss) of the queries about pairs partition `partition` never read,
        each sequence's queries conditioned on its context's state (h = 0 where absent)."""
        assert isinstance(model, SSDModel)
        b = self.epoch_batch(seed, epoch)
        batched = batch_for(model.state_spec(), states, range(self.contexts))
        logits = model.forward_with_states(b.queries, batched)[0]
        foreign = mqar.query_owner(b, nodes) != partition
        if not bool(foreign.any()):
            return {"recall": float("nan"), "loss": float("nan")}
        loss = F.cross_entropy(logits[foreign], b.answers[foreign])
        return {
            "recall": float(mqar.hits(logits, b.answers)[foreign].float().mean()),
            "loss": float(loss),
        }

    @torch.no_grad()
    def respond(
        self,
        model: nn.Module,
        states: Sequence[LayerState] | None,
        prompt: str,
        context: int,
        seed: int,
        epoch: int,
    ) -> str:
        """The value the model recalls for key `prompt` in context `context` (an empty
        prompt: every key of the context, and how many it recalls)."""
        assert isinstance(model, SSDModel)
        if not 0 <= context < self.contexts:
            raise ConfigError(f"mqar: context {context} not in 0-{self.contexts - 1}")
        pairs = self.epoch_batch(seed, epoch).pairs[context]
        truth = {int(k): int(v) for k, v in pairs}
        if not prompt.strip():
            keys = [int(k) for k in pairs[:, 0]]
        else:
            try:
                keys = [int(prompt)]
            except ValueError:
                raise ConfigError(
                    f"mqar: the prompt is a key, 0 to {mqar.KEYS - 1}; got {prompt!r}"
                ) from None
        if not all(0 <= k < mqar.KEYS for k in keys):
            raise ConfigError(f"mqar: keys are 0 to {mqar.KEYS - 1}, got {prompt!r}")
        query = torch.tensor([[[k, mqar.QUERY] for k in keys]])
        initial = None if states is None else stack_layers([states])
        recalled = model.forward_with_states(query, initial)[0][0].argmax(-1).tolist()
        if len(keys) > 1:
            right = sum(truth[k] == v for k, v in zip(keys, recalled, strict=True))
            shown = " ".join(f"{k}:{v}" for k, v in zip(keys, recalled, strict=True))
            return f"{right} of {len(keys)} values recalled; key:value {shown}"
        key, value = keys[0], recalled[0]
        if key not in truth:
            return f"key {key} -> value {value} (key {key} is not in context {context})"
        where = int((pairs[:, 0] == key).nonzero()[0, 0])
        return f"key {key} -> value {value} (true value {truth[key]}; pair {where} of {mqar.PAIRS})"
