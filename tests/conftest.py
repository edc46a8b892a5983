"""Shared test setup: one torch thread (the suite shares 2 cores), small helpers."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def fflnode_cmd(*args: str) -> list[str]:
    return [PYTHON, "-m", "fflnode", *args]


@pytest.fixture
def notify_socket(tmp_path_factory: pytest.TempPathFactory):
    """A bound AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""
    path = Path(tmp_path_factory.mktemp("n", numbered=True)) / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(30)
    yield str(path), s
    s.close()
