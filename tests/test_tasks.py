"""The Task API (issue 11): a user's model and data, loaded by reference, trained on real
testnets and merged exactly; loading errors are one line and exit 2; the daemon's
import graph holds no harness, plotting or scikit-learn."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fflnode.errors import ConfigError
from fflnode.train import task as taskmod
from tests.conftest import REPO, fflnode_cmd

TESTNET_TIMEOUT_S = 600  # 4 nodes on a loaded 2-core machine; ~40 s when quiet


def docs_example() -> str:
    """The complete example of docs/tasks.md, exactly as a reader would copy it."""
    text = (REPO / "docs" / "tasks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (code,) = [b for b in blocks if "class SpiralTask" in b]
    return code


def docs_command() -> list[str]:
    """The testnet command docs/tasks.md gives for the example, as arguments."""
    text = (REPO / "docs" / "tasks.md").read_text()
    start = text.index("Run it on four local nodes")
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S).group(1)
    words = block.replace("\\\n", " ").split()
    return words[words.index("testnet") :]


def run_testnet(args: list[str], out: Path, cwd: Path) -> dict:
    proc = subprocess.run(
        [*fflnode_cmd(*args), "--out", str(out), "--no-plot"],
        cwd=cwd, capture_output=True, text=True, timeout=TESTNET_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_the_docs_example_task_trains_on_four_nodes_and_merges_exactly(tmp_path: Path):
    """A task file outside the repository, written from docs/tasks.md alone."""
    (tmp_path / "my_task.py").write_text(docs_example())
    report = run_testnet(docs_command(), tmp_path / "net", cwd=tmp_path)
    merge = report["merge"]
    assert report["ok"] and merge["hashes_agree"] and merge["files_equal_reference"]
    assert len(merge["participants"]) == 4
    assert set(merge["merged_metrics"]) == {"accuracy", "loss"}
    assert merge["merged_metrics"]["accuracy"] > 0.5  # three classes: chance is 1/3
    assert report["centralized"]["metrics"]["accuracy"] > 0.5
    for node in report["nodes"].values():
        assert node["task"].endswith("my_task.py:SpiralTask")
        assert node["merged_metrics"] == pytest.approx(merge["merged_metrics"])


TINY_LLAMA_TASK = '''
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fflnode.train.tasks.text import TextTask


class TinyLlamaTask:
    """A tiny Hugging Face causal LM (tied embeddings, rotary buffers) on the text task's
    data, built from a config object: nothing is downloaded."""

    primary_metric = "loss"

    def __init__(self, seq_len=32, batch_size=8):
        self.text = TextTask(seq_len=seq_len, batch_size=batch_size)

    def build_model(self, seed):
        cfg = LlamaConfig(
            vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(cfg)

    def train_data(self, partition, nodes, seed):
        return self.text.train_data(partition, nodes, seed)

    def loss(self, model, batch):
        return model(input_ids=batch, labels=batch).loss

    @torch.no_grad()
    def evaluate(self, model):
        windows = self.text.heldout_windows()[:64]
        return {"loss": float(model(input_ids=windows, labels=windows).loss)}
'''


@pytest.mark.slow
def test_a_tiny_transformers_causal_lm_trains_on_four_nodes_and_merges_exactly(tmp_path: Path):
    pytest.importorskip("transformers", reason="transformers is a test dependency")
    (tmp_path / "llama_task.py").write_text(TINY_LLAMA_TASK)
    args = ["testnet", "--nodes", "4", "--rounds", "6", "--local-steps", "3",
            "--eval-every", "3", "--task", "llama_task.py:TinyLlamaTask"]  # fmt: skip
    report = run_testnet(args, tmp_path / "net", cwd=tmp_path)
    merge = report["merge"]
    assert report["ok"] and merge["hashes_agree"] and merge["files_equal_reference"]
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "net" / "node0" / "merged.safetensors"))
    assert "model.embed_tokens.weight" in merged and "lm_head.weight" not in merged  # tied: once
    assert not any("inv_freq" in name for name in merged)  # non-persistent buffers stay local
    assert merge["merged_metrics"]["loss"] < math.log(256)  # it learnt: better than uniform


# ----------------------------------------------------------------------- federation rules
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.norm = nn.BatchNorm1d(4)  # float persistent buffers + an int64 counter
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
        self.steps = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
        self.register_buffer("scratch", torch.zeros(5), persistent=False)


def test_federation_takes_trainable_floats_once_and_persistent_float_buffers():
    m = Mixed()
    assert [n for n, _ in taskmod.federated_parameters(m)] == [
        "embed.weight",
        "norm.bias",
        "norm.weight",
    ]
    assert [n for n, _ in taskmod.federated_buffers(m)] == ["norm.running_mean", "norm.running_var"]
    taskmod.check_federatable(m, "test")


def test_a_half_precision_model_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="float16.*float32"):
        taskmod.check_federatable(nn.Linear(2, 2).half(), "task 't'")


# ----------------------------------------------------------------------- loading errors
GOOD = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Good:
        def __init__(self, width=4):
            self.width = width
        def build_model(self, seed):
            return nn.Linear(2, self.width)
        def train_data(self, partition, nodes, seed):
            while True:
                yield torch.zeros(1, 2)
        def loss(self, model, batch):
            return model(batch).sum()
        def evaluate(self, model):
            return {"loss": 0.0}

    instance = Good()
    not_a_task = object()
    """
)


@pytest.mark.parametrize(
    "spec, options, words",
    [
        ("tasks.py:Good", {}, None),
        ("tasks.py:instance", {}, None),
        ("missing.py:Good", {}, ["missing.py", "no such file"]),
        ("tasks.py:Absent", {}, ["tasks.py", "no attribute 'Absent'"]),
        ("broken.py:Good", {}, ["broken.py", "ZeroDivisionError"]),
        ("no_such_module_xyz:Good", {}, ["no_such_module_xyz", "cannot import"]),
        ("tasks.py:Good", {"depth": 3}, ["tasks.py", "depth", "it takes: width"]),
        ("tasks.py:not_a_task", {}, ["tasks.py", "not a Task", "build_model"]),
        ("nonsense", {}, ["nonsense", "built-in"]),
    ],
)
def test_loading_errors_are_one_line_naming_the_spec_and_the_file(tmp_path, spec, options, words):
    (tmp_path / "tasks.py").write_text(GOOD)
    (tmp_path / "broken.py").write_text("1 / 0\n")
    if words is None:
        loaded = taskmod.load_task(spec, options, tmp_path)
        assert loaded.trains and str(tmp_path / "tasks.py") == loaded.source
        return
    with pytest.raises(ConfigError) as info:
        taskmod.load_task(spec, options, tmp_path)
    text = str(info.value)
    assert "\n" not in text and spec in text
    for w in words:
        assert w in text, text


def write_node_config(tmp_path: Path, task: str, extra: str = "") -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\ndata_dir = "data"\nlisten = ["/ip4/127.0.0.1/tcp/0"]\n'
        f'[run]\nrun_id = "t"\nseed = 1\nnodes = 2\nrounds = 1\n'
        f'[train]\ntask = "{task}"\n{extra}'
    )
    return cfg


def test_the_daemon_exits_2_with_one_line_for_a_task_that_does_not_load(tmp_path: Path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('the task file is broken')\n")
    cfg = write_node_config(tmp_path, "broken.py:Task")
    proc = subprocess.run(
        fflnode_cmd("run", "--config", str(cfg)), cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fflnode:")]
    assert len(lines) == 1 and "broken.py" in lines[0] and "the task file is broken" in lines[0]
    assert "Traceback" not in proc.stderr


def test_fflnode_run_imports_no_harness_plotting_or_scikit_learn(tmp_path: Path):
    """Everything `fflnode run` loads before its event loop: the daemon, the node, the
    composition of a digits node. The harness, matplotlib and scikit-learn stay out."""
    cfg = write_node_config(tmp_path, "digits")
    probe = textwrap.dedent(
        f"""
        import sys
        from fflnode import cli, config, daemon, node
        from fflnode.compose import compose
        compose(config.load({str(cfg)!r}))
        bad = sorted(m for m in sys.modules
                     if m.split(".")[0] in ("matplotlib", "sklearn", "fflnode_harness"))
        print("BAD", bad)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BAD []" in proc.stdout, proc.stdout


def test_the_data_parallel_baseline_steps_on_the_mean_gradient_of_one_batch_per_node():
    """`train_centralized(..., steps, batches_per_step=N)` is N-worker synchronous
    data-parallel training: each Adam step on the mean of N consecutive batches'
    gradients. Checked against per-batch gradients averaged by hand."""
    from fflnode.train.task import build_model, federated_parameters, load_task
    from fflnode.train.trainer import CENTRAL_LR, TrainSettings, train_centralized

    loaded = load_task("digits", {}, REPO)
    settings = TrainSettings(
        seed=5, local_steps=1, inner_lr=0.1, outer_lr=1.0, outer_momentum=0.0,
        lr_schedule="constant",
    )  # fmt: skip
    _, model = train_centralized(loaded, settings, 1, 3)

    ref = build_model(loaded, settings.seed)
    params = [p for _, p in federated_parameters(ref)]
    batches = loaded.task.train_data(0, 1, settings.seed)
    grads = []
    for _ in range(3):
        ref.zero_grad(set_to_none=True)
        loaded.task.loss(ref, next(batches)).backward()
        grads.append([p.grad.clone() for p in params])
    for p, *gs in zip(params, *grads, strict=True):
        p.grad = sum(gs) / 3
    lr = float(getattr(loaded.task, "baseline_lr", CENTRAL_LR))
    torch.optim.Adam(params, lr=lr).step()
    # Adam's first step is about lr * sign(g): a gradient near zero, summed in another
    # order, moves its coordinate by a fraction of lr, so that is the tolerance.
    atol = 1e-2 * lr
    got = [p for _, p in federated_parameters(model)]
    for a, b in zip(got, params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    # One batch's step is another model: the N batches are really in the step.
    _, one = train_centralized(loaded, settings, 1, 1)
    pairs = zip(federated_parameters(one), got, strict=True)
    apart = max(float((a - b).detach().abs().max()) for (_, a), b in pairs)
    assert apart > 10 * atol
