"""Embedded evaluation data: multi-object scenes built offline, no downloads.

Real images: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*.gz``; ``$LACO_FASHION_MNIST`` overrides the folder). Where
it is absent, PIL-drawn items (shapes and glyphs) stand in, with a clear message.

A scene is a ``canvas x canvas`` RGB image (default 64 px) cut into a 2 x 2 grid of quadrants.
Every quadrant holds one grayscale item, "large" (28 px) or "small" (18 px), at a random offset
inside its quadrant, on a black background; a small coloured dot (3 x 3 px) sits somewhere on
the background. The questions need fine detail:

==========  ====================================================  =========
task        question                                              answer
==========  ====================================================  =========
position    What item is at the top left?                         sneaker
count       How many bags are there?                              2
larger      Which item is larger, the top left or the bottom      top left
            right one?
next_to     What item is to the right of the dress?               coat
dot         What colour is the small dot?                         red
==========  ====================================================  =========

Splits never share an item: train scenes use Fashion-MNIST train items 0..53999, val scenes items
54000..59999, test scenes the 10k test items. Every split has its own fixed seed, so the same
config always gives the same files.

Outputs of ``build_embedded_dataset(out_dir, config)``::

    out_dir/images/{split}/{i:06d}.png     the scenes
    out_dir/{split}.json                   LLaVA format: [{"id", "image", "conversations": [...]}]
    out_dir/{split}.jsonl (val, test)      the evaluation format (one question per line), with a
                                           two-turn probe (turn 1 main object, turn 2 the dot)
    out_dir/arrays.npz                     uint8 images + labels per split, for fast loading
    out_dir/meta.json                      config, source, class names, counts
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from laco.io import atomic_write_text, replace_dir
from laco.safety import verify_checksums, write_checksums

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
GENERATED_CLASSES = ["circle", "square", "triangle", "diamond", "plus", "cross", "ring", "frame", "bar", "star"]
PLURALS = {"dress": "dresses", "cross": "crosses"}
DOT_COLOURS = {"red": (255, 40, 40), "green": (40, 220, 40), "blue": (60, 90, 255), "yellow": (250, 230, 30)}
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]  # quadrant index q = 2*row + col
TASKS = ("position", "count", "larger", "next_to", "dot")
SPLIT_SEEDS = {"train": 1001, "val": 2002, "test": 3003}


@dataclass
class EmbeddedDataConfig:
    """What ``build_embedded_dataset`` makes. Changing any field changes the cache key."""

    num_train: int = 8000
    num_val: int = 500
    num_test: int = 1000
    canvas: int = 64  # px; a 2 x 2 grid of canvas/2 quadrants
    large: int = 28  # item sizes in px ("which is larger" compares these)
    small: int = 18
    dot_size: int = 3
    two_turn_fraction: float = 0.2  # train conversations with a second (dot) turn
    task_weights: dict[str, float] = field(
        default_factory=lambda: {"position": 0.4, "count": 0.15, "larger": 0.15, "next_to": 0.15, "dot": 0.15}
    )
    source: str = "auto"  # "auto" (real if installed, else generated), "fashion_mnist", "generated"

    def __post_init__(self) -> None:
        if self.source not in ("auto", "fashion_mnist", "generated"):
            raise ValueError(f"source must be 'auto', 'fashion_mnist' or 'generated', got {self.source!r}")
        if self.canvas % 2 or self.large > self.canvas // 2 or not 0 < self.small < self.large:
            raise ValueError(
                f"need an even canvas with small < large <= canvas/2, got canvas={self.canvas}, "
                f"large={self.large}, small={self.small}"
            )
        unknown = set(self.task_weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
        if min(self.num_train, self.num_val, self.num_test) < 1:
            raise ValueError("every split needs at least one scene")

    def key(self, source: str) -> str:
        blob = json.dumps({**asdict(self), "source": source, "version": 1}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# -- item sources -------------------------------------------------------------------------------
@dataclass
class ItemSource:
    """28 x 28 grayscale items with class labels, split into disjoint pools per scene split."""

    name: str  # "fashion_mnist" or "generated"
    class_names: list[str]
    pools: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (images (N, 28, 28) uint8, labels (N,) int64)


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx-ubyte.gz file (images (N, 28, 28) or labels (N,)) as uint8."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("LACO_FASHION_MNIST", FASHION_MNIST_DIR))


def fashion_mnist_available() -> bool:
    d = fashion_mnist_dir()
    return all((d / f"{s}-{k}-idx{n}-ubyte.gz").exists() for s in ("train", "t10k") for k, n in (("images", 3), ("labels", 1)))


def load_fashion_mnist() -> ItemSource:
    """The real Fashion-MNIST items: train 0..53999 -> train, 54000.. -> val, the test set -> test."""
    d = fashion_mnist_dir()
    if not fashion_mnist_available():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {d}; install it with `apt-get install dataset-fashion-mnist` "
            "or set LACO_FASHION_MNIST to a folder with the four idx .gz files"
        )
    tr_x, tr_y = _read_idx(d / "train-images-idx3-ubyte.gz"), _read_idx(d / "train-labels-idx1-ubyte.gz")
    te_x, te_y = _read_idx(d / "t10k-images-idx3-ubyte.gz"), _read_idx(d / "t10k-labels-idx1-ubyte.gz")
    tr_y, te_y = tr_y.astype(np.int64), te_y.astype(np.int64)
    pools = {"train": (tr_x[:54000], tr_y[:54000]), "val": (tr_x[54000:], tr_y[54000:]), "test": (te_x, te_y)}
    return ItemSource("fashion_mnist", list(FASHION_CLASSES), pools)


def _draw_item(cls: int, rng: np.random.Generator) -> np.ndarray:
    """One 28 x 28 PIL-drawn item of class ``cls`` (GENERATED_CLASSES) with jittered size, stroke and shade."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (28, 28), 0)
    d = ImageDraw.Draw(img)
    m = int(rng.integers(2, 6))  # margin: item size jitter
    lo, hi = m, 27 - m
    c = (lo + hi) / 2
    shade = int(rng.integers(150, 256))
    w = int(rng.integers(2, 4))  # stroke width
    name = GENERATED_CLASSES[cls]
    if name == "circle":
        d.ellipse([lo, lo, hi, hi], fill=shade)
    elif name == "square":
        d.rectangle([lo, lo, hi, hi], fill=shade)
    elif name == "triangle":
        d.polygon([(c, lo), (hi, hi), (lo, hi)], fill=shade)
    elif name == "diamond":
        d.polygon([(c, lo), (hi, c), (c, hi), (lo, c)], fill=shade)
    elif name == "plus":
        d.line([(c, lo), (c, hi)], fill=shade, width=w + 1)
        d.line([(lo, c), (hi, c)], fill=shade, width=w + 1)
    elif name == "cross":
        d.line([(lo, lo), (hi, hi)], fill=shade, width=w + 1)
        d.line([(lo, hi), (hi, lo)], fill=shade, width=w + 1)
    elif name == "ring":
        d.ellipse([lo, lo, hi, hi], outline=shade, width=w)
    elif name == "frame":
        d.rectangle([lo, lo, hi, hi], outline=shade, width=w)
    elif name == "bar":
        d.rectangle([lo, c - 3, hi, c + 3], fill=shade)
    elif name == "star":
        r_out, r_in = (hi - lo) / 2, (hi - lo) / 5
        pts = [(c + (r_out if i % 2 == 0 else r_in) * np.sin(np.pi * i / 5),
                c - (r_out if i % 2 == 0 else r_in) * np.cos(np.pi * i / 5)) for i in range(10)]
        d.polygon(pts, fill=shade)
    return np.asarray(img, dtype=np.uint8)


def generated_items(per_split: dict[str, int] | None = None, seed: int = 0) -> ItemSource:
    """PIL-drawn stand-in items (10 classes), each split drawn with its own seed."""
    per_split = per_split or {"train": 6000, "val": 1000, "test": 2000}
    pools = {}
    for i, (split, n) in enumerate(per_split.items()):
        rng = np.random.default_rng(seed + 7919 * (i + 1))
        labels = rng.integers(0, len(GENERATED_CLASSES), size=n)
        pools[split] = (np.stack([_draw_item(int(c), rng) for c in labels]), labels.astype(np.int64))
    return ItemSource("generated", list(GENERATED_CLASSES), pools)


def get_item_source(source: str = "auto") -> ItemSource:
    """Real Fashion-MNIST when installed (or asked for), else generated items with a warning."""
    if source == "generated":
        return generated_items()
    if source == "fashion_mnist" or fashion_mnist_available():
        return load_fashion_mnist()
    warnings.warn(
        f"Fashion-MNIST is not installed ({fashion_mnist_dir()} has no idx files): using PIL-generated scenes "
        "instead. For the real images run `sudo apt-get install dataset-fashion-mnist`.",
        stacklevel=2,
    )
    return generated_items()


# -- scenes -------------------------------------------------------------------------------------
@dataclass
class Scenes:
    """A batch of composed scenes and everything needed to ask about them.

    images (N, S, S, 3) uint8; labels (N, 4) class per quadrant (q = 2*row + col); large (N, 4) bool;
    dot (N,) colour index into DOT_COLOURS; item_index (N, 4) index of each item in its split's pool.
    """

    images: np.ndarray
    labels: np.ndarray
    large: np.ndarray
    dot: np.ndarray
    item_index: np.ndarray
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.images)


def _resize_items(items: np.ndarray, size: int) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, size, size) uint8, antialiased bilinear (torch, batched)."""
    if size == items.shape[-1]:
        return items
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.array(items, copy=True)).float()[:, None]  # (N, 1, 28, 28)
    out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def compose_scenes(items: np.ndarray, labels: np.ndarray, n: int, seed: int, config: EmbeddedDataConfig,
                   class_names: list[str], source: str) -> Scenes:
    """Compose ``n`` scenes from a pool of 28 x 28 items with a fixed seed (deterministic)."""
    rng = np.random.default_rng(seed)
    S, half = config.canvas, config.canvas // 2
    idx = rng.integers(0, len(items), size=(n, 4))
    large = rng.random((n, 4)) < 0.5
    dot = rng.integers(0, len(DOT_COLOURS), size=n)
    big = _resize_items(items, config.large) if config.large != 28 else items
    small = _resize_items(items, config.small)
    images = np.zeros((n, S, S, 3), dtype=np.uint8)
    gray = np.zeros((S, S), dtype=np.uint8)
    colours = list(DOT_COLOURS.values())
    for i in range(n):
        gray[:] = 0
        for q in range(4):
            pool, s = (big, config.large) if large[i, q] else (small, config.small)
            oy, ox = (q // 2) * half + rng.integers(0, half - s + 1), (q % 2) * half + rng.integers(0, half - s + 1)
            np.maximum(gray[oy:oy + s, ox:ox + s], pool[idx[i, q]], out=gray[oy:oy + s, ox:ox + s])
        img = images[i]
        img[:] = gray[..., None]
        # the dot goes on empty background where possible (a few tries), else wherever the last try fell
        k = config.dot_size
        for _ in range(30):
            y, x = rng.integers(0, S - k + 1), rng.integers(0, S - k + 1)
            if gray[max(0, y - 1):y + k + 1, max(0, x - 1):x + k + 1].max() < 16:
                break
        img[y:y + k, x:x + k] = colours[dot[i]]
    return Scenes(images, labels[idx], large, dot, idx, class_names, source)


def scenes_for_split(split: str, n: int, config: EmbeddedDataConfig | None = None,
                     source: ItemSource | None = None, seed: int | None = None) -> Scenes:
    """``n`` scenes of ``split`` ("train", "val", "test") with the split's fixed seed (or ``seed``)."""
    config = config or EmbeddedDataConfig()
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLIT_SEEDS)}")
    source = source or get_item_source(config.source)
    items, labels = source.pools[split]
    return compose_scenes(items, labels, n, SPLIT_SEEDS[split] if seed is None else seed, config,
                          source.class_names, source.name)


def real_scene_images(n: int = 64, split: str = "test", seed: int | None = None,
                      config: EmbeddedDataConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real Fashion-MNIST scenes for probing: (images (n, S, S, 3) uint8, labels (n, 4) per quadrant).

    Falls back to generated items (with a warning) where Fashion-MNIST is not installed.
    """
    s = scenes_for_split(split, n, config, seed=seed)
    return s.images, s.labels


# -- questions ----------------------------------------------------------------------------------
def _plural(name: str) -> str:
    return PLURALS.get(name, name + "s")


def ask(scenes: Scenes, i: int, task: str, rng: np.random.Generator) -> dict | None:
    """One question about scene ``i``: {"task", "question", "answer", "metric"}; None if undefined here."""
    names, lab = scenes.class_names, scenes.labels[i]
    if task == "position":
        q = int(rng.integers(4))
        return {"task": task, "question": f"What item is at the {POSITIONS[q]}?", "answer": names[lab[q]], "metric": "exact"}
    if task == "count":
        # ask about a present class half of the time, else any class (answers 0..4)
        c = int(lab[rng.integers(4)]) if rng.random() < 0.5 else int(rng.integers(len(names)))
        return {"task": task, "question": f"How many {_plural(names[c])} are there?",
                "answer": int((lab == c).sum()), "metric": "numeric"}
    if task == "larger":
        big, sm = np.flatnonzero(scenes.large[i]), np.flatnonzero(~scenes.large[i])
        if not len(big) or not len(sm):
            return None
        a, b = int(rng.choice(big)), int(rng.choice(sm))
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        return {"task": task, "question": f"Which item is larger, the {POSITIONS[first]} or the {POSITIONS[second]} one?",
                "answer": POSITIONS[a], "metric": "exact"}
    if task == "next_to":
        # "to the right of X" / "to the left of X" / "below X" / "above X" with X unique in the scene
        q = int(rng.integers(4))
        if (lab == lab[q]).sum() != 1:
            return None
        row, col = divmod(q, 2)
        rel, other = ("right of", q + 1) if col == 0 else ("left of", q - 1)
        if rng.random() < 0.5:
            rel, other = ("above", q - 2) if row == 1 else ("below", q + 2)
        return {"task": task, "question": f"What item is {rel} the {names[lab[q]]}?" if rel in ("above", "below")
                else f"What item is to the {rel} the {names[lab[q]]}?", "answer": names[lab[other]], "metric": "exact"}
    if task == "dot":
        return {"task": task, "question": "What colour is the small dot?", "answer": list(DOT_COLOURS)[scenes.dot[i]],
                "metric": "exact"}
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def _ask_weighted(scenes: Scenes, i: int, config: EmbeddedDataConfig, rng: np.random.Generator) -> dict:
    tasks = list(config.task_weights)
    p = np.array([config.task_weights[t] for t in tasks], dtype=float)
    p /= p.sum()
    while True:  # redraw when a task is undefined for this scene (e.g. no size difference)
        qa = ask(scenes, i, tasks[rng.choice(len(tasks), p=p)], rng)
        if qa is not None:
            return qa


def llava_records(scenes: Scenes, split: str, config: EmbeddedDataConfig, seed: int) -> list[dict]:
    """LLaVA-format conversations, one per scene; a ``two_turn_fraction`` get a second turn about the dot."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(len(scenes)):
        qa = _ask_weighted(scenes, i, config, rng)
        conv = [{"from": "human", "value": "<image>\n" + qa["question"]}, {"from": "gpt", "value": str(qa["answer"])}]
        if qa["task"] != "dot" and rng.random() < config.two_turn_fraction:
            dot = ask(scenes, i, "dot", rng)
            conv += [{"from": "human", "value": dot["question"]}, {"from": "gpt", "value": dot["answer"]}]
        out.append({"id": f"{split}-{i:06d}", "image": f"images/{split}/{i:06d}.png", "task": qa["task"],
                    "conversations": conv})
    return out


def eval_records(scenes: Scenes, split: str, seed: int, probe_fraction: float = 0.2) -> list[dict]:
    """Evaluation-format records: every task in turn over the scenes, plus a two-turn probe.

    The probe (``probe_fraction`` of the scenes): turn 1 asks the item at a position ("multiturn",
    turn 1); turn 2 asks about the dot with turn 1 as teacher-forced ``history`` (turn 2).
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(len(scenes)):
        image = f"images/{split}/{i:06d}.png"
        if rng.random() < probe_fraction:
            t1 = ask(scenes, i, "position", rng)
            t2 = ask(scenes, i, "dot", rng)
            out.append({"id": f"{split}-{i:06d}-t1", "image": image, "question": t1["question"], "answer": t1["answer"],
                        "metric": "exact", "task": "multiturn", "turn": 1})
            out.append({"id": f"{split}-{i:06d}-t2", "image": image, "question": t2["question"], "answer": t2["answer"],
                        "metric": "exact", "task": "multiturn", "turn": 2,
                        "history": [[t1["question"], t1["answer"]]]})
            continue
        for k in range(len(TASKS)):  # rotate the task, skip undefined ones
            qa = ask(scenes, i, TASKS[(i + k) % len(TASKS)], rng)
            if qa is not None:
                break
        out.append({"id": f"{split}-{i:06d}", "image": image, "question": qa["question"], "answer": qa["answer"],
                    "metric": qa["metric"], "task": qa["task"], "turn": 1})
    return out


# -- building and loading -----------------------------------------------------------------------
@dataclass
class EmbeddedDataset:
    """A built dataset folder and its scenes (arrays in memory)."""

    root: Path
    source: str
    class_names: list[str]
    scenes: dict[str, Scenes]
    config: EmbeddedDataConfig

    #: eval images resolve against the eval file's folder (laco eval's default)
    eval_image_dir = None

    @property
    def train_file(self) -> Path:
        return self.root / "train.json"

    def llava(self, split: str) -> list[dict]:
        return json.loads((self.root / f"{split}.json").read_text())

    def eval_file(self, split: str) -> Path:
        return self.root / f"{split}.jsonl"


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=None if isinstance(obj, list) else 2))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def default_cache_dir() -> Path:
    return Path(os.environ.get("LACO_CACHE", Path.home() / ".cache" / "laco"))


def _load(root: Path, config: EmbeddedDataConfig) -> EmbeddedDataset:
    meta = json.loads((root / "meta.json").read_text())
    arrays = np.load(root / "arrays.npz")
    scenes = {
        split: Scenes(arrays[f"{split}_images"], arrays[f"{split}_labels"], arrays[f"{split}_large"],
                      arrays[f"{split}_dot"], arrays[f"{split}_item_index"], meta["class_names"], meta["source"])
        for split in SPLIT_SEEDS
    }
    return EmbeddedDataset(root, meta["source"], meta["class_names"], scenes, config)


def build_embedded_dataset(config: EmbeddedDataConfig | None = None, out_dir: str | Path | None = None,
                           *, progress: bool = True) -> EmbeddedDataset:
    """Build (or reuse) the dataset folder; default ``$LACO_CACHE/data/<source>-<config hash>``."""
    from PIL import Image
    from tqdm.auto import tqdm

    config = config or EmbeddedDataConfig()
    source = get_item_source(config.source)
    root = Path(out_dir) if out_dir is not None else default_cache_dir() / "data" / f"{source.name}-{config.key(source.name)}"
    if (root / "meta.json").exists():
        problem = verify_checksums(root)
        if problem is None:
            meta = json.loads((root / "meta.json").read_text())
            if meta.get("key") == config.key(source.name):
                return _load(root, config)
        else:  # a truncated or edited cache would load wrong scenes or fail cryptically: rebuild it
            warnings.warn(f"data cache {root} is incomplete or corrupt ({problem}); rebuilding", stacklevel=2)
    tmp = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"train": config.num_train, "val": config.num_val, "test": config.num_test}
    arrays, scenes = {}, {}
    for split, n in counts.items():
        s = scenes_for_split(split, n, config, source)
        scenes[split] = s
        (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(n), desc=f"writing {split} scenes", disable=not progress, leave=False):
            Image.fromarray(s.images[i]).save(tmp / "images" / split / f"{i:06d}.png", compress_level=1)
        seed = SPLIT_SEEDS[split] + 1
        _write_json(tmp / f"{split}.json", llava_records(s, split, config, seed))
        if split != "train":
            _write_jsonl(tmp / f"{split}.jsonl", eval_records(s, split, seed))
        for k in ("images", "labels", "large", "dot", "item_index"):
            arrays[f"{split}_{k}"] = getattr(s, k)
    np.savez(tmp / "arrays.npz", **arrays)
    _write_json(tmp / "meta.json", {"key": config.key(source.name), "source": source.name,
                                    "class_names": source.class_names, "counts": counts, "config": asdict(config),
                                    "dot_colours": list(DOT_COLOURS), "positions": POSITIONS})
    write_checksums(tmp)
    replace_dir(tmp, root)  # the folder appears complete or not at all
    return EmbeddedDataset(root, source.name, source.class_names, scenes, config)
