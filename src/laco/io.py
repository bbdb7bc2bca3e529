"""Atomic file and directory writes: the one place in laco that writes through a temporary name and
``os.replace`` (results, plots, configs, checkpoints, caches, converted models).

* ``atomic_write_text(path, text)`` / ``atomic_write(path, write)``: a file appears whole or not at all.
* ``atomic_dir(final)``: build a directory under a temporary name, renamed into place when complete.
* ``replace_dir(tmp, final)``: move a finished directory over ``final`` (the old one is set aside first).
* ``publish_dir(tmp, final)``: move a finished cache directory into place unless another process already did.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

#: prefix of temporary names beside their final file or directory (``laco.train`` cleans them on start)
TMP_PREFIX = ".tmp-"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, suffix: str = ".tmp") -> None:
    """Call ``write(tmp)`` on a temporary path in the same folder, then rename it over ``path``.

    The folder is the same filesystem, so ``os.replace`` is atomic: readers see the old file or the new
    one, never a torn one. The file gets mode 0644 (``mkstemp`` alone makes 0600 files); the temporary
    file is removed if anything fails. ``suffix`` keeps the extension for writers that read it (PNG).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, flushed to disk before the rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike, *, old: str | os.PathLike | None = None) -> None:
    """Move the finished directory ``tmp`` to ``final`` with atomic renames, replacing an older ``final``.

    The older one is first renamed to ``old`` (default ``.NAME.old-PID`` beside it), then removed, so at
    every moment ``final`` is either the complete old directory or the complete new one.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = Path(old) if old is not None else final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> bool:
    """Move the finished cache directory ``tmp`` to ``final`` unless ``final`` exists already (another
    process finished the same cache entry first: theirs is kept and ``tmp`` removed). True if ours was used."""
    tmp, final = Path(tmp), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        try:
            os.replace(tmp, final)
            return True
        except OSError:
            if not final.exists():
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    return False


@contextmanager
def atomic_dir(final: str | os.PathLike, *, prefix: str = TMP_PREFIX) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on success it replaces ``final`` (``replace_dir``),
    on an error it is removed. Single-process (multi-process checkpoints coordinate the rename themselves)."""
    final = Path(final)
    tmp = final.with_name(f"{prefix}{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final, old=final.with_name(f"{prefix}old-{final.name}"))
