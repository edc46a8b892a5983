"""How far a node's weights were from the merged mean: the consensus distance.

||theta_i - theta_mean|| / ||theta_mean|| over the whole flat vector, read piece by piece
from the node's premerge file and the merged file (both canonical flat float32 files,
fflnode.prism.reader), summed in float64: bounded memory whatever the model size. 0 when
every node held the same weights before the merge (the complete graph's exact
averaging), larger when the merge had something to average (gossip, long local runs).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fflnode.prism.reader import SafetensorsFile
from fflnode.tensors import FlatLayout

PIECE_ELEMS = 1 << 20  # 4 MiB of float32 per read of each file


def consensus_distance(premerge: Path, merged: Path, layout: FlatLayout) -> float:
    diff2 = norm2 = 0.0
    with SafetensorsFile(premerge) as mine, SafetensorsFile(merged) as mean:
        for lo in range(0, layout.numel, PIECE_ELEMS):
            hi = min(lo + PIECE_ELEMS, layout.numel)
            a = mine.read_flat(lo, hi).astype(np.float64)
            m = mean.read_flat(lo, hi).astype(np.float64)
            diff2 += float(np.dot(a - m, a - m))
            norm2 += float(np.dot(m, m))
    return math.sqrt(diff2) / math.sqrt(norm2) if norm2 > 0 else math.sqrt(diff2)
