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
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fflnode.errors import ConfigError
from fflnode.ssm.model import SSDConfig, SSDModel

VOCAB = 256  # bytes
HELDOUT_FRACTION = 0.1  # the tail of every document, never trained on
SAMPLER_SALT = 2_000_003  # batch sampler seed = run seed * salt + partition
SPLIT_SALT = 0x7E47  # separates the document deal from other uses of the run seed
# Held-out windows evaluated at most: 512 x 128 bytes covers the whole held-out set
# (~46 KB) at the default length and keeps an evaluation under a second here.
MAX_EVAL_WINDOWS = 512
EVAL_BATCH = 32


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

    primary_metric = "perplexity"

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "d_model", "n_layers", "d_state"):
            if getattr(self, name) < 1:
                raise ConfigError(f"text: {name} must be at least 1")
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
        logits = model(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    def heldout_windows(self, doc_ids: list[int] | None = None) -> torch.Tensor:
        """Non-overlapping (seq_len + 1)-byte windows of the held-out parts."""
        docs = documents()
        ids = range(len(docs)) if doc_ids is None else doc_ids
        n = self.seq_len + 1
        windows = []
        for i in ids:
            tail = split_document(docs[i][1])[1]
            windows += [tail[k : k + n] for k in range(0, len(tail) - n + 1, n)]
        windows = windows[:MAX_EVAL_WINDOWS]
        if not windows:
            raise ConfigError("text: no held-out window of seq_len + 1 bytes")
        return torch.from_numpy(
            np.frombuffer(b"".join(windows), dtype=np.uint8).astype(np.int64)
        ).reshape(len(windows), n)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, doc_ids: list[int] | None = None) -> Mapping[str, float]:
        windows = self.heldout_windows(doc_ids)
        model.eval()
        total, count = 0.0, 0
        for lo in range(0, len(windows), EVAL_BATCH):
            batch = windows[lo : lo + EVAL_BATCH]
            logits = model(batch[:, :-1])
            total += float(
                nn.functional.cross_entropy(
                    logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += batch[:, 1:].numel()
        model.train()
        loss = total / max(count, 1)
        return {"perplexity": math.exp(loss), "loss": loss, "bits_per_byte": loss / math.log(2)}
