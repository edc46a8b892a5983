"""A Byzantine node, for resilience tests only: what a corrupt peer sends.

Enabled by `[adversary] mode` (the testnet's `--corrupt K`). The node trains and follows
the protocol like any other, but the Delta it publishes each round and the premerge
weights it offers the final merge are replaced:

    signflip   -SIGNFLIP_SCALE × the honest value (the classic "reverse gradient" attack)
    nan        every value NaN (receivers' decoders must reject it)
    random     Gaussian noise at RANDOM_SCALE × the honest value's RMS

It is honest about what it holds: its own mix uses the same corrupted estimate its peers
receive, so it stays in consensus with them and the damage is the attack's, not a
desynchronisation's. Sans-IO, torch only.
"""

from __future__ import annotations

import torch

SIGNFLIP_SCALE = 10.0  # the "sign-flipped x10"
RANDOM_SCALE = 10.0  # noise 10x the honest update's RMS: large, but finite
MODES = ("none", "signflip", "nan", "random")


class Adversary:
    def __init__(self, mode: str, seed: int) -> None:
        if mode not in MODES:
            raise ValueError(f"adversary mode {mode!r} is not one of {MODES}")
        self.mode = mode
        self._gen = torch.Generator().manual_seed(seed)  # local noise: no peer regenerates it

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """The corrupted version of `x` (a new tensor; `x` is left alone)."""
        if self.mode == "signflip":
            return x * -SIGNFLIP_SCALE
        if self.mode == "nan":
            return torch.full_like(x, float("nan"))
        if self.mode == "random":
            rms = float(x.float().pow(2).mean().sqrt()) if x.numel() else 0.0
            noise = torch.randn(x.shape, generator=self._gen, dtype=torch.float32)
            return (noise * (RANDOM_SCALE * max(rms, 1e-8))).to(x.dtype)
        return x.clone()
