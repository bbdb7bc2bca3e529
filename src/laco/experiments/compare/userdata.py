"""``laco compare --data TRAIN.json --eval TEST.jsonl``: the MLLM scenarios on your own data.

* **Data**: a LLaVA-format training file (``laco.data.llava.load_llava``: a bad record stops the run with the
  loader's error, naming the record) and an evaluation JSONL in ``laco eval``'s format
  (``laco.eval.evaluator.load_records``). Single-image records only: a record with several images or a video
  is refused with an error naming it (file, record id); text-only training records (LLaVA-665K's ShareGPT
  part) are left out and counted (``counts.train_text_only_left_out``): no compressor sees them, and every
  method trains on the same image conversations. An eval record must have one image. Image paths resolve
  against ``--image-folder`` when given (both files), else against each file's own folder (as ``load_llava``
  and ``laco eval`` do).
* **Vision encoder**: default, the embedded pretrained encoder of the seed (user images resized to its square
  input, ``to_pixel_values``); ``--vision DIR``: a SigLIP / CLIP / DINOv2 vision model saved there (a full
  SigLIP / CLIP model gives its vision tower), its images through the folder's own image processor
  (``preprocessor_config.json``, required) at the encoder's input size.
* **LLM**: default, the small Qwen2 built in code with a BPE trained on the training text, pretrained on the
  training conversations as text (per seed); ``--llm DIR``: ``AutoModelForCausalLM`` + ``AutoTokenizer`` from
  the folder (its chat template is required; ``<image>`` is added when missing and the embeddings grow).

What a seed varies: with the defaults, everything it varies on the embedded data (encoder, LLM, new modules,
data order); a model loaded from disk is the same for every seed, so there a seed varies only what is new
(compressor, projector) and the data order. ``results.json`` records it in its ``data`` block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from laco.experiments.compare.presets import MLLM_SCENARIOS, ComparePreset

IMAGE_TOKEN = "<image>"
#: model_type in a --vision folder's config.json -> (transformers config class, vision model class)
VISION_CLASSES = {
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel"),
    "siglip_vision_model": ("SiglipVisionConfig", "SiglipVisionModel"),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel"),
    "clip_vision_model": ("CLIPVisionConfig", "CLIPVisionModel"),
    "dinov2": ("Dinov2Config", "Dinov2Model"),
    "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel"),
}


@dataclass(frozen=True)
class UserSource:
    """What ``--data --eval [--image-folder] [--vision] [--llm]`` name; every path is checked on creation."""

    train: Path
    eval: Path
    image_folder: Path | None = None
    vision: Path | None = None
    llm: Path | None = None

    def __post_init__(self) -> None:
        for name in ("train", "eval", "image_folder", "vision", "llm"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        for flag, path, kind in (("--data", self.train, "file"), ("--eval", self.eval, "file"),
                                 ("--image-folder", self.image_folder, "dir"), ("--vision", self.vision, "model"),
                                 ("--llm", self.llm, "model")):
            if path is None:
                continue
            path = Path(path)
            if kind == "file" and not path.is_file():
                raise FileNotFoundError(f"{flag}: file not found: {path}")
            if kind == "dir" and not path.is_dir():
                raise FileNotFoundError(f"{flag}: folder not found: {path}")
            if kind == "model" and not (path / "config.json").is_file():
                raise FileNotFoundError(f"{flag}: {path} is not a saved Hugging Face model folder (no config.json)")
        if self.vision is not None and not (Path(self.vision) / "preprocessor_config.json").is_file():
            raise FileNotFoundError(
                f"--vision {self.vision}: no preprocessor_config.json (the encoder's image processor); save it beside "
                "the model: AutoImageProcessor.from_pretrained(<the encoder's hub id>).save_pretrained(DIR)")

    def check_preset(self, preset: ComparePreset) -> None:
        """Only the MLLM scenarios run on user data: readout needs the embedded encoder's pretraining head."""
        if "readout" in preset.scenarios:
            raise ValueError("the readout scenario needs the embedded encoder's pretraining head (quadrant classes) "
                             f"and cannot run on --data; choose from {', '.join(MLLM_SCENARIOS)}")

    def describe(self) -> dict[str, Any]:
        return {"train_file": str(self.train), "eval_file": str(self.eval),
                "image_folder": None if self.image_folder is None else str(self.image_folder),
                "vision": str(self.vision) if self.vision else "the embedded pretrained encoder of each seed",
                "llm": str(self.llm) if self.llm else "the small Qwen2 built in code, pretrained per seed on the "
                                                       "training conversations as text",
                "seed_varies": self._seed_varies()}

    def _seed_varies(self) -> str:
        parts = [*([] if self.vision else ["the pretrained encoder"]), *([] if self.llm else ["the text-pretrained LLM"]),
                 "the compressor and projector init", "the data order"]
        return (", ".join(parts[:-1]) + " and " + parts[-1]
                + ("; the models loaded from disk are the same for every seed" if self.vision or self.llm else ""))


@dataclass
class UserDataset:
    """User data in the shape the compare pipeline reads: conversations per split with an image row each, the
    image files of each split (row order), the files the blind baseline reads, and how images become pixels."""

    source: str
    root: Path  # the training file's folder
    train_file: Path
    eval_path: Path
    eval_split: str
    eval_image_dir: Path | None  # eval images resolve against it (None: the eval file's folder)
    images: dict[str, list[Path]]  # split -> image files; a conversation's image row indexes this list
    convs: dict[str, list[tuple]]  # split -> (messages, image row, scored turns, task, turn), as text.conversations
    to_pixels: Callable[[Sequence[Path]], torch.Tensor] | None = None  # set by prepare: image files -> (N, 3, S, S)
    counts: dict[str, int] = field(default_factory=dict)

    def conversations(self, split: str) -> list[tuple]:
        return self.convs[split]

    def eval_file(self, split: str) -> Path:
        if split != self.eval_split:
            raise ValueError(f"user data has the splits train and {self.eval_split} (--eval), not {split!r}")
        return self.eval_path

    def pixel_source(self, split: str) -> tuple[list[Path], Callable[[Sequence[Path]], torch.Tensor]]:
        """(image files of ``split``, files -> pixel values): what ``cache_hidden_states`` reads."""
        return self.images[split], self.to_pixels


def _refuse(what: str) -> str:
    return f"{what}: laco compare --data takes single-image records only (one image, no video)"


def _train_conversations(user: UserSource, rows: dict[Path, int]) -> tuple[list[tuple], int]:
    """(conversations, number of text-only records left out)."""
    from laco.data.llava import ROLE_MAP, BadRecord, BadRecordError, load_llava, resolve_image_path

    data = load_llava(user.train, user.image_folder, on_bad_record="raise", progress=False)
    out, text_only = [], 0
    for i in range(len(data)):
        rec = data.records[i]
        if not rec["images"] and not rec["videos"]:
            text_only += 1
            continue
        if len(rec["images"]) != 1 or rec["videos"]:
            n = len(rec["images"])
            raise BadRecordError(BadRecord(i, rec["id"], _refuse(f"{n} images" + (" and a video" * bool(rec["videos"]))
                                                                  + f" (in {user.train})")))
        path = resolve_image_path(rec["images"][0], data.image_folder)
        msgs = []
        for t in rec["conversations"]:
            text = t["value"]
            if IMAGE_TOKEN in text:  # LLaVA's preprocessing: the image first in its turn, as the evaluator asks
                text = IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()
            msgs.append({"role": ROLE_MAP[t["from"]], "content": text})
        out.append((msgs, rows.setdefault(path, len(rows)), sum(m["role"] == "assistant" for m in msgs), "train", 1))
    if not out:
        raise ValueError(f"--data {user.train}: no record with an image ({text_only} text-only records); "
                         "laco compare trains on image conversations")
    return out, text_only


def _eval_conversations(user: UserSource, rows: dict[Path, int]) -> list[tuple]:
    from laco.eval.evaluator import build_messages, load_records

    out = []
    for rec in load_records(user.eval, user.image_folder):
        if len(rec.images) != 1:
            raise ValueError(f"{user.eval}:{rec.line} (record {rec.id!r}): " + _refuse(f"{len(rec.images)} images"))
        # one-pass exact match needs one reference: the first of a list of accepted answers
        answer = rec.answer[0] if isinstance(rec.answer, list) else rec.answer
        msgs = build_messages(rec) + [{"role": "assistant", "content": str(answer)}]
        out.append((msgs, rows.setdefault(rec.images[0], len(rows)), 1, rec.task, rec.turn))
    return out


def load_user_dataset(user: UserSource, preset: ComparePreset, *, log=print) -> UserDataset:
    """Read and check both files (every image is opened once by the loaders); refuse multi-image records."""
    user.check_preset(preset)
    rows: dict[str, dict[Path, int]] = {"train": {}, preset.eval_split: {}}  # image file -> row, in first-seen order
    train, text_only = _train_conversations(user, rows["train"])
    convs = {"train": train, preset.eval_split: _eval_conversations(user, rows[preset.eval_split])}
    images = {split: list(r) for split, r in rows.items()}  # dicts keep insertion order: row i is the i-th new image
    counts = {"train_conversations": len(convs["train"]), "train_images": len(images["train"]),
              "train_text_only_left_out": text_only,
              "eval_questions": len(convs[preset.eval_split]), "eval_images": len(images[preset.eval_split])}
    left_out = f", {text_only} text-only records left out" if text_only else ""
    log(f"data: {user.train} ({counts['train_conversations']} conversations, {counts['train_images']} images"
        f"{left_out}), eval {user.eval} ({counts['eval_questions']} questions, {counts['eval_images']} images)")
    return UserDataset(f"user data ({user.train.name})", user.train.resolve().parent, user.train, user.eval,
                       preset.eval_split, user.image_folder, images, convs, counts=counts)


# -- images -> pixels ------------------------------------------------------------------------------------------
def resized_pixels(size: int) -> Callable[[Sequence[Path]], torch.Tensor]:
    """For the embedded encoder: each image resized to ``size`` square (bicubic), SigLIP's normalisation."""
    from PIL import Image

    from laco.experiments.pretrain import to_pixel_values
    from laco.safety import open_image

    def to_pixels(paths: Sequence[Path]) -> torch.Tensor:
        return to_pixel_values(np.stack([np.asarray(open_image(p).resize((size, size), Image.BICUBIC)) for p in paths]))

    return to_pixels


def processor_pixels(vision_dir: Path, size: int) -> Callable[[Sequence[Path]], torch.Tensor]:
    """For a --vision encoder: the folder's own image processor (its resize, crop and statistics) at ``size``."""
    from laco.model.processing import load_image_processor, output_size, set_image_size
    from laco.safety import open_image

    proc = load_image_processor(vision_dir)  # UserSource checked that the folder has one
    set_image_size(proc, size)  # the encoder's native input: the cached states and the model's grid assume it
    if output_size(proc) != size:
        raise ValueError(f"--vision {vision_dir}: its image processor outputs {output_size(proc)} px, the encoder "
                         f"takes {size} px")

    def to_pixels(paths: Sequence[Path]) -> torch.Tensor:
        return proc(images=[open_image(p) for p in paths], return_tensors="pt")["pixel_values"]

    return to_pixels


# -- models from disk ------------------------------------------------------------------------------------------
def _vision_classes(vision_dir: Path):
    import transformers

    from laco.safety import read_json_object

    mt = read_json_object(vision_dir / "config.json", "model config").get("model_type")
    if mt not in VISION_CLASSES:
        raise ValueError(f"--vision {vision_dir}: model_type {mt!r} is not a supported vision encoder; "
                         f"supported: {', '.join(VISION_CLASSES)}")
    cfg_cls, model_cls = VISION_CLASSES[mt]
    return getattr(transformers, cfg_cls), getattr(transformers, model_cls)


def vision_config(vision_dir: Path):
    """The vision config of a --vision folder (a full SigLIP / CLIP config gives its vision part)."""
    cfg_cls, _ = _vision_classes(vision_dir)
    cfg = cfg_cls.from_pretrained(vision_dir)
    if cfg.model_type.startswith("siglip"):
        # MLLMs read the patch tokens: SigLIP's pooling head is not built (LaCoConfig switches it off too). Set
        # on the object: 5.17's SiglipVisionConfig has no such default, so a from_pretrained keyword would be
        # handed on to the model's __init__ and refused there
        cfg.vision_use_head = False
    return cfg


def load_vision(vision_dir: Path):
    """The vision encoder of a --vision folder, float32, eval mode (a full SigLIP / CLIP model: its tower)."""
    from transformers.utils import logging as hf_logging

    _, model_cls = _vision_classes(vision_dir)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a SigLIP's pooling-head weights are left out on purpose: no warning table
    try:
        return model_cls.from_pretrained(vision_dir, config=vision_config(vision_dir), dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(llm_dir: Path):
    """The --llm folder's tokenizer, ready for ``text.tokenize_split``: a fast tokenizer with a chat template,
    ``<image>`` as a token, a pad token, right padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir)
    if not tok.is_fast:
        raise ValueError(f"--llm {llm_dir}: a fast tokenizer (tokenizer.json) is needed for the answer offsets")
    if not tok.chat_template:
        raise ValueError(f"--llm {llm_dir}: the tokenizer has no chat template; the conversations are rendered with "
                         "it (set tokenizer.chat_template and save it again)")
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"--llm {llm_dir}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # TokenizedSplit trims right padding
    return tok


def llm_config_from_disk(llm_dir: Path, tok):
    """The --llm folder's config with the vocabulary grown to the tokenizer (as ``load_llm`` does)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(llm_dir)
    cfg.vocab_size = max(cfg.vocab_size, len(tok))
    return cfg


def load_llm(llm_dir: Path, tok):
    """``AutoModelForCausalLM`` from the folder, float32, embeddings grown when the tokenizer gained ``<image>``:
    the new rows are the mean of the old ones (no random draw, so the LLM is the same for every seed)."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    old = llm.get_input_embeddings().num_embeddings
    if len(tok) > old:
        llm.resize_token_embeddings(len(tok), mean_resizing=False)
        tables = {id(m.weight): m.weight for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None}
        with torch.no_grad():
            for w in tables.values():  # (V, D); a tied head is the same tensor
                w[old:] = w[:old].mean(0)
    return llm.eval()


def markdown_intro(results: dict[str, Any]) -> str:
    """The results.md paragraph on user data: files, models, what a seed varies."""
    d, seeds = results["data"], results["config"]["seeds"]
    c = d["counts"]
    left_out = c.get("train_text_only_left_out", 0)  # absent in results written before it was counted
    left_out = f"; {left_out} text-only records left out" if left_out else ""
    return (f"Data: your own: {d['train_file']} ({c['train_conversations']} conversations, {c['train_images']} "
            f"images{left_out}), evaluated on {d['eval_file']} ({c['eval_questions']} questions, "
            f"{c['eval_images']} images). "
            f"Vision encoder: {d['vision']}. LLM: {d['llm']}. Seeds: {seeds}; a seed varies {d['seed_varies']}. "
            f"Accuracy: greedy exact match of the (first) reference answer"
            + (" (mean ± sample std over seeds)." if len(seeds) > 1 else " (one seed)."))


def describe(user: UserSource, ds: UserDataset) -> dict[str, Any]:
    """results.json's ``data`` block."""
    return {**user.describe(), "counts": dict(ds.counts)}


__all__ = ["UserDataset", "UserSource", "describe", "load_llm", "load_tokenizer", "load_user_dataset", "load_vision",
           "llm_config_from_disk", "markdown_intro", "processor_pixels", "resized_pixels", "vision_config"]
