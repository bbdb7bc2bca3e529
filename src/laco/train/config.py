"""Typed configuration of a training run: model source, data, and a list of stages (stages are data).

A run is a YAML file (``laco train run.yaml``) or a ``RunConfig`` built in code::

    output_dir: runs/tiny
    seed: 0
    model: {tiny: {}}                      # or {pretrained: DIR} or {vision: DIR, llm: DIR, compression: {...}}
    data: {path: data/train.json, image_folder: data/images, on_bad_record: skip}
    stages:
      - name: align                        # stage 1 (paper / LLaVA): PML + projector, encoder and LLM frozen
        trainable: [compressor, projector]
        learning_rate: 1.0e-3
        epochs: 1
      - name: finetune                     # stage 2: whatever the list says, optionally LoRA on the LLM
        trainable: [compressor, projector, llm]
        learning_rate: 2.0e-5
        group_lr: {compressor: 1.0e-4, projector: 1.0e-4}
        lora: {r: 16, alpha: 32}

Parameter groups are the model's (``model.parameter_groups()``): ``compressor`` (the PML(s) inside
the vision tower), ``encoder`` (the pretrained vision encoder), ``projector``, ``llm``. Unknown keys,
wrong types and impossible values are ValueError/TypeError naming the key. Relative paths are
relative to the current directory. ``save_run_config`` writes the resolved config beside the run's
outputs (``output_dir/run_config.yaml``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from laco.io import atomic_write_text
from laco.model.modeling import PARAMETER_GROUPS

PARAM_GROUPS = PARAMETER_GROUPS  # the names are defined once, by the model
SCHEDULERS = ("cosine", "linear", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# files and folders of a run's output_dir: a stage (whose model is saved in output_dir/<name>) cannot take them
RESERVED_NAMES = ("run_config.yaml", "metrics.jsonl", "training.png", "checkpoints", "tensorboard", "fingerprint.json",
                  "checksums.sha256", ".laco.lock", ".laco-output.json")
# keys that may change between a run and its resume (they do not change the training trajectory)
OPERATIONAL_KEYS = ("save_every", "keep_checkpoints", "log_every", "tensorboard", "progress")


@dataclass
class DataConfig:
    """Where a stage's LLaVA-format data comes from and how samples are cut."""

    path: Optional[str] = None  # .json / .jsonl; None when data is passed to laco.train.train()
    image_folder: Optional[str] = None  # image paths in records are relative to it (default: the file's folder)
    on_bad_record: Literal["skip", "raise"] = "raise"
    check_images: Literal["open", "exists", "none"] = "open"
    max_length: int = 2048  # tokens per sample, image tokens included
    on_overflow: Literal["truncate", "drop", "raise"] = "truncate"
    num_workers: int = 0  # DataLoader worker processes
    max_frames: Optional[int] = None  # frames kept per video, sampled uniformly (LLaVA's frames_upbound); None: all
    # a stage fails when more than this fraction of its samples is dropped (bad records at load, samples
    # over max_length with on_overflow: drop, undecodable images): a run that trains on nothing is an error
    max_dropped_fraction: float = 0.5

    def validate(self, where: str = "data") -> None:
        _check(self.max_length >= 2, f"{where}.max_length must be >= 2, got {self.max_length}")
        _check(self.num_workers >= 0, f"{where}.num_workers must be >= 0, got {self.num_workers}")
        _check(self.max_frames is None or self.max_frames >= 1, f"{where}.max_frames must be >= 1, got {self.max_frames}")
        _check(0 <= self.max_dropped_fraction <= 1,
               f"{where}.max_dropped_fraction must be in [0, 1], got {self.max_dropped_fraction}")


@dataclass
class LoraConfig:
    """LoRA adapters on the LLM (through peft); merged into the LLM weights when the stage ends."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def validate(self, where: str = "lora") -> None:
        _check(self.r >= 1, f"{where}.r must be >= 1, got {self.r}")
        _check(self.alpha > 0, f"{where}.alpha must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"{where}.dropout must be in [0, 1), got {self.dropout}")
        _check(bool(self.target_modules), f"{where}.target_modules must not be empty")


@dataclass
class StageConfig:
    """One training stage: what trains, with which learning rates, for how long."""

    name: str
    trainable: list[str]  # parameter groups to train; the others are frozen
    learning_rate: float = 1e-3
    group_lr: dict[str, float] = field(default_factory=dict)  # per-group override of learning_rate
    weight_decay: float = 0.0  # not applied to biases and norm weights (1-D parameters)
    epochs: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # samples per device per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03  # fraction of the stage's steps
    warmup_steps: Optional[int] = None  # overrides warmup_ratio
    max_grad_norm: Optional[float] = 1.0  # None: no clipping
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    gradient_checkpointing: bool = False
    lora: Optional[LoraConfig] = None  # with LoRA, "llm" in trainable means: the LLM's LoRA adapters
    data: Optional[DataConfig] = None  # this stage's data (default: the run's)

    def validate(self, where: str = "stage") -> None:
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name)),
               f"{where}.name must be a simple folder name (letters, digits, _ . -), got {self.name!r}")
        _check(self.name not in RESERVED_NAMES and not self.name.startswith("bad_records-"),
               f"{where}.name {self.name!r} is the name of a run file; reserved: {', '.join(RESERVED_NAMES)}, "
               "bad_records-*")
        _check(bool(self.trainable), f"{where}.trainable must list at least one of {PARAM_GROUPS}")
        for g in self.trainable:
            _check(g in PARAM_GROUPS, f"{where}.trainable has unknown group {g!r}; expected some of {PARAM_GROUPS}")
        _check(len(set(self.trainable)) == len(self.trainable), f"{where}.trainable repeats a group: {self.trainable}")
        _check(self.learning_rate > 0, f"{where}.learning_rate must be > 0, got {self.learning_rate}")
        for g, lr in self.group_lr.items():
            _check(g in self.trainable, f"{where}.group_lr sets {g!r}, which is not in trainable {self.trainable}")
            _check(lr > 0, f"{where}.group_lr[{g!r}] must be > 0, got {lr}")
        _check(self.weight_decay >= 0, f"{where}.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_steps is None:
            _check(self.epochs > 0, f"{where}.epochs must be > 0, got {self.epochs}")
        else:
            _check(self.max_steps >= 1, f"{where}.max_steps must be >= 1, got {self.max_steps}")
        _check(self.batch_size >= 1, f"{where}.batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"{where}.grad_accum must be >= 1, got {self.grad_accum}")
        _check(0 <= self.warmup_ratio < 1, f"{where}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None:
            _check(self.warmup_steps >= 0, f"{where}.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm is not None:
            _check(self.max_grad_norm > 0, f"{where}.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        _check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
               f"{where}.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.lora is not None:
            _check("llm" in self.trainable, f"{where}.lora adapts the LLM: add 'llm' to trainable (got {self.trainable})")
            self.lora.validate(f"{where}.lora")
        if self.data is not None:
            self.data.validate(f"{where}.data")


@dataclass
class ModelSource:
    """How ``laco train`` builds the model and processor (the Python API takes them as arguments).

    Exactly one of: ``pretrained`` (a saved LaCo model directory with its processor), ``vision`` +
    ``llm`` (pretrained parts on disk, ``LaCoForConditionalGeneration.from_parts``), or ``tiny``
    (``laco.model.testing`` tiny model, random init from ``seed``; its dict overrides config fields).
    """

    pretrained: Optional[str] = None
    vision: Optional[str] = None
    llm: Optional[str] = None
    compression: Optional[dict[str, Any]] = None  # for vision + llm
    projector_type: Optional[str] = None  # for vision + llm
    tiny: Optional[dict[str, Any]] = None

    def validate(self, where: str = "model") -> None:
        kinds = [k for k, on in (("pretrained", self.pretrained is not None), ("vision+llm", self.vision or self.llm),
                                  ("tiny", self.tiny is not None)) if on]
        _check(len(kinds) == 1, f"{where} needs exactly one of 'pretrained', 'vision'+'llm' or 'tiny', got {kinds or 'none'}")
        if kinds == ["vision+llm"]:
            _check(bool(self.vision and self.llm), f"{where}: 'vision' and 'llm' go together (got vision={self.vision!r}, llm={self.llm!r})")
        else:
            _check(self.compression is None and self.projector_type is None,
                   f"{where}: 'compression' and 'projector_type' apply only to vision+llm models")


@dataclass
class RunConfig:
    """A whole run: stages in order, shared data, checkpointing and logging."""

    output_dir: str
    stages: list[StageConfig]
    model: Optional[ModelSource] = None  # required by `laco train`; the Python API takes a model
    data: Optional[DataConfig] = None  # default data of every stage
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs that support it, else fp32
    save_every: int = 500  # optimizer steps between checkpoints (0: only at stage ends)
    keep_checkpoints: int = 2  # newest mid-stage checkpoints kept
    log_every: int = 10  # optimizer steps between metrics lines
    tensorboard: bool = False  # also log to output_dir/tensorboard
    progress: bool = True  # progress bar on the main process
    ddp_find_unused_parameters: bool = False  # true if some batches leave a trainable part unused (text-only)

    def validate(self) -> "RunConfig":
        _check(bool(str(self.output_dir).strip()), "output_dir must not be empty")
        _check(bool(self.stages), "stages must list at least one stage")
        names = [s.name for s in self.stages]
        _check(len(set(names)) == len(names), f"stage names must be unique, got {names}")
        for i, s in enumerate(self.stages):
            s.validate(f"stages[{i}] ({s.name})")
        if self.model is not None:
            self.model.validate()
        if self.data is not None:
            self.data.validate()
        _check(self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}")
        _check(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        return self

    def stage_data(self, stage: StageConfig) -> Optional[DataConfig]:
        """The data config a stage uses: its own, else the run's."""
        return stage.data if stage.data is not None else self.data

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trajectory_dict(self) -> dict[str, Any]:
        """The config without the keys that may change on resume (see ``OPERATIONAL_KEYS``)."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL_KEYS}


# -- dict / YAML conversion -----------------------------------------------------------------------
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value against a type hint (dataclass, list, dict, Optional, Literal, scalars)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise TypeError(f"{where} must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a mapping, got {type(value).__name__} {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .inf / .nan would train forever or nothing
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise TypeError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported config type {_type_name(tp)}")  # pragma: no cover


def from_dict(cls, data: Any, where: str = "config"):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {names}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    return cls(**{k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def load_run_config(source: str | os.PathLike | dict) -> RunConfig:
    """A validated ``RunConfig`` from a YAML file or a dict."""
    import yaml

    if isinstance(source, dict):
        data, where = source, "config"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"run config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
        where = str(path)
    return from_dict(RunConfig, data, where).validate()


def save_run_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the config as YAML (atomically: a temporary file then ``os.replace``)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
