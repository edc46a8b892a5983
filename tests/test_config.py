"""Config: strict validation, one-line errors naming file and key, exit code 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fflnode import config
from fflnode.errors import ConfigError
from tests.conftest import REPO, fflnode_cmd

GOOD = """
[node]
data_dir = "data"
[run]
run_id = "r1"
seed = 1
nodes = 2
rounds = 3
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_good_config_loads_with_defaults(tmp_path: Path):
    cfg = config.load(write(tmp_path, GOOD))
    assert cfg.run.nodes == 2 and cfg.exchange.codec == "none"
    assert cfg.data_dir == (tmp_path / "data").resolve()


@pytest.mark.parametrize(
    "edit, key",
    [
        (GOOD + "[train]\nlocal_stpes = 3\n", "train.local_stpes"),
        (GOOD.replace("seed = 1", 'seed = "1"'), "run.seed"),
        (GOOD.replace("seed = 1\n", ""), "run.seed"),
        (GOOD.replace("nodes = 2", "nodes = 0"), "run.nodes"),
        (GOOD + "[exchange]\ncodec = 3\n", "exchange.codec"),
        (GOOD.replace("[run]", "oops = 1\n[run]"), "node.oops"),
        (GOOD + "[train]\npartition_index = 5\n", "train.partition_index"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, edit: str, key: str):
    path = write(tmp_path, edit)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    text = str(info.value)
    assert key in text and str(path) in text and "\n" not in text


def test_daemon_reports_bad_config_in_one_line_with_exit_2(tmp_path: Path):
    path = write(tmp_path, GOOD.replace("rounds = 3", "rounds = 'three'"))
    proc = subprocess.run(
        fflnode_cmd("run", "--config", str(path)),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "run.rounds" in lines[0] and "Traceback" not in proc.stderr
    missing = subprocess.run(
        fflnode_cmd("run", "--config", str(tmp_path / "absent.toml")),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert missing.returncode == 2 and "cannot read config" in missing.stderr


def test_to_toml_round_trips(tmp_path: Path):
    cfg = config.load(write(tmp_path, GOOD))
    again = config.load(write(tmp_path, config.to_toml(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "exchange, words",
    [
        ('codec = "sketch"', ["sketch", "does not train", "holo"]),
        ('robust = "mad-mean"\nscheme = "reduce-scatter"', ["reduce-scatter", "robust"]),
        ('codec = "holo"', ["outer_optimizer 'adam'", "does not train", "DiLoCo", "local_steps"]),
        ('codec = "topk"', ["outer_optimizer 'adam'", "DiLoCo"]),
    ],
)
def test_recipes_known_to_fail_are_refused_with_what_to_use(tmp_path, exchange, words):
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, GOOD + f"[exchange]\n{exchange}\n"))
    for w in words:
        assert w in str(info.value), str(info.value)


def test_the_task_table_is_free_form_but_flat(tmp_path):
    cfg = config.load(write(tmp_path, GOOD + '[task]\nalpha = 5\nmodel = "gru"\n'))
    assert cfg.task == {"alpha": 5, "model": "gru"}
    with pytest.raises(ConfigError, match="nested tables"):
        config.load(write(tmp_path, GOOD + "[task]\n[task.inner]\nx = 1\n"))
