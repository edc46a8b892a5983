"""The SSD model: registered as "ssd", deterministic from the seed, trains, carries states."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fflnode.ssm.model import SSDConfig, SSDModel
from fflnode.ssm.states import from_wire, to_wire
from fflnode.train.data import NUM_CLASSES, SEQUENCE_LENGTH, digits_splits
from fflnode.train.model import build_model

torch.set_num_threads(1)

TRAIN_STEPS = 60  # a clear drop (>30 %) on one fixed batch for the 17k-param default; ~2 s


def test_ssd_is_registered_and_built_identically_from_the_seed() -> None:
    a, b = build_model("ssd", seed=3), build_model("ssd", seed=3)
    c = build_model("ssd", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert all(t.dtype == torch.float32 for t in sa.values())
    n_params = sum(p.numel() for p in a.parameters())
    assert 10_000 <= n_params <= 100_000  # "tens of thousands of parameters"
    with torch.no_grad():
        logits = a(torch.rand(3, SEQUENCE_LENGTH, 1))
    assert logits.shape == (3, NUM_CLASSES)


def test_ssd_classifier_loss_decreases_on_sequential_digits() -> None:
    train, _ = digits_splits()
    model = build_model("ssd", seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    idx = torch.as_tensor(np.random.Generator(np.random.PCG64(0)).integers(0, len(train), 64))
    x, y = train.x[idx], train.y[idx]
    with torch.no_grad():
        first = F.cross_entropy(model(x), y).item()
    for _ in range(TRAIN_STEPS):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = F.cross_entropy(model(x), y).item()
    assert last < 0.7 * first, (first, last)


def token_model(seed: int, layers: int = 3) -> SSDModel:
    torch.manual_seed(seed)
    cfg = SSDConfig(
        vocab_sizes=(20, 5),
        d_model=16,
        n_layers=layers,
        d_state=8,
        headdim=8,
        chunk_size=8,
        n_outputs=20,
        readout="sequence",
    )
    return SSDModel(cfg).eval()


def test_model_run_in_pieces_with_carried_states_equals_the_whole_run() -> None:
    model = token_model(0)
    g = torch.Generator().manual_seed(1)
    x = torch.stack(
        [torch.randint(0, 20, (2, 37), generator=g), torch.randint(0, 5, (2, 37), generator=g)], -1
    )
    with torch.no_grad():
        whole, states = model.forward_with_states(x)
        first, s1 = model.forward_with_states(x[:, :12])
        second, s2 = model.forward_with_states(x[:, 12:], s1)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(s2, states, strict=True):
        torch.testing.assert_close(a.h, b.h, rtol=1e-5, atol=1e-5)


def test_model_states_match_its_state_spec_and_survive_the_wire() -> None:
    model = token_model(2, layers=2)
    with torch.no_grad():
        _, states = model.forward_with_states(torch.randint(0, 5, (1, 9, 2)))
    unbatched = tuple(type(s)(s.h[0], s.log_decay[0]) for s in states)
    back = from_wire(to_wire(unbatched), model.state_spec())
    assert all(torch.equal(a.h, b.h) for a, b in zip(back, unbatched, strict=True))
