"""Robust mixing and merge fingerprints: what one corrupt peer can and cannot do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fflnode import robust, wire
from fflnode.exchange import canonical_mean_of
from fflnode.merge import fingerprint
from fflnode.merge.fingerprint import Fingerprinter, outliers
from fflnode_harness.adversary import Adversary

N = 5
NUMEL = 4000


def honest(n: int = N - 1, numel: int = NUMEL, seed: int = 0) -> dict[bytes, torch.Tensor]:
    """Deltas that share a direction plus per-node noise (non-IID nodes agree roughly)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(numel, generator=g)
    return {bytes([i + 1]) * 4: common + 0.3 * torch.randn(numel, generator=g) for i in range(n)}


def with_attacker(mode: str, seed: int = 0) -> tuple[dict[bytes, torch.Tensor], torch.Tensor]:
    h = honest(seed=seed)
    target = canonical_mean_of(h)
    bad = Adversary(mode, 3).corrupt(h[bytes([1]) * 4])
    return {**h, b"\xff" * 4: bad}, target


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_trimmed_mean_matches_a_numpy_reference():
    xs = honest(N, 1000, seed=4)
    got = robust.trimmed_mean(xs, 1)
    stack = np.stack([xs[k].numpy().astype(np.float64) for k in sorted(xs)])
    ref = np.sort(stack, axis=0)[1:-1].mean(axis=0).astype(np.float32)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-7)


def test_trimmed_mean_blocks_agree_with_one_block(monkeypatch):
    xs = honest(N, 3 * 1000 + 7, seed=5)
    whole = robust.trimmed_mean(xs, 1)
    monkeypatch.setattr(robust, "BLOCK_ELEMS", 1000)
    assert torch.equal(robust.trimmed_mean(xs, 1), whole)


@pytest.mark.parametrize("mix", ["trimmed", "clip"])
def test_robust_mix_is_bit_identical_whatever_the_arrival_order(mix):
    xs, _ = with_attacker("signflip")
    keys = list(xs)
    shuffled = {k: xs[k] for k in reversed(keys)}
    f = (
        (lambda d: robust.trimmed_mean(d, 1))
        if mix == "trimmed"
        else (lambda d: robust.centered_clip(d, None)[0])
    )
    assert torch.equal(f(xs), f(shuffled))


@pytest.mark.parametrize("mode", ["signflip", "random"])
def test_one_corrupt_peer_moves_the_mean_far_but_not_the_robust_mixes(mode):
    xs, target = with_attacker(mode)
    assert rel(canonical_mean_of(xs), target) > 1.0  # the attack works on the plain mean
    assert rel(robust.trimmed_mean(xs, 1), target) < 0.15
    clipped, tau = robust.centered_clip(xs, None)
    assert tau > 0 and rel(clipped, target) < 0.25


def test_robust_mixes_stay_near_the_mean_without_attack():
    xs = honest(N)
    target = canonical_mean_of(xs)
    assert rel(robust.trimmed_mean(xs, 1), target) < 0.1
    assert rel(robust.centered_clip(xs, None)[0], target) < 0.1


def test_trimmed_mean_with_too_few_inputs_falls_back_to_the_median():
    xs = honest(2, 10)
    got = robust.trimmed_mean(xs, 1)  # n = 2 <= 2 * trim: trim shrinks to 0
    assert torch.allclose(got, canonical_mean_of(xs))
    with pytest.raises(ValueError):
        robust.trimmed_mean({}, 1)


# --------------------------------------------------------------------- fingerprints
SEED = 11


def fp_of(x: torch.Tensor, piece: int = 997) -> bytes:
    f = Fingerprinter(SEED)
    v = x.numpy()
    for lo in range(0, v.size, piece):  # streamed in pieces, as the merge reads them
        f.add(v[lo : lo + piece], lo)
    return f.to_bytes()


def test_fingerprint_is_linear_in_pieces_and_preserves_distances():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(50_000, generator=g), torch.randn(50_000, generator=g)
    assert fp_of(x, 997) != b""
    a = np.frombuffer(fp_of(x, 997), "<f4")
    b = np.frombuffer(fp_of(x, 50_000), "<f4")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    d_sketch = np.linalg.norm(a - np.frombuffer(fp_of(y), "<f4"))
    d_true = float((x - y).norm())
    assert abs(d_sketch / d_true - 1) < 0.25  # JL at k ~ 1000: typically a few percent


def members_with(corrupt: str | None, noise: float = 0.0) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(9)
    w = torch.randn(20_000, generator=g)
    out = {f"peer{i}": fp_of(w + noise * torch.randn(20_000, generator=g)) for i in range(4)}
    if corrupt is not None:
        out["peer9"] = fp_of(Adversary(corrupt, 1).corrupt(w))
    return out


@pytest.mark.parametrize("mode", ["signflip", "nan", "random"])
def test_outlier_rule_excludes_a_corrupt_member(mode):
    fps = members_with(mode)
    verdict = outliers(fps, fingerprint.size_bytes(SEED))
    assert set(verdict.excluded) == {"peer9"}
    assert verdict.excluded == outliers(dict(reversed(fps.items())), len(fps["peer0"])).excluded


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_outlier_rule_keeps_honest_members(noise):
    # exact averaging leaves identical weights; sparse gossip leaves a small spread
    verdict = outliers(members_with(None, noise), fingerprint.size_bytes(SEED))
    assert verdict.excluded == {}


def test_outlier_rule_never_excludes_a_majority_and_flags_missing_ones():
    fps = members_with(None)
    g = torch.Generator().manual_seed(5)
    for i in range(3):  # 3 of 7 far apart from each other: at most 3 may go
        fps[f"far{i}"] = fp_of(100 * torch.randn(20_000, generator=g))
    verdict = outliers(fps, fingerprint.size_bytes(SEED))
    assert len(verdict.excluded) <= (len(fps) + 1) // 2 - 1
    fps["short"] = b"\x00" * 8
    fps["absent"] = None  # type: ignore[assignment]
    verdict = outliers(fps, fingerprint.size_bytes(SEED))
    assert "short" in verdict.excluded and "absent" in verdict.excluded


def test_merge_ready_carries_a_fingerprint_and_caps_it():
    fp = members_with(None)["peer0"]
    fields = dict(run="r", members=["a"], shards=1, stage="propose", fp=fp)
    msg = wire.decode(wire.encode("merge.ready", **fields), "peer", run="r")
    assert msg.fields["fp"] == fp
    too_big = dict(fields, fp=b"\x00" * (wire.MAX_FINGERPRINT_BYTES + 4))
    with pytest.raises(wire.WireError, match="max_bin_len"):  # refused before parsing
        wire.decode(wire.encode("merge.ready", **too_big), "peer", run="r")
    with pytest.raises(wire.WireError, match="fp"):
        wire.decode(wire.encode("merge.ready", **dict(fields, fp=b"\x00" * 5)), "peer", run="r")


def test_mad_mean_drops_the_attacker_and_keeps_every_honest_value():
    xs, target = with_attacker("signflip")
    assert rel(robust.mad_mean(xs), target) < 0.1
    # The trimmed mean also drops an honest extreme opposite the attacker: biased.
    assert rel(robust.mad_mean(xs), target) < rel(robust.trimmed_mean(xs, 1), target)
    honest_only = honest()
    assert rel(robust.mad_mean(honest_only), canonical_mean_of(honest_only)) < 0.1
    same = {k: torch.ones(10) for k in (b"a", b"b", b"c")}  # MAD 0: the median passes
    assert torch.equal(robust.mad_mean(same), torch.ones(10))
    shuffled = {k: xs[k] for k in reversed(list(xs))}
    assert torch.equal(robust.mad_mean(xs), robust.mad_mean(shuffled))
