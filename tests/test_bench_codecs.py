"""tools/bench_codecs.py end to end on a tiny run: every codec spends its budget."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import bench_codecs  # noqa: E402


def _table(lines: list[str], header_start: str) -> list[list[str]]:
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_every_codec_spends_at_most_its_budget_and_the_jl_row_is_explanatory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--rounds", "3", "--steps", "2", "--seeds", "1", "--repeats", "1"]
    assert bench_codecs.main([*argv, "--gaussian-log2", "14", "--no-hivemind"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = _table(lines, "| budget | codec | source |")
    codecs = {row[1] for row in rows}
    for name in ("holo", "QSGD", "PowerSGD", "top-k", "sign + scale", "uniform quantization"):
        assert name in codecs
    measured = 0
    for row in rows:
        budget = int(row[0])
        for cell in (row[4], row[7]):  # deltas and Gaussian bits/coord
            if cell != "n/a":
                assert float(cell) <= bench_codecs.OVERSHOOT * budget, row
                measured += 1
    assert measured >= 2 * len(rows) - 2  # only PowerSGD at 1 bit on the deltas is n/a
    ef_rows = _table(lines, "| budget | codec | parameters | biased |")
    assert {row[5] for row in ef_rows} == {"", "yes"}
    explanatory = _table(lines, "| what |")
    assert "explanatory" in explanatory[0][0] and "JL" in explanatory[0][0]
