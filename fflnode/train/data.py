"""Sequential digits: scikit-learn's bundled 8x8 handwritten digits read as 64-step sequences.

Owns the fixed 80/20 train/test split (independent of any run seed, so every node and
the centralized baseline evaluate on the same test set) and the non-IID partition of
the train split across nodes: a per-class Dirichlet(alpha) label split drawn from the
run seed with numpy's PCG64, which is reproducible on every platform.

The data file ships inside scikit-learn (datasets/data/digits.csv.gz, exactly what
`load_digits` returns); it is read directly, without importing scikit-learn, which
would cost a node ~150 MB of RSS (measured) for one CSV file.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fflnode.errors import ConfigError

# The test split is fixed forever: changing it would make figures across releases
# incomparable. 20 % of 1797 samples, stratified by label.
TEST_FRACTION = 0.2
SPLIT_SEED = 0
PIXEL_MAX = 16.0  # load_digits pixels are integers in [0, 16]
SEQUENCE_LENGTH = 64
NUM_CLASSES = 10
# A partition leaving a node with fewer samples than this is redrawn: a node with
# almost no data cannot take a single meaningful batch. Bounded redraws keep it total.
MIN_SAMPLES_PER_NODE = 16
MAX_PARTITION_DRAWS = 100


@dataclass(frozen=True)
class Split:
    """Inputs (n, 64, 1) float32 in [0, 1] and labels (n,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: np.ndarray) -> Split:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Split(self.x[idx], self.y[idx])


DIGITS_FILE = ("datasets", "data", "digits.csv.gz")  # inside the scikit-learn package
DIGITS_SHAPE = (1797, 65)  # 64 pixels and the label per row


def digits_file() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ConfigError("the digits data ships with scikit-learn: pip install scikit-learn")
    return Path(spec.origin).parent.joinpath(*DIGITS_FILE)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """A boolean test mask taking round(test_fraction * n_c) samples of every class c."""
    rng = np.random.Generator(np.random.PCG64(seed))
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[rng.permutation(idx)[: round(test_fraction * len(idx))]] = True
    return test


@lru_cache(maxsize=1)
def digits_splits() -> tuple[Split, Split]:
    """The fixed (train, test) splits of sequential digits."""
    with gzip.open(digits_file()) as f:
        table = np.loadtxt(f, delimiter=",")
    if table.shape != DIGITS_SHAPE:
        raise ConfigError(f"{digits_file()}: digits table of shape {table.shape}")
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    test = stratified_split(y, TEST_FRACTION, SPLIT_SEED)

    def to_split(mask: np.ndarray) -> Split:
        seq = torch.tensor(x[mask] / PIXEL_MAX, dtype=torch.float32)
        return Split(seq.reshape(-1, SEQUENCE_LENGTH, 1), torch.tensor(y[mask]))

    return to_split(~test), to_split(test)


def dirichlet_partition(
    labels: np.ndarray, num_parts: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Split sample indices across `num_parts` nodes, label proportions ~ Dirichlet(alpha).

    Deterministic in (labels, num_parts, alpha, seed); every index lands in exactly one
    part; each part gets at least MIN_SAMPLES_PER_NODE samples.
    """
    if num_parts < 1:
        raise ConfigError(f"data partition: need at least one part, got {num_parts}")
    if alpha <= 0:
        raise ConfigError(f"data partition: alpha must be > 0, got {alpha}")
    if num_parts * MIN_SAMPLES_PER_NODE > len(labels):
        raise ConfigError(
            f"data partition: {len(labels)} samples cannot give {num_parts} nodes "
            f"{MIN_SAMPLES_PER_NODE} samples each"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    classes = np.unique(labels)
    for _ in range(MAX_PARTITION_DRAWS):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            share = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_SAMPLES_PER_NODE:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        f"data partition: no Dirichlet(alpha={alpha}) draw in {MAX_PARTITION_DRAWS} gave "
        f"every one of {num_parts} nodes {MIN_SAMPLES_PER_NODE} samples; raise alpha"
    )


def node_train_split(part_index: int, num_parts: int, alpha: float, seed: int) -> Split:
    """The train samples of one node of the run."""
    if not 0 <= part_index < num_parts:
        raise ConfigError(f"data partition: partition_index {part_index} outside [0, {num_parts})")
    train, _ = digits_splits()
    parts = dirichlet_partition(train.y.numpy(), num_parts, alpha, seed)
    return train.subset(parts[part_index])
