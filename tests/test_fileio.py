"""Atomic writes leave the old file or the new one, never a torn one."""

from __future__ import annotations

from pathlib import Path

import pytest

from dermaclass.fileio import atomic_path, write_json, write_text


def test_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_no_silent_overwrite(tmp_path: Path) -> None:
    write_json(tmp_path / "b.json", {"x": 1})
    with pytest.raises(FileExistsError, match="b.json"):
        write_json(tmp_path / "b.json", {"x": 2}, overwrite=False)
    assert (tmp_path / "b.json").read_text().strip().endswith("}")
