"""The I/O benchmark's machine settings and its fio comparison (no fio or root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fflnode.prism.bench import (
    FIO_BEST,
    HUGEPAGES_FOR_FIO,
    faster_fio,
    fio_command,
    hugepages_needed,
    make_cold,
    ratio_lines,
    reserved_hugepages,
)


def _control(tmp_path: Path, value: int) -> Path:
    path = tmp_path / "nr_hugepages"
    path.write_text(f"{value}\n")
    return path


def test_hugepages_are_raised_for_the_block_and_restored_after_it(tmp_path: Path) -> None:
    control = _control(tmp_path, 3)
    with reserved_hugepages(32, control, free_pages=lambda: int(control.read_text())) as why:
        assert why is None
        assert control.read_text() == "32\n"
    assert control.read_text() == "3\n"


def test_hugepages_are_restored_when_the_block_fails(tmp_path: Path) -> None:
    control = _control(tmp_path, 0)
    with (
        pytest.raises(RuntimeError, match="boom"),
        reserved_hugepages(32, control, free_pages=lambda: int(control.read_text())),
    ):
        assert control.read_text() == "32\n"
        raise RuntimeError("boom")
    assert control.read_text() == "0\n"


def test_hugepages_are_restored_on_sigterm_turned_into_system_exit(tmp_path: Path) -> None:
    control = _control(tmp_path, 0)
    with (
        pytest.raises(SystemExit),
        reserved_hugepages(32, control, free_pages=lambda: int(control.read_text())),
    ):
        raise SystemExit(143)
    assert control.read_text() == "0\n"


def test_enough_free_hugepages_leave_the_setting_alone(tmp_path: Path) -> None:
    control = _control(tmp_path, 64)
    control.chmod(0o444)
    with reserved_hugepages(32, control, free_pages=lambda: 64) as why:
        assert why is None
    assert control.read_text() == "64\n"


class _ReadOnlyControl:
    """/proc/sys/vm/nr_hugepages as a non-root user sees it: readable, write refused."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.writes = 0

    def read_text(self) -> str:
        return f"{self.value}\n"

    def write_text(self, text: str) -> int:
        self.writes += 1
        raise PermissionError(13, "Permission denied")


def test_a_refused_write_says_what_to_run_and_changes_nothing() -> None:
    control = _ReadOnlyControl(0)
    with reserved_hugepages(32, control, free_pages=lambda: 0) as why:  # type: ignore[arg-type]
        assert why is not None
        assert "sysctl vm.nr_hugepages=32" in why and "Permission denied" in why
    assert control.writes == 1 and control.value == 0


def test_too_few_pages_after_raising_is_reported_and_restored(tmp_path: Path) -> None:
    control = _control(tmp_path, 0)
    with reserved_hugepages(32, control, free_pages=lambda: 5) as why:
        assert why is not None and "only 5" in why
    assert control.read_text() == "0\n"


def test_hugepages_needed_covers_fio_buffers_and_the_measured_floor() -> None:
    assert hugepages_needed(8) == HUGEPAGES_FOR_FIO
    assert hugepages_needed(128) == 64 + 1  # 128 MiB of buffers = 64 huge pages, + slack


def test_only_the_hugepage_variant_asks_fio_for_mmaphuge() -> None:
    plain = fio_command("/data/f", 5 << 20, 8, hugepages=False)
    huge = fio_command("/data/f", 5 << 20, 8, hugepages=True)
    assert "--iomem=mmaphuge" not in plain
    assert huge == [*plain, "--iomem=mmaphuge"]
    for flag in ("--ioengine=io_uring", "--direct=1", "--iodepth=8", f"--bs={1 << 20}"):
        assert flag in plain


def test_prism_is_compared_with_the_faster_fio_by_median() -> None:
    results = {
        "prism-io_uring": {"cold": [2.4, 2.6, 2.2], "warm": [], "rss": []},
        "fio": {"cold": [2.0, 2.5, 1.5], "warm": [], "rss": []},
        "fio-hugepage": {"cold": [2.2, 2.1, 2.3], "warm": [], "rss": []},
    }
    assert faster_fio(results, "cold") == "fio-hugepage"  # median 2.2 beats 2.0
    lines = {
        den: (ratio, paired)
        for den, ratio, paired in ratio_lines(results, "prism-io_uring", "cold")
    }
    assert set(lines) == {"fio", "fio-hugepage", FIO_BEST}
    assert lines[FIO_BEST][0] == pytest.approx(2.4 / 2.2)
    assert lines[FIO_BEST][1] == pytest.approx([2.4 / 2.2, 2.6 / 2.1, 2.2 / 2.3])


def test_without_fio_there_is_no_comparison() -> None:
    results = {"prism-io_uring": {"cold": [2.4], "warm": [], "rss": []}}
    assert faster_fio(results, "cold") is None
    assert ratio_lines(results, "prism-io_uring", "cold") == []


def test_make_cold_says_what_it_did(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    assert make_cold(path, drop_all=False).startswith("posix_fadvise(DONTNEED)")
