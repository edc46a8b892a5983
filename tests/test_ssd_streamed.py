"""Layer-streamed inference equals the in-memory forward and respects its memory plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fflnode.errors import ConfigError, FormatError
from fflnode.prism.writer import save_tensors
from fflnode.ssm.model import CONFIG_METADATA_KEY, SSDConfig, SSDModel
from fflnode.ssm.streamed import (
    SafetensorsWeightSource,
    load_in_memory,
    plan_stream,
    save_for_streaming,
    streamed_forward,
)

torch.set_num_threads(1)

BUDGET = 128 << 20  # ample for these toy models (48 MiB of it is the runtime allowance)


def saved_model(tmp_path: Path, readout: str, layers: int = 3) -> tuple[SSDModel, Path]:
    torch.manual_seed(0)
    cfg = SSDConfig(
        vocab_sizes=(40,),
        d_model=32,
        n_layers=layers,
        d_state=8,
        headdim=8,
        chunk_size=8,
        n_outputs=7,
        readout=readout,
    )
    model = SSDModel(cfg).eval()
    path = tmp_path / "model.safetensors"
    save_for_streaming(model, path)
    return model, path


@pytest.mark.parametrize("readout", ["sequence", "last"])
def test_streamed_forward_equals_in_memory_forward_bit_for_bit(
    tmp_path: Path, readout: str
) -> None:
    model, path = saved_model(tmp_path, readout)
    x = torch.randint(0, 40, (6, 29))
    with torch.no_grad():
        ref, ref_states = model.forward_with_states(x)
    with SafetensorsWeightSource(path) as source:
        result = streamed_forward(source, x, BUDGET, keep_states=True)
    assert result.plan.micro_batch == 6 and result.plan.total_bytes <= BUDGET
    assert torch.equal(result.outputs, ref)
    assert result.states is not None
    for a, b in zip(result.states, ref_states, strict=True):
        assert torch.equal(a.h, b.h) and torch.equal(a.log_decay, b.log_decay)


@pytest.mark.parametrize("micro_batch", [1, 4])
def test_streamed_forward_in_micro_batches_matches_in_memory(
    tmp_path: Path, micro_batch: int
) -> None:
    model, path = saved_model(tmp_path, "sequence")
    x = torch.randint(0, 40, (6, 29))
    with torch.no_grad():
        ref = model(x)
    with SafetensorsWeightSource(path) as source:
        result = streamed_forward(source, x, BUDGET, micro_batch=micro_batch)
    torch.testing.assert_close(result.outputs, ref, rtol=1e-5, atol=1e-6)


def test_the_planner_shrinks_the_micro_batch_to_the_budget_and_refuses_too_small(
    tmp_path: Path,
) -> None:
    model, path = saved_model(tmp_path, "last")
    x = torch.randint(0, 40, (64, 256))
    with SafetensorsWeightSource(path) as source:
        shapes, cfg = source.shapes(), model.cfg
        one = plan_stream(cfg, shapes, 64, 256, BUDGET, input_bytes=x.numel() * 8, micro_batch=1)
        per_seq = one.working_bytes
        base = one.total_bytes - per_seq  # everything but the micro-batch's intermediates
        tight_budget = base + 3 * per_seq + per_seq // 2
        tight = streamed_forward(source, x, tight_budget)
        assert tight.plan.micro_batch == 3 and tight.plan.total_bytes <= tight_budget
        with torch.no_grad():
            torch.testing.assert_close(tight.outputs, model(x), rtol=1e-5, atol=1e-6)
        with pytest.raises(ConfigError):
            streamed_forward(source, x, base + per_seq // 2)


def test_in_memory_loader_reads_the_same_model(tmp_path: Path) -> None:
    model, path = saved_model(tmp_path, "last", layers=2)
    with SafetensorsWeightSource(path) as source:
        loaded = load_in_memory(source)
    x = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_weight_files_that_do_not_match_their_config_are_rejected(tmp_path: Path) -> None:
    model, _ = saved_model(tmp_path, "last", layers=2)
    tensors = dict(model.state_dict())
    meta = {CONFIG_METADATA_KEY: model.cfg.to_json()}
    cases = {
        "missing": {k: v for k, v in tensors.items() if k != "blocks.1.mixer.D"},
        "extra": {**tensors, "blocks.2.mixer.D": tensors["blocks.1.mixer.D"]},
        "reshaped": {**tensors, "blocks.0.mixer.D": torch.zeros(3)},
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        save_tensors(bad, content, meta)
        with SafetensorsWeightSource(bad) as source, pytest.raises(FormatError):
            streamed_forward(source, torch.zeros(1, 4, dtype=torch.long), BUDGET)
    half = tmp_path / "half.safetensors"
    save_tensors(half, {k: v.half() for k, v in tensors.items()}, meta)
    with pytest.raises(FormatError):
        SafetensorsWeightSource(half)
    no_meta = tmp_path / "no_meta.safetensors"
    save_tensors(no_meta, tensors)
    with SafetensorsWeightSource(no_meta) as source, pytest.raises(FormatError):
        streamed_forward(source, torch.zeros(1, 4, dtype=torch.long), BUDGET)
