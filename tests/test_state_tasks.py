"""The state capability of the built-in tasks: contexts, folds, conditioned evaluation."""

from __future__ import annotations

import pytest
import torch

from fflnode.ssm.states import relative_error, stack_layers, unstack_layers
from fflnode.train.task import BUILTIN_TASKS, Responder, StateTask, build_model, load_task
from fflnode.train.tasks.mqar import MqarTask
from fflnode.train.tasks.text import TextTask, documents, split_document

SEED = 3


def test_mqar_and_text_have_the_capability_and_digits_does_not(tmp_path):
    assert "mqar" in BUILTIN_TASKS
    for name, capable in (("mqar", True), ("text", True), ("digits", False)):
        loaded = load_task(name, {}, tmp_path)
        assert loaded.federates_states is capable
        assert isinstance(loaded.task, Responder) is capable


def test_mqar_shares_split_every_sequence_and_join_back_in_partition_order():
    task = MqarTask(contexts=8)
    shares = [task.local_contexts(j, 4, SEED, 0) for j in range(4)]
    whole = task.epoch_batch(SEED, 0).pairs
    for c in range(8):
        assert torch.equal(torch.cat([s[c] for s in shares]), whole[c])
    assert not torch.equal(task.epoch_batch(SEED, 1).pairs, whole)  # a new epoch, new facts


def test_a_text_context_is_the_end_of_a_documents_training_part_read_by_its_holder():
    task = TextTask(seq_len=32, d_model=16, n_layers=1, d_state=4, state_bytes=64)
    model = build_model(load_task("text", {"seq_len": 32, "d_model": 16, "n_layers": 1,
                                           "d_state": 4}, None), SEED).eval()  # fmt: skip
    assert isinstance(task, StateTask)
    mine = task.local_contexts(0, 4, SEED, 0)
    assert sorted(mine) == task.node_documents(0, 4, SEED)
    d = next(iter(mine))
    assert bytes(mine[d].tolist()) == split_document(documents()[d][1])[0][-64:]
    folded = task.fold(model, list(mine.values()))
    assert folded[0].h.shape == (len(mine), *model.state_spec()[0])
    # a fold is a reading: the state of [body] then the tail's logits = one pass over both
    body, tail = mine[d], torch.arange(10) + 40
    (one,) = [unstack_layers(task.fold(model, [body]))[0]]
    with torch.no_grad():
        split = model.forward_with_states(tail[None], stack_layers([one]))[0]
        whole = model(torch.cat([body, tail])[None])[:, -10:]
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4)
    assert relative_error(one[0], unstack_layers(folded)[list(mine).index(d)][0]) < 1e-6


def test_text_states_change_the_loss_of_their_own_documents_only():
    task = TextTask(seq_len=32, d_model=16, n_layers=1, d_state=4)
    model = build_model(load_task("text", {"seq_len": 32, "d_model": 16, "n_layers": 1,
                                           "d_state": 4}, None), SEED).eval()  # fmt: skip
    theirs = task.local_contexts(1, 4, SEED, 0)
    states = dict(zip(theirs, unstack_layers(task.fold(model, list(theirs.values()))),
                      strict=True))  # fmt: skip
    foreign_docs = [d for d in range(len(documents())) if d not in task.node_documents(0, 4, SEED)]
    none = task.evaluate_states(model, {}, 0, 4, SEED, 0)
    # no state: the plain model on the first seq_len + 1 bytes of each foreign held-out part
    windows, owners = task.continuation_windows(foreign_docs)
    assert set(owners) <= set(foreign_docs) and len(owners) > 10
    assert bytes(windows[0].tolist()) == split_document(documents()[owners[0]][1])[1][:33]
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(
            model(windows[:, :-1]).reshape(-1, 256), windows[:, 1:].reshape(-1)
        )
    assert none["loss"] == pytest.approx(float(plain), rel=1e-5)
    assert task.evaluate_states(model, states, 0, 4, SEED, 0)["loss"] != none["loss"]
    own = task.local_contexts(0, 4, SEED, 0)
    own_states = dict(zip(own, unstack_layers(task.fold(model, list(own.values()))), strict=True))
    assert task.evaluate_states(model, own_states, 0, 4, SEED, 0) == none  # not foreign
    text = task.respond(model, states[next(iter(theirs))], "The ", next(iter(theirs)), SEED, 0)
    assert isinstance(text, str) and len(text) > 0
