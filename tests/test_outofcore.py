"""Out-of-core training (fflnode.train.outofcore) and the Task API's block chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fflnode.errors import ConfigError
from fflnode.train.task import BlockChain, Stage, build_model, load_task, task_chain

TINY_TEXT = {"seq_len": 32, "batch_size": 4, "d_model": 32, "n_layers": 3, "d_state": 8}


def text_task(**options: object):
    return load_task("text", {**TINY_TEXT, **options}, Path("."))


def test_text_chain_gives_the_task_loss_bit_for_bit() -> None:
    loaded = text_task()
    model = build_model(loaded, 7)
    chain = task_chain(loaded, model)
    assert chain is not None
    assert [s.name for s in chain.stages] == [
        "embed",
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "readout",
    ]
    batch = next(iter(loaded.task.train_data(0, 1, 7)))
    assert torch.equal(chain.run_loss(batch), loaded.task.loss(model, batch))


def test_chain_that_misses_a_parameter_is_refused() -> None:
    loaded = text_task()
    model = build_model(loaded, 7)
    chain = task_chain(loaded, model)
    assert chain is not None
    partial = BlockChain(chain.stages[:-1], chain.model_input, chain.loss)
    with pytest.raises(ConfigError, match="readout.*belongs to no stage"):
        from fflnode.train.task import check_chain

        check_chain(partial, model, "test")


def test_chain_with_a_shared_parameter_is_refused() -> None:
    from fflnode.train.task import check_chain

    a = nn.Linear(2, 2)
    model = nn.Sequential(a, a)
    chain = BlockChain((Stage("0", a), Stage("1", model)), lambda b: b, lambda o, b: o.mean())
    with pytest.raises(ConfigError, match="shared by stages"):
        check_chain(chain, model, "test")
