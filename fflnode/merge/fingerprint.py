"""Weight fingerprints and the outlier rule applied before the exact merge.

Theory of operation. The exact merge averages every participant's weights, so one
participant with poisoned weights poisons everyone's result. Before it, each member
announces a fingerprint of its premerge weights with its merge proposal: the shift-fold
count sketch (fflnode.sketch.countsketch) of the flat vector, FINGERPRINT_ROWS rows of
FINGERPRINT_WIDTH buckets, seeded by the run seed alone so every member projects with
the same matrix P. P is linear and preserves distances (JL: ‖Px − Py‖ ≈ ‖x − y‖ within
a few percent at this size), so distances between fingerprints stand for distances
between weights, for 4 KiB per member instead of the model.

The rule, applied by every member to the same inputs (the agreed proposal and the
fingerprints that came with it), so every honest member excludes the same peers:
  1. a fingerprint that is missing, of the wrong size or not finite is an outlier;
  2. center m = coordinate-wise median of the finite fingerprints (float64);
  3. d_i = ‖f_i − m‖; spread s = median of the d_i;
  4. i is an outlier when d_i > OUTLIER_SPREAD × s + OUTLIER_RELATIVE × ‖m‖.
  5. at most ⌈n/2⌉ − 1 members are excluded (the largest d_i first): the median rule
     means nothing without an honest majority, and then it must not shrink below one.
After exact averaging honest members hold identical weights (d = 0, s = 0), so the
relative term sets the tolerance; after sparse gossip they differ by the consensus gap,
which the spread term absorbs.

Limits (said plainly): a member may announce the fingerprint of honest weights and serve
poisoned ones; nothing here binds the two (the premerge pieces are not checked against
the fingerprint). Float determinism: numpy medians and norms on identical inputs give
identical results on one platform; a peer on another platform could disagree only for a
distance within rounding of the threshold.

Sans-IO: numpy and torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fflnode.sketch.countsketch import ShiftFoldSketch
from fflnode.sketch.rng import ChunkSeed

FINGERPRINT_WIDTH = 256  # buckets per row
FINGERPRINT_ROWS = 4  # x 256 = 1024 float32 values = 4 KiB per member, JL error ~ 5 %
FINGERPRINT_ROUND = 0x7FFF_FFF0  # a round no training round uses: its own randomness
# Distance beyond the members' typical distance that marks an outlier: 4x the median
# distance to the center (honest spread) ...
OUTLIER_SPREAD = 4.0
# ... plus 10 % of the center's norm: a node whose weights differ from the consensus by
# a tenth of the weights' size is not the same model any more. Identical honest weights
# (exact averaging) leave only this term.
OUTLIER_RELATIVE = 0.10


def sketcher(seed: int) -> ShiftFoldSketch:
    return ShiftFoldSketch(
        FINGERPRINT_WIDTH, FINGERPRINT_ROWS, ChunkSeed(seed, FINGERPRINT_ROUND, 0)
    )


class Fingerprinter:
    """Accumulates the fingerprint of a flat vector fed piece by piece, at any offsets."""

    def __init__(self, seed: int) -> None:
        self.sketch = sketcher(seed)
        self.value = self.sketch.zeros()

    def add(self, piece: np.ndarray, offset: int) -> None:
        self.sketch.accumulate(self.value, torch.from_numpy(piece), offset)

    def to_bytes(self) -> bytes:
        return self.value.numpy().astype("<f4").tobytes()


def size_bytes(seed: int = 0) -> int:
    return 4 * sketcher(seed).size


@dataclass(frozen=True)
class Verdict:
    excluded: dict[str, str]  # member -> why
    distances: dict[str, float]
    threshold: float


def outliers(fingerprints: Mapping[str, bytes | None], expected_bytes: int) -> Verdict:
    """Apply the rule above to the members' fingerprints (member -> raw bytes)."""
    why: dict[str, str] = {}
    vecs: dict[str, np.ndarray] = {}
    for m in sorted(fingerprints):
        raw = fingerprints[m]
        if raw is None or len(raw) != expected_bytes:
            why[m] = "no fingerprint of the run's size"
            continue
        v = np.frombuffer(raw, dtype="<f4").astype(np.float64)
        if not np.isfinite(v).all():
            why[m] = "fingerprint is not finite"
            continue
        vecs[m] = v
    if not vecs:
        return Verdict(why, {}, 0.0)
    names = sorted(vecs)
    stack = np.stack([vecs[m] for m in names])
    center = np.median(stack, axis=0)
    dist = {m: float(np.linalg.norm(vecs[m] - center)) for m in names}
    spread = float(np.median(list(dist.values())))
    threshold = OUTLIER_SPREAD * spread + OUTLIER_RELATIVE * float(np.linalg.norm(center))
    budget = (len(fingerprints) + 1) // 2 - 1 - len(why)
    far = sorted((m for m in names if dist[m] > threshold), key=lambda m: (-dist[m], m))
    for m in far[: max(0, budget)]:
        why[m] = f"weights are an outlier: distance {dist[m]:.4g} > {threshold:.4g}"
    return Verdict(why, dist, threshold)
