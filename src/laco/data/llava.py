"""LLaVA-format conversation data: load, validate, open images lazily.

A record (LLaVA / LLaVA-OneVision JSON or JSONL)::

    {"id": "000123",
     "image": "coco/000123.jpg",            # a path relative to image_folder, a list of paths, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Several images: ``"image": ["a.jpg", "b.jpg"]`` with one ``<image>`` per image, in order, in any user turns.
A video (LLaVA-OneVision): ``"video"``: a folder of frames (image files, in name order) or a list of frame
files, with one ``<video>`` placeholder (``"videos"``: a list of such videos, one ``<video>`` each). As in
LLaVA-NeXT's video data, a record with a video, no image and no ``<video>`` may mark the video with
``<image>``: it is rewritten to ``<video>``. Video files (.mp4, ...) are not decoded here: extract the frames
(``ffmpeg -i v.mp4 v/%05d.jpg``). ``max_frames`` keeps that many frames, sampled uniformly (LLaVA's
``frames_upbound``: ``np.linspace(0, T - 1, max_frames)``); frame paths are stored after that choice.

``load_llava(source, image_folder)`` accepts a ``.json`` (a list of records) or ``.jsonl`` file, an
in-memory list of records, or a ``datasets.Dataset`` with those columns. Every record is checked
before any training; a bad one is reported with its id and then skipped or raised
(``on_bad_record="skip" | "raise"``), never silently trained on:

* malformed conversation: not a list of ``{"from", "value"}`` turns, an unknown role, turns not
  alternating user/assistant (after an optional system turn), no assistant turn, ``<image>`` in an
  assistant or system turn;
* the number of ``<image>`` placeholders differs from the number of images (``<video>``: of videos);
* a video frame folder is missing or holds no image files, a video is given as a video file, or a
  frame file is missing or cannot be opened (checked as images are);
* an image file is missing or cannot be opened (``check_images="open"``: PIL reads the header and
  ``verify()``s the file; ``"exists"``: only a stat; ``"none"``: no check). An image that still fails to
  decode when a sample is read is handled the same way: ``"skip"`` yields ``None`` (the collator drops
  it and counts it), ``"raise"`` raises.

Records are parsed in Python first (so a bad record can be named by its id, which arrow's JSON
reader cannot do), then stored as a ``datasets.Dataset`` with a fixed schema
(``id: str, images: list[str], videos: list[list[str]], conversations: list[{from, value}]``); images and
frames are opened only when a sample is read. Where ``datasets`` is not installed (the lent GPU image has none),
they stay a plain list of those dicts: indexing and ``len`` behave the same.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from torch.utils.data import Dataset

from laco.safety import open_image

logger = logging.getLogger(__name__)

# LLaVA role names -> chat-template roles ("user"/"assistant" are accepted as they are)
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
BAD_RECORD_POLICIES = ("skip", "raise")
IMAGE_CHECKS = ("open", "exists", "none")

OnBadRecord = Literal["skip", "raise"]
ImageCheck = Literal["open", "exists", "none"]


class BadRecordError(ValueError):
    """A record that cannot be trained on; the message names its id and the reason (``.record``)."""

    def __init__(self, record: "BadRecord"):
        super().__init__(str(record))
        self.record = record


@dataclass(frozen=True)
class BadRecord:
    """One rejected record: its position in the source, its id and why it was rejected."""

    index: int
    id: str
    reason: str

    def __str__(self) -> str:
        return f"record {self.id!r} (#{self.index}): {self.reason}"


def _features():
    from datasets import Features, Sequence, Value

    return Features(
        {
            "id": Value("string"),
            "images": Sequence(Value("string")),
            "videos": Sequence(Sequence(Value("string"))),  # per video: its frame files, in order
            "conversations": [{"from": Value("string"), "value": Value("string")}],
        }
    )


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read raw records from a ``.json`` (list of objects) or ``.jsonl`` (one object a line) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA data file not found: {path}")
    if path.suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        return records
    if path.suffix == ".json":
        with path.open(encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: a LLaVA .json file must hold a list of records, got {type(data).__name__}")
        return data
    raise ValueError(f"unsupported LLaVA data file {path}: expected .json or .jsonl")


def _record_id(record: Any, index: int) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return str(rid) if rid is not None else f"#{index}"


def _videos_field(record: dict) -> list[list[str]] | str:
    """``video`` (one video) / ``videos`` (a list) -> a list of videos, each ``[folder]`` or its frame files;
    a string is the reason the field is malformed."""
    def one(v) -> list[str] | None:
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
            return list(v)
        return None

    if record.get("video") is not None:
        video = one(record["video"])
        return [video] if video else f"'video' must be a frame folder or a non-empty list of frame files, got {record['video']!r}"
    if record.get("videos") is not None:
        vids = record["videos"]
        out = [one(v) for v in vids] if isinstance(vids, list) else [None]
        return out if all(out) else f"'videos' must be a list of videos (each a frame folder or a list of frame files), got {vids!r}"
    return []


def normalize_record(record: Any, index: int, image_token: str = "<image>", video_token: str = "<video>") -> dict:
    """Validate a record's structure and return it as ``{"id", "images", "videos", "conversations"}``.

    Raises ``BadRecordError`` (with the record id) for a malformed record. Image files are not touched.
    """
    rid = _record_id(record, index)

    def bad(reason: str) -> BadRecordError:
        return BadRecordError(BadRecord(index, rid, reason))

    if not isinstance(record, dict):
        raise bad(f"a record must be a JSON object, got {type(record).__name__}")
    image = record.get("image", record.get("images"))
    if image is None:
        images: list[str] = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = list(image)
    else:
        raise bad(f"'image' must be a path or a list of paths, got {image!r}")
    if any(not p.strip() for p in images):
        raise bad("'image' holds an empty path")
    videos = _videos_field(record)
    if isinstance(videos, str):
        raise bad(videos)
    if any(not p.strip() for v in videos for p in v):
        raise bad("a video holds an empty path")

    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise bad(f"'conversations' must be a non-empty list of turns, got {conv!r}")
    turns = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise bad(f"turn {t} must be {{'from': str, 'value': str}}, got {turn!r}")
        if turn["from"] not in ROLE_MAP:
            raise bad(f"turn {t} has unknown role {turn['from']!r}; expected one of {sorted(ROLE_MAP)}")
        turns.append({"from": turn["from"], "value": turn["value"]})

    roles = [ROLE_MAP[t["from"]] for t in turns]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * ((len(body) + 1) // 2)
    if not body or body != expected[: len(body)]:
        raise bad(f"turns must alternate user/assistant starting with the user (after an optional system turn), got {roles}")
    if "assistant" not in body:
        raise bad("no assistant turn: nothing to train on")
    count = lambda token: sum(t["value"].count(token) for t in turns)  # noqa: E731
    if videos and not images and not count(video_token) and count(image_token) == len(videos):
        # LLaVA-NeXT video data marks the video with <image>
        turns = [{**t, "value": t["value"].replace(image_token, video_token)} for t in turns]
    for t, (role, turn) in enumerate(zip(roles, turns)):
        for token, what in ((image_token, "images"), (video_token, "videos")):
            if role != "user" and token in turn["value"]:
                raise bad(f"turn {t} ({turn['from']}) contains {token!r}; {what} belong in user turns")
    for token, items, what in ((image_token, images, "image"), (video_token, videos, "video")):
        if count(token) != len(items):
            raise bad(f"{count(token)} {token!r} placeholder(s) but {len(items)} {what}(s)")
    return {"id": rid, "images": images, "videos": videos, "conversations": turns}


def resolve_image_path(path: str, image_folder: str | os.PathLike | None) -> Path:
    """An absolute path stays; a relative one is taken relative to ``image_folder`` (or the cwd)."""
    p = Path(path)
    return p if p.is_absolute() or image_folder is None else Path(image_folder) / p


def check_image(path: Path, how: ImageCheck = "open") -> str | None:
    """Return ``None`` if the image passes the check, else the reason it fails."""
    if how == "none":
        return None
    if not path.is_file():
        # a relative path here is relative to the cwd (resolve_image_path already joined any image_folder)
        hint = "" if path.is_absolute() else f" (looked for {path.resolve()}; relative paths are read from image_folder)"
        return f"image file not found: {path}{hint}"
    if how == "open":
        try:
            open_image(path)  # a full decode (verify() misses truncated pixel data) within the pixel limit
        except ValueError as err:
            return str(err)
    return None


VIDEO_FILE_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".m4v", ".mpg", ".mpeg")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def sample_frames(num_frames: int, max_frames: int | None) -> list[int]:
    """Indices of the frames kept: all, or ``max_frames`` spread uniformly (LLaVA's ``frames_upbound``)."""
    if max_frames is None or num_frames <= max_frames:
        return list(range(num_frames))
    import numpy as np

    return np.linspace(0, num_frames - 1, max_frames, dtype=int).tolist()


def resolve_video(video: list[str], image_folder: str | os.PathLike | None, max_frames: int | None = None) -> list[str]:
    """One video's frame paths (as stored: relative to ``image_folder`` when given so): a ``[folder]`` becomes its
    image files in name order; ``max_frames`` samples them uniformly. ValueError: no frames, a video file."""
    if len(video) == 1:
        path = resolve_image_path(video[0], image_folder)
        if path.suffix.lower() in VIDEO_FILE_SUFFIXES:
            raise ValueError(f"video files are not decoded: extract the frames to a folder (e.g. ffmpeg -i {path.name} "
                             f"frames/%05d.jpg) and give that folder or the frame list: {path}")
        if path.is_dir():
            names = sorted(p.name for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            if not names:
                raise ValueError(f"video frame folder holds no image files ({', '.join(FRAME_SUFFIXES)}): {path}")
            video = [str(Path(video[0]) / n) for n in names]
        elif not path.suffix:
            raise ValueError(f"video frame folder not found: {path}")
    return [video[i] for i in sample_frames(len(video), max_frames)]


class LlavaDataset(Dataset):
    """Validated LLaVA records (a ``datasets.Dataset`` in ``.records``) with lazily opened images.

    ``dataset[i]`` is ``{"id": str, "images": [PIL.Image RGB, ...], "videos": [[frame PIL.Image, ...], ...],
    "messages": [{"role", "content"}]}`` (``role`` in system/user/assistant, ``content`` the text with
    ``<image>`` / ``<video>`` placeholders), or ``None`` when an image or frame fails to decode and
    ``on_bad_record="skip"``. ``.bad_records`` lists every rejected
    record (at load time and, appended, while reading).
    """

    def __init__(
        self,
        records,
        image_folder: str | os.PathLike | None = None,
        *,
        on_bad_record: OnBadRecord = "raise",
        bad_records: Sequence[BadRecord] = (),
        image_token: str = "<image>",
        video_token: str = "<video>",
    ):
        self.records = records  # datasets.Dataset with the fixed schema (a list of dicts without `datasets`)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.on_bad_record = on_bad_record
        self.bad_records: list[BadRecord] = list(bad_records)
        self.image_token = image_token
        self.video_token = video_token

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict | None:
        rec = self.records[int(i)]
        try:
            images = [self._open(int(i), rec, p, "image") for p in rec["images"]]
            videos = [[self._open(int(i), rec, p, f"video {k} frame") for p in frames]
                      for k, frames in enumerate(rec.get("videos") or [])]
        except BadRecordError as err:
            if self.on_bad_record == "raise":
                raise
            logger.warning("skipping %s", err.record)
            self.bad_records.append(err.record)
            return None
        messages = [{"role": ROLE_MAP[t["from"]], "content": t["value"]} for t in rec["conversations"]]
        return {"id": rec["id"], "images": images, "videos": videos, "messages": messages}

    def _open(self, i: int, rec: dict, p: str, what: str):
        path = resolve_image_path(p, self.image_folder)
        try:
            return open_image(path)
        except Exception as err:
            raise BadRecordError(BadRecord(i, rec["id"], f"{what} cannot be decoded: {path} "
                                                          f"({type(err).__name__}: {err})")) from err

    def write_report(self, path: str | os.PathLike) -> None:
        """Write the rejected records as JSONL (one ``{"index", "id", "reason"}`` a line)."""
        with open(path, "w", encoding="utf-8") as f:
            for b in self.bad_records:
                f.write(json.dumps(asdict(b)) + "\n")


def _iter_source(source) -> Iterable[Any]:
    if isinstance(source, (str, os.PathLike)):
        return read_records(source)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(source, datasets.Dataset):
        return iter(source)
    if isinstance(source, (list, tuple)):
        return source
    raise TypeError(
        f"LLaVA source must be a .json/.jsonl path, a list of records or a datasets.Dataset, got {type(source).__name__}"
    )


def load_llava(
    source,
    image_folder: str | os.PathLike | None = None,
    *,
    on_bad_record: OnBadRecord = "raise",
    check_images: ImageCheck = "open",
    image_token: str = "<image>",
    video_token: str = "<video>",
    max_frames: int | None = None,
    progress: bool = True,
) -> LlavaDataset:
    """Load and validate LLaVA-format records; see the module docstring.

    Args:
        source: ``.json`` / ``.jsonl`` path, a list of record dicts, or a ``datasets.Dataset``.
        image_folder: image paths in records are relative to this folder (default: the data file's
            folder for a path source, else the current directory).
        on_bad_record: ``"raise"`` stops at the first bad record with a ``BadRecordError`` naming it;
            ``"skip"`` logs each one, drops it and keeps it in ``dataset.bad_records``.
        check_images: ``"open"`` (default), ``"exists"`` or ``"none"`` (video frames too).
        max_frames: frames kept per video, sampled uniformly (None: all).
    """
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
    if check_images not in IMAGE_CHECKS:
        raise ValueError(f"check_images must be one of {IMAGE_CHECKS}, got {check_images!r}")
    if max_frames is not None and (not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames < 1):
        raise ValueError(f"max_frames must be a positive int or None, got {max_frames!r}")
    if image_folder is None and isinstance(source, (str, os.PathLike)):
        image_folder = Path(source).parent
    if image_folder is not None and not Path(image_folder).is_dir():
        raise FileNotFoundError(f"image folder not found: {image_folder}")

    from tqdm.auto import tqdm

    raw = _iter_source(source)
    total = len(raw) if hasattr(raw, "__len__") else None
    good: list[dict] = []
    bad: list[BadRecord] = []
    seen_ids: set[str] = set()
    for index, record in enumerate(tqdm(raw, total=total, desc="checking records", disable=not progress or not total or total < 1000)):
        try:
            rec = normalize_record(record, index, image_token, video_token)
            try:
                rec["videos"] = [resolve_video(v, image_folder, max_frames) for v in rec["videos"]]
            except ValueError as err:
                raise BadRecordError(BadRecord(index, rec["id"], str(err))) from None
            checks = [("", p) for p in rec["images"]] + [(f"video {k} frame {j}: ", p)
                                                          for k, v in enumerate(rec["videos"]) for j, p in enumerate(v)]
            for what, p in checks:
                reason = check_image(resolve_image_path(p, image_folder), check_images)
                if reason:
                    raise BadRecordError(BadRecord(index, rec["id"], what + reason))
        except BadRecordError as err:
            if on_bad_record == "raise":
                raise
            bad.append(err.record)
            continue
        if rec["id"] in seen_ids:
            logger.warning("duplicate record id %r (#%d); ids name records in reports", rec["id"], index)
        seen_ids.add(rec["id"])
        good.append(rec)
    for b in bad[:20]:
        logger.warning("skipping %s", b)
    if bad:
        logger.warning("skipped %d of %d records (see dataset.bad_records)", len(bad), len(bad) + len(good))
    if not good:
        raise ValueError(f"no usable records in {source if isinstance(source, (str, os.PathLike)) else 'the data'}"
                         f" ({len(bad)} rejected{': ' + str(bad[0]) if bad else ''})")
    return LlavaDataset(_as_records(good), image_folder, on_bad_record=on_bad_record, bad_records=bad,
                        image_token=image_token, video_token=video_token)


def _as_records(good: list[dict]):
    """The checked records as a ``datasets.Dataset`` (fixed schema), or the list itself without ``datasets``."""
    try:
        from datasets import Dataset as HFDataset
    except ImportError:
        return good
    return HFDataset.from_list(good, features=_features())


TOY_COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40),
               "black": (10, 10, 10), "white": (245, 245, 245), "orange": (240, 140, 20), "purple": (140, 40, 170)}
TOY_SHAPES = ("square", "circle")


def write_toy_llava(folder: str | os.PathLike, n: int = 8, *, size: int = 64, seed: int = 0,
                    fmt: Literal["json", "jsonl"] = "json") -> Path:
    """Write ``n`` tiny LLaVA samples (a coloured square or circle on grey; "What is in the image?" ->
    "A red circle.") as ``folder/train.<fmt>`` + ``folder/images/*.png``; return the data file.

    For demos and tests: the answer depends on the image, so a model can only learn it by looking.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(TOY_COLOURS)
    records = []
    for i in range(n):
        colour, shape = names[i % len(names)], TOY_SHAPES[(i // len(names)) % len(TOY_SHAPES)]
        im = Image.new("RGB", (size, size), (128, 128, 128))
        lo = int(rng.integers(2, size // 4))
        hi = size - int(rng.integers(2, size // 4))
        draw = ImageDraw.Draw(im)
        (draw.rectangle if shape == "square" else draw.ellipse)([lo, lo, hi, hi], fill=TOY_COLOURS[colour])
        im.save(folder / "images" / f"{i:05d}.png")
        records.append({"id": f"toy-{i:05d}", "image": f"images/{i:05d}.png",
                        "conversations": [{"from": "human", "value": "<image>\nWhat is in the image?"},
                                          {"from": "gpt", "value": f"A {colour} {shape}."}]})
    path = folder / f"train.{fmt}"
    with path.open("w", encoding="utf-8") as f:
        if fmt == "json":
            json.dump(records, f, indent=1)
        else:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return path
