"""``laco compare`` presets: the methods compared, the scenarios, and every setting (``ComparePreset``),
filled by the smoke / quick / full presets and overridden by a YAML/JSON file or keywords."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from laco.compressors.spec import parse_methods as parse_method_specs
from laco.data.embedded import EmbeddedDataConfig
from laco.experiments.pretrain import PretrainConfig

#: readout: compressor alone against the encoder's frozen read-out; train: stage 1 (compressor + projector) then
#: stage 2 (+ LLM), encoder frozen; train_encoder: the same stage 1, then stage 2 also trains the encoder at
#: ``lr_stage2_encoder`` (LLaVA-OneVision's stage 2); retrofit: compressor inserted into the trained `none` model
SCENARIOS = ("readout", "train", "train_encoder", "retrofit")
#: the scenarios that train and score the MLLM (readout trains only the compressor against the encoder's head)
MLLM_SCENARIOS = ("train", "train_encoder", "retrofit")


# -- methods (grammar: laco.compressors.spec) -------------------------------------------------------
#: the fair variants of the baselines (docs/method.md, "Baselines: fair variants"):
PS_AVG_INIT = "pixel_shuffle(avg_pool_init=true,proj=linear)@1/4"  # no shortcut, starts as LaCo does (pooling)
LACO_RANDOM_START = "laco(zero_init=false)@1/4"  # the shortcut, from a random start (as pixel_shuffle's)
LDPV2_RES = "ldpv2(residual=true)@1/4"  # LDPv2 + LaCo's shortcut
TOKENPACKER_RES = "tokenpacker(residual=true)@1/4"  # TokenPacker + LaCo's shortcut

#: the comparison's rows, canonical names (results before #15 spell "laco@post" "ext_laco" and
#: "pixel_shuffle@post" "ext_pixel_shuffle"; both spellings are accepted)
DEFAULT_METHODS = ("none", "pixel_shuffle@post", "laco@post", "laco@1/4", "pixel_shuffle@1/4", PS_AVG_INIT,
                   LACO_RANDOM_START, "avg_pool@1/4", "ldpv2@1/4", LDPV2_RES, "tokenpacker@1/4", TOKENPACKER_RES,
                   "tome@1/4", "laco@1/12", "laco@1/2")
#: the quick preset's rows: the comparisons the paper and its reviewers ask about, in a 10-minute budget
QUICK_METHODS = ("none", "pixel_shuffle@post", "laco@post", "laco@1/4", "pixel_shuffle@1/4", PS_AVG_INIT,
                 LACO_RANDOM_START, "avg_pool@1/4", "ldpv2@1/4", LDPV2_RES)


def parse_methods(spec: str | list[str] | None, ratio: int = 2) -> list[str]:
    """'laco@1/4,ldpv2(residual=true)@1/4' or a list -> canonical method names (default: ``DEFAULT_METHODS``).

    Compressor options are checked here, by building each compressor at a tiny width, so a wrong option
    fails before any data or model is built."""
    from laco.compressors import create_compressor

    specs = parse_method_specs(list(DEFAULT_METHODS) if spec is None else spec)
    for m in specs:
        if m.kwargs:
            try:
                create_compressor(m.compressor, 8, ratio, **dict(m.kwargs))
            except (TypeError, ValueError) as err:
                raise ValueError(f"method {m.name!r}: {err}") from None
    return [m.name for m in specs]


# -- presets ----------------------------------------------------------------------------------------
@dataclass
class LLMConfig:
    """The small Qwen2-structured LLM (built in code) and its tokenizer size."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512  # the small BPE trained on the embedded text


@dataclass
class ComparePreset:
    """Everything ``laco compare`` does; presets fill it, a YAML/JSON file overrides any field."""

    name: str = "quick"
    data: EmbeddedDataConfig = field(default_factory=EmbeddedDataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    # fewer methods in a costly scenario: {"train_encoder": ["none", "laco@1/4"]}; each one of ``methods``
    # (a scenario not named runs every method)
    scenario_methods: dict[str, list[str]] = field(default_factory=dict)
    # a seed s is a replicate: its own pretrained encoder (pretrain.seed = s) and text LLM, its own data order;
    # every module all methods share (the projector) starts from the same draw for every method of a seed
    seeds: list[int] = field(default_factory=lambda: [0])
    ratio: int = 2
    projector_type: str = "mlp2x_gelu"
    # budgets (steps of ``batch_size`` samples)
    batch_size: int = 32
    llm_pretrain_steps: int = 150
    stage1_steps: int = 100
    stage2_steps: int = 150
    retrofit_steps: int = 60
    readout_steps: int = 60  # compressor-only steps against the frozen pretrained read-out
    readout_batch_size: int = 128
    lr_llm_pretrain: float = 2e-3
    lr_stage1: float = 1e-3
    lr_stage2: float = 5e-4
    lr_stage2_encoder: float = 1e-4  # train_encoder's encoder layers (OneVision: 1/5 of the LLM's rate)
    lr_retrofit: float = 1e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    # evaluation (speed is `laco bench`'s job: a 2-core accuracy run's samples/s would be noise)
    eval_split: str = "test"  # "val" while choosing a recipe: test is only for the final numbers
    eval_limit: int | None = None  # eval questions (None: all)
    eval_batch_size: int = 128
    curve_every: int = 0  # train scenario: test accuracy every N stage-2 steps (0: off) -> acc_vs_step.png
    curve_limit: int | None = 600  # test questions per curve point (None: all)
    cache_dtype: str = "float32"  # hidden-state cache; "float16" halves its memory
    threads: int = 2  # torch threads per process; on a busy shared machine 1 is often faster
    workers: int = 1  # processes running methods concurrently (forked; same results as 1); cores / threads
    cache_dir: str | None = None  # default $LACO_CACHE or ~/.cache/laco

    def __post_init__(self) -> None:
        for name, cls in (("data", EmbeddedDataConfig), ("pretrain", PretrainConfig), ("llm", LLMConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        self.methods = parse_methods(self.methods, self.ratio)
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad or not self.scenarios:
            raise ValueError(f"unknown scenario(s) {bad or self.scenarios!r}; choose from {SCENARIOS}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        self.scenario_methods = {sc: self._subset(sc, ms) for sc, ms in self.scenario_methods.items()}
        if self.eval_split not in ("val", "test"):
            raise ValueError(f"eval_split must be 'val' (choosing a recipe) or 'test', got {self.eval_split!r}")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"cache_dtype must be float32, float16 or bfloat16, got {self.cache_dtype!r}")
        if self.pretrain.data.canvas != self.data.canvas:
            raise ValueError(f"pretrain.data.canvas {self.pretrain.data.canvas} != data.canvas {self.data.canvas}")
        if self.curve_every < 0:
            raise ValueError(f"curve_every must be >= 0 (0: no learning curve), got {self.curve_every}")
        for k in ("batch_size", "eval_batch_size", "threads", "workers"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


    def _subset(self, scenario: str, methods: list[str] | str) -> list[str]:
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario_methods: unknown scenario {scenario!r}; choose from {SCENARIOS}")
        names = parse_methods(methods, self.ratio)
        extra = [m for m in names if m not in self.methods]
        if extra or not names:
            raise ValueError(f"scenario_methods[{scenario!r}]: {extra or 'no methods'} not in methods {self.methods}")
        return names

    def methods_for(self, scenario: str) -> list[str]:
        """The methods run in ``scenario``, in ``methods`` order."""
        chosen = self.scenario_methods.get(scenario)
        return [m for m in self.methods if chosen is None or m in chosen]


def _smoke() -> ComparePreset:
    data = EmbeddedDataConfig(num_train=96, num_val=16, num_test=32)
    pre = PretrainConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, steps=4,
                         batch_size=16, pool_size=64, eval_size=32, warmup_steps=2, data=data)
    return ComparePreset(
        name="smoke", data=data, pretrain=pre,
        llm=LLMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=320),
        batch_size=8, llm_pretrain_steps=2, stage1_steps=2, stage2_steps=2, retrofit_steps=2, eval_batch_size=32,
        threads=1,  # tiny ops: a second thread only adds sync overhead
    )


def _quick() -> ComparePreset:
    data = EmbeddedDataConfig(num_train=8000, num_val=500, num_test=600)
    # one thread per process, two processes: these models are small enough that a second thread mostly waits
    # (encoder pretraining: 120 s on one thread, 264 s on two), so two single-thread workers run the methods.
    # The MLLM reads the image only after ~1000 stage-2 steps of 32 at lr 1e-3 (val-split recipe search,
    # docs/compare.md): in 10 minutes that fits the uncompressed model and LaCo; no retrofit (its base must
    # read the image first); the full preset runs the baselines in `train`
    return ComparePreset(name="quick", data=data, pretrain=PretrainConfig(data=data), methods=list(QUICK_METHODS),
                         scenarios=["readout", "train"], scenario_methods={"train": ["none", "laco@1/4"]},
                         stage1_steps=80, stage2_steps=1000, lr_stage2=1e-3, threads=1, workers=2)


#: the full preset's MLLM rows: the methods of the questions the issue asks (LaCo vs pixel-shuffle with either start,
#: LDPv2 / TokenPacker with and without the shortcut, LaCo inside vs after the encoder); `train_encoder` (stage 2
#: with the encoder's backward, the costliest) asks only whether the LaCo vs pixel-shuffle gap survives it
FULL_TRAIN_METHODS = ("none", "laco@post", "laco@1/4", "pixel_shuffle@1/4", PS_AVG_INIT, "ldpv2@1/4", LDPV2_RES,
                      "tokenpacker@1/4", TOKENPACKER_RES)
FULL_TRAIN_ENCODER_METHODS = ("none", "laco@1/4", "pixel_shuffle@1/4")
FULL_RETROFIT_METHODS = ("none", "laco@post", "laco@1/4", "pixel_shuffle@1/4", PS_AVG_INIT, "avg_pool@1/4", "ldpv2@1/4",
                         LDPV2_RES)


def _full() -> ComparePreset:
    data = EmbeddedDataConfig(num_train=12000, num_val=1000, num_test=2000)
    return ComparePreset(
        name="full", data=data, pretrain=PretrainConfig(steps=800, batch_size=96, data=data), seeds=[0, 1, 2], threads=1,
        scenario_methods={"train": list(FULL_TRAIN_METHODS), "train_encoder": list(FULL_TRAIN_ENCODER_METHODS),
                          "retrofit": list(FULL_RETROFIT_METHODS)},
        # the tiny MLLM reads the image after ~1000 stage-2 steps of 32 at lr 1e-3 (val-split recipe search,
        # docs/compare.md): ~1 CPU-hour per seed on one core; run one process per seed and --merge
        stage1_steps=200, stage2_steps=1000, lr_stage2=1e-3, lr_stage2_encoder=2e-4, retrofit_steps=150,
        readout_steps=150, llm_pretrain_steps=300, curve_every=200,  # learning curves: when the MLLM reads the image
    )


PRESETS = {"smoke": _smoke, "quick": _quick, "full": _full}


def _merge(obj: Any, overrides: dict[str, Any], where: str = "") -> Any:
    """A copy of dataclass ``obj`` with ``overrides`` applied recursively; unknown keys are a ValueError."""
    names = {f.name for f in fields(obj)}
    kw = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"unknown config key {where + key!r}; known: {', '.join(sorted(names))}")
        cur = getattr(obj, key)
        kw[key] = _merge(cur, value, f"{where}{key}.") if is_dataclass(cur) and isinstance(value, dict) else value
    out = copy.deepcopy(obj)
    for key, value in kw.items():
        setattr(out, key, value)
    if where == "" and "data" in overrides and "pretrain" not in overrides:
        out.pretrain.data = copy.deepcopy(out.data)  # the encoder sees scenes of the same geometry
    if where == "" and "methods" in overrides and "scenario_methods" not in overrides:
        out.scenario_methods = {}  # methods chosen by hand run in every scenario
    if hasattr(out, "__post_init__"):
        out.__post_init__()  # re-validate
    return out


def load_preset(name: str = "quick", config_file: str | os.PathLike | None = None, **overrides: Any) -> ComparePreset:
    """A preset, then a YAML/JSON config file, then keyword overrides (``methods="laco@1/4"``, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]()
    if config_file is not None:
        from laco.safety import read_yaml

        path = Path(config_file)
        data = read_yaml(path, "compare config") or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file must hold a mapping of preset fields, got {type(data).__name__}: {path}")
        data.pop("preset", None)  # the CLI reads it; the rest overrides fields
        try:
            preset = _merge(preset, data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{err} (in {path})") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return _merge(preset, overrides) if overrides else preset
