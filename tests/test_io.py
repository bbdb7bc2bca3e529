"""laco.io.atomic_write_text: the one atomic writer of result files."""

import os
import stat

import pytest

from laco.io import atomic_write_text


def test_writes_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # readable by others, unlike mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.md"
    atomic_write_text(path, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.md"]
