"""The files we ship in configs/ are valid: the example config and the systemd unit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fflnode import config
from tests.conftest import PYTHON, REPO

REQUIRED_UNIT_LINES = [
    "Type=notify",
    "WatchdogSec=",
    "Restart=on-failure",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ReadWritePaths=/var/lib/fflnode",
    "PrivateTmp=yes",
    "User=fflnode",
]


def test_example_config_is_valid():
    cfg = config.load(REPO / "configs" / "node.toml")
    assert cfg.run.nodes >= 1 and cfg.node.data_dir == "/var/lib/fflnode"


def test_unit_has_the_required_settings():
    unit = (REPO / "configs" / "fflnode.service").read_text()
    for line in REQUIRED_UNIT_LINES:
        assert any(ln.startswith(line) for ln in unit.splitlines()), line


def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit's syntax was not verified")
    unit = (REPO / "configs" / "fflnode.service").read_text()
    fflnode = Path(PYTHON).parent / "fflnode"
    unit = unit.replace("/opt/fflnode/.venv/bin/fflnode", str(fflnode))
    path = tmp_path / "fflnode.service"
    path.write_text(unit)
    proc = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    problems = [ln for ln in proc.stderr.splitlines() if "fflnode.service" in ln]
    assert proc.returncode == 0 and not problems, proc.stderr
