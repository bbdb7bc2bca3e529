"""``laco bench``'s runner: build one LaCo MLLM per method at a preset's shape, time every part, interleaved.

All methods share one vision encoder, one projector and one LLM (random init, real shapes); each method
is a ``LaCoForConditionalGeneration`` whose ``vision_tower`` wraps the shared encoder with its own
compressors (``compress_encoder`` shares the encoder's tensors). So N methods cost one model's memory
plus N small compressors, and one AdamW state serves every method (parameters without a gradient in
a step are skipped by the optimizer).

Parts timed per method (the keys of ``PARTS``):

=================  =================================================================================
``encoder``        ``vision_tower(pixel_values)``: encoder layers + merge(s)
``compressor``     the merge module(s) alone, on inputs of the shape they see inside the encoder
``projector``      the projector alone on the encoder's output
``prefill``        the LLM alone on the merged embeddings, ``logits_to_keep=1``, building the KV cache
``encode_prefill`` the whole model, ``input_ids`` + ``pixel_values`` -> first-token logits (time to first token)
``decode``         ``new_tokens`` greedy steps of the LLM with the KV cache (the cache is cropped back after)
``generate``       ``model.generate(..., max_new_tokens=new_tokens)``: end to end
``train_stage1``   forward + backward + AdamW step, compressor + projector trainable (encoder, LLM frozen)
``train_stage2``   the same with every parameter trainable
=================  =================================================================================
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from laco.bench.flops import STAGES, Workload, predict
from laco.bench.presets import llm_config
from laco.bench.timers import Case, Splits, Timer, environment, loadavg, run_cases
from laco.compressors.spec import MethodSpec, parse_methods
from laco.model.compat import CACHE_KEY, output_cache
from laco.train.optim import build_optimizer, freeze_for_stage

PARTS = ("encoder", "compressor", "projector", "prefill", "encode_prefill", "decode", "generate",
         "train_stage1", "train_stage2")
INFERENCE_PARTS = PARTS[:7]
TRAIN_PARTS = PARTS[7:]


@dataclass
class BenchConfig:
    """Everything a benchmark run depends on (recorded in the result file)."""

    vision: str = "siglip-so400m-384"
    llm: str = "qwen2-0.5b"
    methods: str = "none,laco@post,laco@1/4,laco@1/2"
    baseline: str | None = None  # speedups are relative to it; default "laco@post" if benchmarked, else the first
    ratio: int = 2
    compressor_kwargs: dict[str, Any] = field(default_factory=dict)
    projector_type: str = "mlp2x_gelu"
    work: Workload = field(default_factory=Workload)
    parts: tuple[str, ...] = PARTS
    warmup: int = 1
    repeats: int = 3
    device: str = "cpu"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    threads: int | None = None  # CPU threads (torch.set_num_threads); None leaves torch's default
    attn_implementation: str = "sdpa"
    lr: float = 1e-8  # tiny: the weights barely move, so the numerics stay the same across repeats
    max_load: float | None = None  # wait before each round until the 1-min load average is at most this
    max_wait_s: float = 600.0  # ... for at most this long; then the round runs and is flagged
    load_threshold: float | None = None  # rounds above it are flagged in the report (default 1.5 x CPUs)
    seed: int = 0

    def __post_init__(self):
        self.specs: list[MethodSpec] = parse_methods(self.methods)
        names = [s.name for s in self.specs]
        if self.baseline is None:
            self.baseline = "laco@post" if "laco@post" in names else names[0]
        else:
            self.baseline = parse_methods(self.baseline)[0].name
            if self.baseline not in names:
                raise ValueError(f"baseline {self.baseline!r} is not among the methods {names}")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"unknown parts {unknown or self.parts}; choose from {', '.join(PARTS)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        for name in ("max_load", "load_threshold"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.load_threshold is None:
            self.load_threshold = self.max_load if self.max_load is not None else 1.5 * (os.cpu_count() or 1)

    @property
    def torch_device(self) -> torch.device:
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        return dev

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [s.name for s in self.specs]
        d["parts"] = list(self.parts)
        d["dtype"] = str(self.torch_dtype).removeprefix("torch.")
        return d


# -- building ---------------------------------------------------------------------------------------
def laco_config(cfg: BenchConfig, spec: MethodSpec):
    """The ``LaCoConfig`` of one method at the presets' shapes."""
    from laco.encoders import vision_config
    from laco.model import LaCoConfig

    text = llm_config(cfg.llm)
    compression = {**spec.compression, "ratio": cfg.ratio, "kwargs": dict(cfg.compressor_kwargs)}
    config = LaCoConfig(
        vision_config=vision_config(cfg.vision).to_dict(),
        text_config=text.to_dict(),
        compression=compression,
        projector_type=cfg.projector_type,
        image_token_id=text.vocab_size - 1,  # any id works for random weights; the last is never sampled as text
    )
    config._attn_implementation = cfg.attn_implementation
    for sub in (config.vision_config, config.text_config):
        sub._attn_implementation = cfg.attn_implementation
    return config


def build_models(cfg: BenchConfig, *, meta: bool = False) -> dict[str, nn.Module]:
    """One ``LaCoForConditionalGeneration`` per method, all sharing the encoder, projector and LLM.

    ``meta=True``: shapes only (no memory, no init time), for the FLOP model alone.
    """
    from laco.model import LaCoForConditionalGeneration
    from laco.model.modeling import build_vision_tower

    torch.manual_seed(cfg.seed)
    models: dict[str, nn.Module] = {}
    shared = None
    for spec in cfg.specs:
        config = laco_config(cfg, spec)
        if shared is None:
            if meta:
                with torch.device("meta"):
                    shared = LaCoForConditionalGeneration(config)
            else:
                # initialised on the target device (a 7B LLM's random init on the host takes minutes, on a GPU
                # seconds), in float32 as in the parts' own init, then cast
                with torch.device(cfg.torch_device):
                    shared = LaCoForConditionalGeneration(config)
                shared.to(dtype=cfg.torch_dtype)
            model = shared
        else:
            with torch.device("meta"):  # skeleton only: every module is replaced below
                model = LaCoForConditionalGeneration(config)
            model.vision_tower = build_vision_tower(config, shared.vision_tower.vision_model)
            model.projector = shared.projector
            model.set_decoder(shared.get_decoder())
            model.lm_head = shared.lm_head
        models[spec.name] = model.eval()
    return models


# -- inputs -----------------------------------------------------------------------------------------
def make_inputs(model: nn.Module, work: Workload, device: torch.device, dtype: torch.dtype,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random pixels and token ids: per sample, each image's ``num_image_tokens`` placeholders, then text."""
    cfg = model.config
    size = cfg.image_size
    h, w = (size, size) if isinstance(size, int) else size
    pixels = torch.randn(work.num_images, cfg.vision_config.num_channels, h, w, generator=generator)
    image_ids = torch.full((work.batch_size, work.images_per_sample * model.num_image_tokens), cfg.image_token_id)
    text_ids = torch.randint(0, cfg.image_token_id, (work.batch_size, work.text_tokens), generator=generator)
    input_ids = torch.cat([image_ids, text_ids], dim=1)  # (B, seq)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids, device=device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
    }


# -- cases ------------------------------------------------------------------------------------------
def _compressor_inputs(model: nn.Module, pixel_values: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor, tuple]]:
    """(compressor, its input patch tokens, grid) for every merge, captured with forward pre-hooks."""
    captured: list[tuple[nn.Module, torch.Tensor, tuple]] = []
    hooks = [c.register_forward_pre_hook(lambda m, args: captured.append((m, args[0].detach().clone(), args[1])))
             for c in model.vision_tower.compressors.values()]
    try:
        with torch.inference_mode():
            model.vision_tower(pixel_values)
    finally:
        for h in hooks:
            h.remove()
    return captured


def method_cases(name: str, model: nn.Module, inputs: dict[str, torch.Tensor],
                 work: Workload, parts: tuple[str, ...], optimizer: torch.optim.Optimizer | None) -> list[Case]:
    """The timed cases of one method (only the requested parts; ``compressor`` only if it has merges)."""
    px, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    timer = Timer(px.device)
    cases: list[Case] = []

    def infer(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run():
            model.eval()
            with torch.inference_mode():
                return fn()
        return run

    if "encoder" in parts:
        cases.append(Case(name, "encoder", infer(lambda: model.vision_tower(px))))
    if "compressor" in parts and len(model.vision_tower.compressors):
        merges = _compressor_inputs(model, px)
        cases.append(Case(name, "compressor", infer(lambda: [c(x, g) for c, x, g in merges])))
    if {"projector", "prefill", "decode"} & set(parts):
        with torch.inference_mode():
            feats = model.vision_tower(px)
            feats = feats.last_hidden_state[:, feats.num_prefix_tokens if model.config.vision_feature_select_strategy
                                            == "default" else 0:]
            embeds = model.merge_image_features(ids, model.get_input_embeddings()(ids), model.projector(feats))
        if "projector" in parts:
            cases.append(Case(name, "projector", infer(lambda: model.projector(feats))))
        if "prefill" in parts:
            cases.append(Case(name, "prefill", infer(
                lambda: model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1))))
        if "decode" in parts:
            with torch.inference_mode():
                first = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
            cache, seq = output_cache(first), embeds.shape[1]
            start_token = first.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)

            def decode():
                tok, m = start_token, mask
                for _ in range(work.new_tokens):
                    m = torch.cat([m, torch.ones_like(tok)], dim=1)
                    out = model(input_ids=tok, attention_mask=m, use_cache=True, logits_to_keep=1,
                                **{CACHE_KEY: cache})
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)

            def drop_new_tokens():  # back to the prompt's cache (transformers 5: crop takes -tokens to remove)
                cache.crop(-(cache.get_seq_length() - seq))

            cases.append(Case(name, "decode", infer(decode), reset=drop_new_tokens))
    if "encode_prefill" in parts:
        cases.append(Case(name, "encode_prefill", infer(
            lambda: model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True, logits_to_keep=1))))
    if "generate" in parts:
        gen_kw = dict(max_new_tokens=work.new_tokens, min_new_tokens=work.new_tokens, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
        cases.append(Case(name, "generate", infer(
            lambda: model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **gen_kw))))
    for stage in STAGES:
        part = f"train_{stage}"
        if part not in parts:
            continue
        if optimizer is None:
            raise ValueError("training parts need an optimizer")

        def forward_backward():
            model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=ids).loss.backward()

        def optimizer_step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def step(stage=stage):
            # the methods share the encoder and LLM modules: set requires_grad for this one before each step
            freeze_for_stage(model, sorted(STAGES[stage]))
            model.train()
            # timed in two phases (the optimizer is memory-bound work the FLOP model does not count)
            return Splits(forward_backward=timer.time(forward_backward)[0], optimizer=timer.time(optimizer_step)[0])

        cases.append(Case(name, part, step))
    return cases


def _optimizer(models: dict[str, nn.Module], lr: float) -> torch.optim.Optimizer:
    params, seen = [], set()
    for m in models.values():
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    # fused: one kernel per step, no full-size temporaries (foreach AdamW is ~6x slower on CPU and allocates a
    # parameter-sized buffer for the denominator); HF Trainer's "adamw_torch_fused" is the same optimizer
    return build_optimizer(params, lr=lr, weight_decay=0.0, fused=True)


# -- the run ----------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    config: dict[str, Any]
    environment: dict[str, Any]
    command: str
    predicted: dict[str, dict[str, Any]]  # method -> FLOP predictions (see laco.bench.flops.predict)
    measured: list[dict[str, Any]]  # one record per (method, part)
    rounds: list[dict[str, Any]]  # one RoundRecord per round (load, wall, CPU time), warm-up rounds included
    models: dict[str, dict[str, Any]]  # method -> tokens, params
    profiles: dict[str, str] = field(default_factory=dict)  # method -> profiler table of the encoder

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_benchmark(cfg: BenchConfig, *, progress: bool = True, command: str | None = None,
                  profile: bool = False) -> BenchResult:
    """Build the models, time every (method, part) interleaved, and return raw results with FLOP predictions.

    ``profile``: also record a torch.profiler op table of one encoder forward per method (``result.profiles``).
    """
    if cfg.work.image_size is not None:
        raise ValueError("an AnyRes image size is predicted only (laco bench --dry-run --image-size); "
                         "the timed runner feeds one input of the encoder's size per image")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device, dtype = cfg.torch_device, cfg.torch_dtype
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals can slow CPU kernels by orders of magnitude
    env = environment(device)
    models = build_models(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    train = any(p in TRAIN_PARTS for p in cfg.parts)
    optimizer = _optimizer(models, cfg.lr) if train else None
    cases, predicted, info = [], {}, {}
    for name, model in models.items():
        inputs = make_inputs(model, cfg.work, device, dtype, gen)
        cases += method_cases(name, model, inputs, cfg.work, cfg.parts, optimizer)
        include_prefix = model.config.vision_feature_select_strategy == "full"
        predicted[name] = predict(model.vision_tower, model.projector, model.config.text_config, cfg.work,
                                  model.config.image_size, include_prefix)
        info[name] = {
            "num_image_tokens": model.num_image_tokens,
            "sequence_length": inputs["input_ids"].shape[1],
            "merge_layers": model.vision_tower.merge_layers,
            "encoder_layers": model.vision_tower.num_layers,
            "params": {g: sum(p.numel() for p in ps) for g, ps in model.parameter_groups().items()},
        }
    cases.sort(key=lambda c: PARTS.index(c.part))  # canonical part order (stable: methods keep their order)
    results, rounds = run_cases(cases, warmup=cfg.warmup, repeats=cfg.repeats, device=device, progress=progress,
                                max_load=cfg.max_load, max_wait_s=cfg.max_wait_s)
    env["loadavg_end"] = loadavg()
    profiles = profile_encoder(models, cfg) if profile else {}
    return BenchResult(
        config=cfg.to_dict(),
        environment=env,
        command=command if command is not None else " ".join(["laco", *sys.argv[1:]]),
        predicted=predicted,
        measured=[r.to_dict() for r in results],
        rounds=[r.to_dict() for r in rounds],
        models=info,
        profiles=profiles,
    )


def predict_all(cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """The FLOP model of every method, without building weights (meta device)."""
    out = {}
    for name, model in build_models(cfg, meta=True).items():
        include_prefix = model.config.vision_feature_select_strategy == "full"
        out[name] = predict(model.vision_tower, model.projector, model.config.text_config, cfg.work,
                            model.config.image_size, include_prefix)
    return out


def profile_encoder(models: dict[str, nn.Module], cfg: BenchConfig, row_limit: int = 25) -> dict[str, str]:
    """torch.profiler op tables (self time) of one encoder forward per method, for finding copies and permutes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.torch_device.type == "cuda" else [])
    gen = torch.Generator().manual_seed(cfg.seed)
    tables = {}
    for name, model in models.items():
        px = make_inputs(model, cfg.work, cfg.torch_device, cfg.torch_dtype, gen)["pixel_values"]
        with torch.inference_mode():
            model.vision_tower(px)  # warm-up
            with profile(activities=activities) as prof:
                model.vision_tower(px)
        key = "self_device_time_total" if cfg.torch_device.type == "cuda" else "self_cpu_time_total"
        tables[name] = prof.key_averages().table(sort_by=key, row_limit=row_limit)
    return tables


__all__ = ["BenchConfig", "BenchResult", "PARTS", "build_models", "make_inputs", "method_cases", "run_benchmark",
           "predict_all", "profile_encoder", "laco_config"]
