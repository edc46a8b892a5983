"""Multi-query associative recall (MQAR): the task F-SSD's knowledge transfer is measured on.

A sequence holds PAIRS key→value pairs with distinct keys, then one query per key; the
model must answer each query with its value. A context token carries one pair as two
fields (key, value); a query token is (key, QUERY). So one SSD layer can store a pair in
one step, with no convolution whose window would cross a node boundary when the pairs are
split over nodes.

Owns the task's definition (vocabularies, sampling, the model shape) and its training
recipe, shared by tools/mqar.py (the per-layer experiment), the built-in mqar task
(fflnode/train/tasks/mqar.py: the same experiment inside the daemons, `fflnode testnet
--task mqar`) and tools/bench_state_codec.py. Promises: sampling and training are
deterministic for a seed on one thread count. Sans-IO: torch and numpy only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fflnode.ssm.model import SSDConfig, SSDModel

KEYS = 64  # key vocabulary; the state's d_state equals it, so keys can be orthogonal
VALUES = 64  # value vocabulary: chance recall is 1/VALUES
QUERY = VALUES  # the value-field id that marks a query token
PAIRS = 32  # pairs per sequence, split over the nodes (divisible by 2, 4 and 8)
# Token ids of either field are < 256: one byte per field when counting raw-token bytes.
TOKEN_FIELD_BYTES = 1
# A short one-process recipe (tools/bench_state_codec.py; the mqar task's baseline lr),
# 1 layer, seed 0: measured 99.3 % recall on 256 test sequences after 6.4 s on 1 thread
# (load average 3). 150 steps reach 78 %;
# tools/mqar.py's 400 steps of 64 at lr 3e-3 reach 99.9 % in ~17 s on 2 threads.
QUICK_STEPS, QUICK_BATCH, QUICK_LR = 200, 32, 1e-2


@dataclass(frozen=True)
class Batch:
    pairs: torch.Tensor  # (S, PAIRS, 2) int64: (key, value) context tokens
    queries: torch.Tensor  # (S, PAIRS, 2): (key, QUERY), keys in random order
    answers: torch.Tensor  # (S, PAIRS): the value of each query's key


def sample(rng: np.random.Generator, n: int) -> Batch:
    """n sequences of PAIRS distinct-key pairs and one query per key, shuffled."""
    keys = np.argsort(rng.random((n, KEYS)), axis=1)[:, :PAIRS]  # distinct keys per sequence
    values = rng.integers(0, VALUES, (n, PAIRS))
    order = np.argsort(rng.random((n, PAIRS)), axis=1)
    q_keys = np.take_along_axis(keys, order, 1)
    answers = np.take_along_axis(values, order, 1)
    pairs = np.stack([keys, values], -1)
    queries = np.stack([q_keys, np.full_like(q_keys, QUERY)], -1)
    return Batch(*(torch.as_tensor(a, dtype=torch.long) for a in (pairs, queries, answers)))


def config(layers: int) -> SSDConfig:
    return SSDConfig(
        vocab_sizes=(KEYS, VALUES + 1),
        d_model=64,
        n_layers=layers,
        d_state=KEYS,
        headdim=32,
        expand=2,
        mlp_ratio=2,
        chunk_size=32,
        n_outputs=VALUES,
        readout="sequence",
        a_init_range=(0.05, 0.5),  # slow decays to start from: recall needs long memory
    )


def train(layers: int, steps: int, seed: int, batch: int, lr: float) -> tuple[SSDModel, float]:
    """Train on full sequences (all pairs, then all queries); loss on the queries only.

    Returns the model in eval mode and the training wall time in seconds."""
    torch.manual_seed(seed)
    model = SSDModel(config(layers))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    rng = np.random.Generator(np.random.PCG64(seed))
    t0 = time.perf_counter()
    for _ in range(steps):
        b = sample(rng, batch)
        logits = model(torch.cat([b.pairs, b.queries], dim=1))[:, PAIRS:]
        loss = F.cross_entropy(logits.reshape(-1, VALUES), b.answers.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval(), time.perf_counter() - t0


def segment(pairs: torch.Tensor, nodes: int, j: int) -> torch.Tensor:
    """Node j's contiguous share of every sequence's pairs: (S, PAIRS // nodes, 2)."""
    if PAIRS % nodes:
        raise ValueError(f"{PAIRS} pairs do not split evenly over {nodes} nodes")
    per = PAIRS // nodes
    return pairs[:, j * per : (j + 1) * per]


def query_owner(b: Batch, nodes: int) -> torch.Tensor:
    """(S, PAIRS): the index of the node whose segment holds each query's pair."""
    owner = torch.empty(b.pairs.shape[0], KEYS, dtype=torch.long)
    for j in range(nodes):
        owner.scatter_(1, segment(b.pairs, nodes, j)[..., 0], j)
    return torch.gather(owner, 1, b.queries[..., 0])


def hits(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """(S, PAIRS) bool: which queries the logits answer correctly."""
    return logits.argmax(-1) == answers
