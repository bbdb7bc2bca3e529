"""laco.io: the one place for atomic file and directory writes."""

import os
import stat

import pytest

from laco.io import atomic_dir, atomic_write, atomic_write_text, publish_dir, replace_dir


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


def test_atomic_write_calls_the_writer_on_a_temporary_with_the_suffix(tmp_path):
    path, seen = tmp_path / "plot.png", []

    def write(tmp):
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and not path.exists()
        tmp.write_bytes(b"png")

    atomic_write(path, write, suffix=".png")
    assert path.read_bytes() == b"png" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    with pytest.raises(RuntimeError):
        atomic_write(path, lambda tmp: (tmp.write_bytes(b"half"), (_ for _ in ()).throw(RuntimeError("x"))))
    assert path.read_bytes() == b"png" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def _folder(path, text):
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_replace_dir_swaps_a_whole_directory(tmp_path):
    final = tmp_path / "model"
    replace_dir(_folder(tmp_path / "a", "one"), final)
    replace_dir(_folder(tmp_path / "b", "two"), final)
    assert (final / "f.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_publish_dir_keeps_the_first_finished_cache(tmp_path):
    final = tmp_path / "cache" / "entry"
    assert publish_dir(_folder(tmp_path / "mine", "first"), final)
    assert not publish_dir(_folder(tmp_path / "theirs", "second"), final)
    assert (final / "f.txt").read_text() == "first" and not (tmp_path / "theirs").exists()


def test_atomic_dir_appears_complete_or_not_at_all(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "w").write_text("1")
        assert not final.exists()
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "w").write_text("2")
            raise KeyboardInterrupt
    assert (final / "w").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
