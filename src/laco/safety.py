"""Guards against data loss and silent wrong results: one place for each check the commands share.

* reading user files: ``read_json`` / ``read_yaml`` / ``check_model_dir`` / ``open_image`` raise
  ``ValueError`` / ``FileNotFoundError`` whose message names the file, never a bare parser error;
* output folders: a marker file says which laco command wrote a folder (``write_marker``), and
  ``check_replaceable`` refuses to replace anything else, the source or the current directory;
  ``OutputLock`` lets one writer at a time into a folder;
* integrity: sha256 checksums of every file in a folder (``write_checksums`` / ``verify_checksums``);
* identity: ``file_identity`` / ``weights_identity`` / ``fingerprint_mismatch`` for resumable outputs.

The lowest layer of the package: it imports nothing from laco (only the standard library, lazily PIL,
numpy, safetensors, yaml, torch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

MARKER_FILE = ".laco-output.json"
CHECKSUM_FILE = "checksums.sha256"
LOCK_FILE = ".laco.lock"
#: larger images are refused (PIL's own limit is a warning at 89 Mpx and an error at 179 Mpx)
MAX_IMAGE_PIXELS = 64_000_000


# -- reading user files ------------------------------------------------------------------------------
def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is an error naming it."""
    text, path = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not valid JSON ({err}): {path}") from None


def _read_text(path: str | os.PathLike, what: str) -> tuple[str, Path]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8"), path
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} is not UTF-8 text ({err}): {path}") from None


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{what} must hold a JSON object, not a {type(data).__name__}: {path}")
    return data


def read_result_json(path: str | os.PathLike, command: str, keys: Sequence[str]) -> dict[str, Any]:
    """A result file a ``laco COMMAND --from-json`` redraws: a JSON object holding ``keys``, else an error naming it."""
    result = read_json_object(path, "--from-json result file")
    missing = [k for k in keys if k not in result]
    if missing:
        raise ValueError(f"--from-json: not a `laco {command}` result file (no {', '.join(missing)}): {path}")
    return result


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    import yaml

    text, path = _read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{what} is not valid YAML ({reason}): {path}") from None


def check_safetensors(path: Path) -> None:
    """The header of a safetensors file parses and covers the whole file (catches truncation)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # SafetensorError has no importable base class across versions
        raise ValueError(f"corrupt or truncated weights file ({err}): {path}") from None


def check_model_dir(path: str | os.PathLike, *, processor: bool = False) -> Path:
    """A saved Hugging Face model folder whose JSON files parse and whose weights are intact.

    ``processor=True`` also needs what ``AutoProcessor`` reads (processor_config.json, tokenizer.json).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a saved model folder (no config.json): {path}")
    for name in ("processor_config.json", "tokenizer.json") if processor else ():
        if not (path / name).is_file():
            raise FileNotFoundError(f"the model folder has no {name} (save the processor next to the model): "
                                    f"{path / name}")
    for p in sorted(path.glob("*.json")):
        read_json(p, "model file")
    for p in sorted(path.glob("*.safetensors")):
        check_safetensors(p)
    return path


def open_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode an image file to an 8-bit RGB ``PIL.Image`` (the one decode function of generate, eval,
    training and probe).

    High-bit-depth images (16-bit greyscale ``I;16``, 32-bit ``I`` / ``F``) are scaled into 0..255 by
    their bit depth, not clipped as ``convert("RGB")`` does. Images over ``max_pixels`` and files PIL
    cannot decode are ``ValueError`` naming the file.
    """
    import numpy as np
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"image of {im.width}x{im.height} pixels is over the limit of {max_pixels} "
                                 f"pixels: {path}")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                full = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) <= 65535) \
                    else max(float(a.max(initial=0)), 1.0)
                if im.mode == "F":  # floats: 0..1 if they fit, else their own range
                    full = 1.0 if a.max(initial=0) <= 1.0 else full
                g = np.clip(np.rint(a / full * 255.0), 0, 255).astype(np.uint8)
                return Image.fromarray(g, mode="L").convert("RGB")
            return im.convert("RGB")
    except ValueError:
        raise
    except (OSError, Image.DecompressionBombError, SyntaxError) as err:
        raise ValueError(f"image cannot be opened or decoded ({err}): {path}") from None


# -- numbers and devices -------------------------------------------------------------------------------
def check_finite(name: str, value: float, *, low: float | None = None, high: float | None = None) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low or high is not None and value > high:
        rng = f"at least {low}" if high is None else f"at most {high}" if low is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rng}, got {value!r}")
    return value


def check_device(spec: str, option: str = "--device", allow_auto: bool = False) -> str:
    """A torch device this build can use: 'cpu', 'cuda', 'cuda:1', 'mps' (and 'auto' when allowed)."""
    import torch

    if allow_auto and spec == "auto":
        return spec
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"{option} {spec!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {spec!r}: this torch build has no usable CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option} {spec!r}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"{option} {spec!r} is not supported; use cpu, cuda, cuda:N or mps")
    return spec


# -- checksums ----------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: str | os.PathLike) -> None:
    """``folder/checksums.sha256``: one ``<sha256>  <relative path>`` line per file below ``folder``."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)
    text = "".join(f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)
    with open(folder / CHECKSUM_FILE, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def verify_checksums(folder: str | os.PathLike) -> str | None:
    """``None`` when every listed file exists and matches; otherwise what is wrong (for the message)."""
    folder = Path(folder)
    sums = folder / CHECKSUM_FILE
    if not sums.is_file():
        return f"no {CHECKSUM_FILE}"
    lines = [ln.split("  ", 1) for ln in sums.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines or any(len(x) != 2 for x in lines):
        return f"unreadable {CHECKSUM_FILE}"
    for digest, name in lines:
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if sha256_file(p) != digest:
            return f"{name} does not match its checksum"
    return None


# -- identities and fingerprints ---------------------------------------------------------------------
def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Resolved path, size and sha256 of a (data) file."""
    path = Path(path)
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": sha256_file(path)}


def weights_identity(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Resolved path and a hash of a model folder's weights and config.

    Small files are hashed whole; large weight files by size, safetensors header (names, shapes,
    offsets) and three 1 MiB samples (start, middle, end), so a 15 GB model costs milliseconds.
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for p in sorted([*model_dir.glob("*.safetensors"), *model_dir.glob("*.bin"), model_dir / "config.json"]):
        if not p.is_file():
            continue
        size = p.stat().st_size
        h.update(f"{p.name}:{size}:".encode())
        with open(p, "rb") as f:
            if size <= 8 << 20:
                h.update(f.read())
                continue
            for at in (0, size // 2, size - (1 << 20)):
                f.seek(at)
                h.update(f.read(1 << 20))
    return {"path": str(model_dir.resolve()), "sha256": h.hexdigest()}


def fingerprint_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Top-level keys whose values differ (paths are compared only through their content hashes)."""
    def strip(v: Any) -> Any:
        return {k: x for k, x in v.items() if k != "path"} if isinstance(v, dict) and "sha256" in v else v
    return sorted(k for k in set(saved) | set(now) if strip(saved.get(k)) != strip(now.get(k)))


# -- output folders -------------------------------------------------------------------------------------
def write_marker(folder: str | os.PathLike, kind: str, **info: Any) -> None:
    """Mark ``folder`` as a ``kind`` output of laco (what ``check_replaceable`` accepts to replace)."""
    (Path(folder) / MARKER_FILE).write_text(json.dumps({"kind": kind, **info}, indent=2) + "\n", encoding="utf-8")


def output_kind(folder: str | os.PathLike) -> str | None:
    p = Path(folder) / MARKER_FILE
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("kind") if p.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_path(out: str | os.PathLike, option: str = "output folder") -> Path:
    """An output folder path that is not an existing file (and whose parent is not one)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} is an existing file, not a folder: {out}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} lies under a file, not a folder: {parent}")
            break
    return out


def check_replaceable(out: str | os.PathLike, kind: str, *, sources: tuple = (), legacy: tuple[str, ...] = ()) -> None:
    """Refuse to replace ``out`` unless it is a previous laco ``kind`` output that holds none of ``sources``
    and not the current directory. ``legacy``: file names that mark outputs written before markers."""
    out = Path(out)
    check_output_path(out)
    if not out.exists():
        return
    real = out.resolve()
    for src in sources:
        if _inside(Path(src).resolve(), real):
            raise ValueError(f"refusing to replace {out}: it holds the source {src}")
    if _inside(Path.cwd().resolve(), real):
        raise ValueError(f"refusing to replace {out}: it holds the current directory")
    if not any(out.iterdir()):
        return  # an empty folder holds nothing to lose
    found = output_kind(out)
    if found != kind and not (found is None and legacy and all((out / n).is_file() for n in legacy)):
        what = f"a laco {found} output" if found else "not a laco output"
        raise ValueError(f"refusing to replace {out}: it is {what}, not a previous laco {kind} output "
                         f"(no {MARKER_FILE} of kind {kind!r}); choose another folder or remove it yourself")


def clean_partials(out: str | os.PathLike) -> None:
    """Remove ``.NAME.partial-PID`` / ``.NAME.old-PID`` siblings of ``out`` left by killed processes."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)")
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier call in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive advisory lock on an output folder (``fcntl.flock`` on ``FOLDER/.laco.lock``).

    The lock dies with its process, so a killed run never leaves a stale lock; a second writer gets a
    ``ValueError`` naming the folder. Use as a context manager or ``acquire()`` / ``release()``. As a
    context manager, a body that fails before writing anything into a folder the lock created leaves no
    folder behind (a bad input must not leave an empty output folder that blocks or confuses the next run).
    """

    def __init__(self, folder: str | os.PathLike, what: str = "output folder"):
        self.folder, self.what, self._fd, self._created = Path(folder), what, None, False

    def acquire(self) -> "OutputLock":
        import fcntl

        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"another laco process is writing to this {self.what} (locked): {self.folder}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self._created and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
            (self.folder / LOCK_FILE).unlink()  # still holding the flock: no other writer is inside
            self.folder.rmdir()
        self.release()
