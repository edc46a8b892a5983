"""A byte-level language model on real English text that ships with Python, as a Task.

The text is the Python documentation's topic pages (`pydoc_data.topics`, part of every
CPython install: 79 documents, about 465 KB of English prose and examples), so nothing is
downloaded at run time. Each document keeps its last HELDOUT_FRACTION of bytes for
evaluation. Documents are dealt to nodes whole, non-IID by topic: a seeded shuffle, then
largest first to the node holding the fewest bytes, so nodes hold similar amounts of
different subjects. The centralized baseline (partition 0 of 1) trains on the union.

The model is the project's SSD language model (fflnode.ssm.model.SSDModel over bytes:
vocabulary 256, one embedding table, per-step logits); its blocks are `blocks.{i}`.
Evaluation reports the held-out loss in nats per byte, perplexity (exp of it) and bits
per byte, on the held-out parts of every document.

States (fflnode.train.task.StateTask): context d is document d. The node holding it reads
the last `state_bytes` bytes of its training part (the text just before its held-out
tail) into per-layer states; a document is dealt whole, so each context has one reader
and its federated state is exactly that reader's. `evaluate_states` is the loss on how
the documents a node never trained on continue: the first seq_len + 1 bytes of each one's
held-out part (the text right after what its state read), conditioned on its document's
state (h = 0 where the node has none): what another node's memory of a document is worth.
Only the text that follows a state is scored with it: a state carried to a window further
on describes text the window does not continue, and made the loss worse (measured: mean
held-out perplexity 5.79 -> 5.86 with the merged states, 4 nodes, 200 rounds).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fflnode.errors import ConfigError
from fflnode.ssm.model import SSDConfig, SSDModel, initialise
from fflnode.ssm.states import LayerState, StateShape, batch_for, stack_layers, unstack_layers
from fflnode.train.task import BlockChain, Stage

VOCAB = 256  # bytes
HELDOUT_FRACTION = 0.1  # the tail of every document, never trained on
SAMPLER_SALT = 2_000_003  # batch sampler seed = run seed * salt + partition
SPLIT_SALT = 0x7E47  # separates the document deal from other uses of the run seed
# Held-out windows evaluated at most: 512 x 128 bytes covers the whole held-out set
# (~46 KB) at the default length and keeps an evaluation under a second here.
MAX_EVAL_WINDOWS = 512
EVAL_BATCH = 32
CONTINUATION_BYTES = 160  # bytes `respond` generates


def _model_input(batch: torch.Tensor) -> torch.Tensor:
    return batch[:, :-1]


def _next_byte_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each next byte (a mean over rows, as BlockChain requires)."""
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def _block_forward(block: nn.Module, u: torch.Tensor) -> torch.Tensor:
    return block(u)[0]  # the SSD layer's final state is not needed for training


@lru_cache(maxsize=1)
def documents() -> tuple[tuple[str, bytes], ...]:
    """(topic, UTF-8 text) of every pydoc topic, sorted by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its documentation data
        raise ConfigError(
            "text: pydoc_data.topics is missing from this Python (it ships with CPython); "
            "install the python3 documentation data or choose another task"
        ) from None
    return tuple((name, topics[name].encode("utf-8")) for name in sorted(topics))


def split_document(text: bytes) -> tuple[bytes, bytes]:
    cut = len(text) - max(1, int(len(text) * HELDOUT_FRACTION))
    return text[:cut], text[cut:]


def deal(sizes: list[int], nodes: int, seed: int) -> list[list[int]]:
    """Document indices per node: a seeded shuffle, then largest first to the lightest."""
    rng = np.random.Generator(np.random.PCG64([seed, SPLIT_SALT]))
    order = sorted(rng.permutation(len(sizes)).tolist(), key=lambda i: -sizes[i])
    load, parts = [0] * nodes, [[] for _ in range(nodes)]
    for i in order:
        k = min(range(nodes), key=lambda j: (load[j], j))
        parts[k].append(i)
        load[k] += sizes[i]
    return [sorted(p) for p in parts]


@dataclass
class TextTask:
    seq_len: int = 128  # bytes of context per training window
    batch_size: int = 16
    d_model: int = 64
    n_layers: int = 2
    d_state: int = 16
    mlp_ratio: int = 2
    # Bytes of a document's training part folded into its state (its last ones); 0: all.
    state_bytes: int = 512

    primary_metric = "perplexity"
    # The centralized baselines' Adam learning rate, tuned on the data-parallel baseline
    # (4 nodes' batches a step, 600 steps, seed 1; train_centralized in-process, the
    # testnet's own bits): held-out perplexity 4.427 at 3e-3, 4.362 at 6e-3, 4.348 at
    # 1e-2, 4.383 at 1.5e-2.
    baseline_lr = 1e-2

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "d_model", "n_layers", "d_state"):
            if getattr(self, name) < 1:
                raise ConfigError(f"text: {name} must be at least 1")
        if self.state_bytes < 0:
            raise ConfigError("text: state_bytes must be >= 0 (0: the whole training part)")
        if self.d_model % 16:
            raise ConfigError("text: d_model must be a multiple of 16 (the SSD head size)")

    def config(self) -> SSDConfig:
        return SSDConfig(
            vocab_sizes=(VOCAB,),
            d_model=self.d_model,
            n_layers=self.n_layers,
            d_state=self.d_state,
            headdim=16,
            expand=2,
            mlp_ratio=self.mlp_ratio,
            chunk_size=min(64, self.seq_len),
            n_outputs=VOCAB,
            readout="sequence",
        )

    def build_model(self, seed: int) -> nn.Module:
        return SSDModel(self.config())

    def init_stage(self, module: nn.Module, name: str, seed: int) -> None:
        """A stage's weights, drawn as SSDModel's constructor draws them (fflnode seeds
        the generator per stage): the model is never built whole, so a node can train
        one bigger than its memory (fflnode.train.task, "init_stage")."""
        initialise(module)

    def node_documents(self, partition: int, nodes: int, seed: int) -> list[int]:
        """Indices (into `documents()`) of the documents this partition trains on."""
        docs = documents()
        if nodes > len(docs):
            raise ConfigError(f"text: {nodes} nodes but only {len(docs)} documents to deal")
        return deal([len(t) for _, t in docs], nodes, seed)[partition]

    def train_data(self, partition: int, nodes: int, seed: int) -> Iterator[torch.Tensor]:
        docs = documents()
        texts = [split_document(docs[i][1])[0] for i in self.node_documents(partition, nodes, seed)]
        texts = [t for t in texts if len(t) > self.seq_len + 1]
        if not texts:
            raise ConfigError(f"text: partition {partition} has no document longer than seq_len")
        stream = np.frombuffer(b"".join(texts), dtype=np.uint8)
        starts = np.concatenate([[0], np.cumsum([len(t) for t in texts])[:-1]])
        # Window starts that stay inside one document (no window spans two of them).
        valid = np.concatenate(
            [
                np.arange(s, s + len(t) - self.seq_len - 1)
                for s, t in zip(starts, texts, strict=True)
            ]
        )
        gen = torch.Generator().manual_seed(seed * SAMPLER_SALT + partition)
        offsets = torch.arange(self.seq_len + 1)
        tokens = torch.from_numpy(stream.astype(np.int64))
        while True:
            pick = torch.randint(0, len(valid), (self.batch_size,), generator=gen)
            base = torch.from_numpy(valid[pick.numpy()])
            yield tokens[base[:, None] + offsets]  # (batch, seq_len + 1)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return _next_byte_loss(model(batch[:, :-1]), batch)

    def blocks(self, model: nn.Module) -> BlockChain:
        """The SSD LM as a chain: embed, blocks.{i} (the residual stream (b, T, D)
        between them), readout (logits); the same operations as SSDModel.forward."""
        assert isinstance(model, SSDModel)
        stages = (
            Stage("embed", model.embed),
            *(Stage(f"blocks.{i}", b, _block_forward) for i, b in enumerate(model.blocks)),
            Stage("readout", model.readout),
        )
        return BlockChain(stages, _model_input, _next_byte_loss)

    def heldout_windows(self, doc_ids: list[int] | None = None, *, with_documents: bool = False):  # type: ignore[no-untyped-def]
        """Non-overlapping (seq_len + 1)-byte windows of the held-out parts (and, with
        `with_documents`, the document each window comes from)."""
        docs = documents()
        ids = range(len(docs)) if doc_ids is None else doc_ids
        n = self.seq_len + 1
        windows, owners = [], []
        for i in ids:
            tail = split_document(docs[i][1])[1]
            cut = [tail[k : k + n] for k in range(0, len(tail) - n + 1, n)]
            windows += cut
            owners += [i] * len(cut)
        windows, owners = windows[:MAX_EVAL_WINDOWS], owners[:MAX_EVAL_WINDOWS]
        if not windows:
            raise ConfigError("text: no held-out window of seq_len + 1 bytes")
        tensor = torch.from_numpy(
            np.frombuffer(b"".join(windows), dtype=np.uint8).astype(np.int64)
        ).reshape(len(windows), n)
        return (tensor, owners) if with_documents else tensor

    def continuation_windows(self, doc_ids: list[int]) -> tuple[torch.Tensor, list[int]]:
        """The first seq_len + 1 bytes of each document's held-out part, the text right
        after what its state reads, and the document of each (a document whose held-out
        part is shorter has none)."""
        docs = documents()
        n = self.seq_len + 1
        owners = [d for d in doc_ids if len(split_document(docs[d][1])[1]) >= n]
        rows = [list(split_document(docs[d][1])[1][:n]) for d in owners]
        if not rows:
            raise ConfigError("text: no held-out part of seq_len + 1 bytes to continue")
        return torch.tensor(rows, dtype=torch.int64), owners

    @torch.no_grad()
    def evaluate(self, model: nn.Module, doc_ids: list[int] | None = None) -> Mapping[str, float]:
        windows, owners = self.heldout_windows(doc_ids, with_documents=True)
        return self._loss_from(model, windows, owners, {})

    # ------------------------------------------------------------------ states
    def state_spec(self, model: nn.Module) -> Sequence[StateShape]:
        assert isinstance(model, SSDModel)
        return model.state_spec()

    def local_contexts(
        self, partition: int, nodes: int, seed: int, epoch: int
    ) -> Mapping[int, torch.Tensor]:
        """Document d (of this node's) -> the bytes of its training part folded into its
        state; the same in every epoch (the corpus does not change)."""
        docs = documents()
        out = {}
        for d in self.node_documents(partition, nodes, seed):
            body = split_document(docs[d][1])[0][-self.state_bytes :]
            out[d] = torch.from_numpy(np.frombuffer(body, dtype=np.uint8).astype(np.int64))
        return out

    @torch.no_grad()
    def fold(self, model: nn.Module, segments: Sequence[torch.Tensor]) -> Sequence[LayerState]:
        """Per layer, each segment's state from h = 0, batched (one pass per length)."""
        assert isinstance(model, SSDModel)
        model.eval()
        out: dict[int, tuple[LayerState, ...]] = {}
        by_length: dict[int, list[int]] = {}
        for i, s in enumerate(segments):
            by_length.setdefault(int(s.shape[0]), []).append(i)
        for idx in by_length.values():
            states = model.forward_with_states(torch.stack([segments[i] for i in idx]))[1]
            out.update(zip(idx, unstack_layers(states), strict=True))
        return stack_layers([out[i] for i in range(len(segments))])

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
        """Loss on how the documents partition `partition` never trained on continue
        (`continuation_windows`), each conditioned on its document's state in `states`
        (h = 0 when absent)."""
        own = set(self.node_documents(partition, nodes, seed))
        foreign = [d for d in range(len(documents())) if d not in own]
        windows, owners = self.continuation_windows(foreign)
        return self._loss_from(model, windows, owners, states)

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
        """A greedy continuation of `prompt`, read after document `context`'s state."""
        assert isinstance(model, SSDModel)
        model.eval()
        carry = None if states is None else stack_layers([states])
        tokens = torch.tensor([list(prompt.encode("utf-8")) or [ord(" ")]])
        out = bytearray()
        for _ in range(CONTINUATION_BYTES):
            logits, carry = model.forward_with_states(tokens, carry)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            tokens = torch.tensor([[nxt]])
        return out.decode("utf-8", "replace")

    def _loss_from(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        owners: list[int],
        states: Mapping[int, Sequence[LayerState]],
    ) -> Mapping[str, float]:
        """Loss of `windows` (predicting bytes 1..n from 0..n-1), window i starting from
        the state of document owners[i] where `states` has it, else from h = 0."""
        model.eval()
        total, count = 0.0, 0
        for lo in range(0, len(windows), EVAL_BATCH):
            batch = windows[lo : lo + EVAL_BATCH]
            initial = None
            if any(d in states for d in owners[lo : lo + EVAL_BATCH]):
                initial = batch_for(self.state_spec(model), states, owners[lo : lo + EVAL_BATCH])
            if initial is None:  # the plain forward: an out-of-core trainer streams it
                logits = model(batch[:, :-1])
            else:
                logits = model.forward_with_states(batch[:, :-1], initial)[0]  # type: ignore[operator]
            total += float(
                nn.functional.cross_entropy(
                    logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += batch[:, 1:].numel()
        model.train()
        loss = total / max(count, 1)
        return {"perplexity": math.exp(loss), "loss": loss, "bits_per_byte": loss / math.log(2)}
