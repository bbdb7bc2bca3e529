"""``laco compare``'s pipeline: prepare data, encoder, tokenizer and LLM once (``prepare``), then run every
(method, seed, scenario) (``run_method``, ``run_readout``) and write the results (``run_compare``)."""

from __future__ import annotations

import copy
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from laco.compressors.spec import parse_method
from laco.data.embedded import EmbeddedDataset, build_embedded_dataset
from laco.experiments.compare.presets import ComparePreset
from laco.experiments.compare.results import aggregate, contrasts
from laco.experiments.compare.steps import (
    build_model,
    cache_hidden_states,
    evaluate_cached,
    llm_config,
    measure_throughput,
    start_layer,
    train_steps,
)
from laco.experiments.compare.text import TokenizedSplit, build_tokenizer, conversations, tokenize_split
from laco.experiments.pretrain import load_pretrained_encoder
from laco.flops import encoder_cost
from laco.train.optim import build_optimizer, build_scheduler, freeze_for_stage, optimizer_step

# -- the experiment ---------------------------------------------------------------------------------
@dataclass
class Context:
    """What every run shares: data, tokenizer, pretrained encoder and LLM, caches, tokenised splits."""

    preset: ComparePreset
    ds: EmbeddedDataset
    tok: Any
    encoder: Any
    llm: Any
    encoder_metrics: dict
    readout: Any  # the encoder's pretraining head (quadrant classes), frozen
    hidden: dict[str, dict[int, torch.Tensor]]  # split -> layer -> states
    splits: dict[tuple[str, int], TokenizedSplit]  # (split, image tokens) -> tokens
    timings: dict[str, float] = field(default_factory=dict)


def pretrain_llm(preset: ComparePreset, tok, train_convs) -> Any:
    """The small Qwen2 LLM trained on the training conversations as text only (no image)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        llm = AutoModelForCausalLM.from_config(llm_config(preset.llm, tok))
    text = tokenize_split(tok, train_convs, 0, with_image=False)

    class _TextOnly(nn.Module):  # the interface lm_logits_and_loss expects, without images
        def __init__(self, lm):
            super().__init__()
            self.language_model = lm

        def get_input_embeddings(self):
            return self.language_model.get_input_embeddings()

    wrapper = _TextOnly(llm)
    train_steps(wrapper, list(llm.parameters()), None, 0, text, preset.llm_pretrain_steps, preset.lr_llm_pretrain,
                preset, seed=12345, desc="pretraining LLM on text")
    return llm.eval()


def prepare(preset: ComparePreset, *, log=print) -> Context:
    """Data, encoder (cached on disk), tokenizer, text-pretrained LLM, hidden-state caches, tokenised splits."""
    torch.set_num_threads(preset.threads)
    timings = {}
    t = time.perf_counter()
    ds = build_embedded_dataset(preset.data, Path(preset.cache_dir) / "data" / _data_name(preset)
                                if preset.cache_dir else None)
    timings["data_s"] = time.perf_counter() - t
    if ds.source != "fashion_mnist":
        log("[yellow]Fashion-MNIST is not installed: using PIL-generated scenes "
            "(apt-get install dataset-fashion-mnist for the real images)[/yellow]")
    log(f"data: {ds.source} scenes in {ds.root} (train {len(ds.scenes['train'])}, test {len(ds.scenes['test'])})")
    t = time.perf_counter()
    encoder, readout, enc_metrics = load_pretrained_encoder(preset.cache_dir, preset.pretrain, with_head=True)
    timings["encoder_s"] = time.perf_counter() - t
    log(f"pretrained encoder: quadrant accuracy {enc_metrics['quadrant_acc']}%, dot {enc_metrics['dot_acc']}% "
        f"(held-out scenes; pretraining took {enc_metrics['train_seconds']} s, once)")
    t = time.perf_counter()
    train_convs = conversations(ds, "train")
    test_convs = conversations(ds, "test")
    tok = build_tokenizer(ds, preset.llm.vocab_size)
    llm = pretrain_llm(preset, tok, train_convs)
    timings["llm_pretrain_s"] = time.perf_counter() - t
    # which encoder states the methods start from, and how many image tokens each gives
    specs = {m: parse_method(m) for m in {*preset.methods, "none"}}
    starts, tokens = set(), set()
    with torch.device("meta"):
        for spec in specs.values():
            m = build_model(spec, preset, _meta_like(encoder), _meta_like(llm), tok, 0)
            starts.add(start_layer(m))
            tokens.add(m.num_image_tokens)
    t = time.perf_counter()
    dtype = getattr(torch, preset.cache_dtype)
    hidden = {s: cache_hidden_states(encoder, ds.scenes[s].images, sorted(starts), dtype=dtype, desc=f"caching {s} states")
              for s in ("train", "test")}
    timings["cache_s"] = time.perf_counter() - t
    splits = {}
    for n in sorted(tokens):
        splits[("train", n)] = tokenize_split(tok, train_convs, n)
        splits[("test", n)] = tokenize_split(tok, test_convs, n)
    for q in [*encoder.parameters(), *readout.parameters()]:
        q.requires_grad_(False)
    return Context(preset, ds, tok, encoder, llm, enc_metrics, readout, hidden, splits, timings)


def _data_name(preset: ComparePreset) -> str:
    from laco.data.embedded import get_item_source

    src = get_item_source(preset.data.source).name
    return f"{src}-{preset.data.key(src)}"


def _meta_like(module):
    """A meta-device copy (config only) for shape bookkeeping."""
    with torch.device("meta"):
        return type(module)(copy.deepcopy(module.config))


def run_method(ctx: Context, name: str, seed: int, scenario: str, base=None) -> tuple[dict[str, Any], Any]:
    """One (method, seed, scenario) run -> (result row, trained model)."""
    p, spec = ctx.preset, parse_method(name)
    tag = f"{scenario} {name} s{seed}"
    model = build_model(spec, p, ctx.encoder, ctx.llm, ctx.tok, seed)
    if scenario == "retrofit":
        if base is None:
            raise ValueError("retrofit needs the trained uncompressed base model")
        state = {k: v for k, v in base.state_dict().items() if ".compressors." not in k}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(".compressors." not in k for k in missing):
            raise RuntimeError(f"retrofit load mismatch: missing {missing}, unexpected {unexpected}")
    start = start_layer(model)
    n_tok = model.num_image_tokens
    train, test = ctx.splits[("train", n_tok)], ctx.splits[("test", n_tok)]
    h_train, h_test = ctx.hidden["train"][start], ctx.hidden["test"][start]
    row: dict[str, Any] = {"method": name, "scenario": scenario, "seed": seed, "compressor": spec.compressor,
                           "layer": spec.layer, "merge_layer": start if spec.compressor != "none" else None}
    t0 = time.perf_counter()
    if scenario == "train":
        params = freeze_for_stage(model, ["compressor", "projector"])
        sps1 = train_steps(model, params, h_train, start, train, p.stage1_steps, p.lr_stage1, p, seed, f"{tag} stage 1")
        params = freeze_for_stage(model, ["compressor", "projector", "llm"])
        curve: list[list[float]] = []

        def record(step: int) -> None:  # test accuracy during stage 2 (a learning curve, not model selection)
            if p.curve_every and (step % p.curve_every == 0 or step == p.stage2_steps):
                acc = evaluate_cached(model, h_test, start, test, p.eval_batch_size, p.curve_limit)["accuracy"]
                curve.append([p.stage1_steps + step, acc])

        sps2 = train_steps(model, params, h_train, start, train, p.stage2_steps, p.lr_stage2, p, seed + 1,
                           f"{tag} stage 2", on_step=record)
        row["cached_train_samples_per_s"] = round(sps2, 1)
        if curve:
            row["curve"] = curve
    else:
        row["before"] = evaluate_cached(model, h_test, start, test, p.eval_batch_size, p.eval_limit)
        # parameter-free compressors (avg_pool, tome) have nothing to retrofit: freeze all, train nothing
        if any(True for _ in model.vision_tower.compressors.parameters()):
            params = freeze_for_stage(model, ["compressor"])
        else:
            model.requires_grad_(False)
            params = []
        sps = train_steps(model, params, h_train, start, train, p.retrofit_steps, p.lr_retrofit, p, seed, f"{tag}")
        row["cached_train_samples_per_s"] = None if math.isnan(sps) else round(sps, 1)
    row["train_seconds"] = round(time.perf_counter() - t0, 1)
    row["after"] = evaluate_cached(model, h_test, start, test, p.eval_batch_size, p.eval_limit)
    row["trainable_params"] = sum(q.numel() for q in params)
    row.update(_costs(model))
    row.update(measure_throughput(model, ctx.ds.scenes["test"].images, test, params, p.timing_batches, p.timing_batch_size))
    for q in model.parameters():
        q.requires_grad_(False)
    return row, model


def _readout_accuracy(ctx: Context, tower, start: int, split: str, limit: int | None = None) -> dict[str, Any]:
    """Quadrant-classification accuracy (%) of the frozen pretrained read-out on the (compressed) tokens."""
    scenes = ctx.ds.scenes[split]
    n = len(scenes) if limit is None else min(limit, len(scenes))
    hidden, correct = ctx.hidden[split][start], 0
    tower.eval()
    with torch.no_grad():
        for i in range(0, n, 256):
            out = tower.forward_from(hidden[i:min(n, i + 256)].float(), tower.adapter.grid_for_image_size(), start)
            logits, _ = ctx.readout(out.last_hidden_state[:, tower.num_prefix_tokens:], out.grid)
            correct += int((logits.argmax(-1) == torch.as_tensor(scenes.labels[i:min(n, i + 256)])).sum())
    return {"accuracy": round(100.0 * correct / (4 * n), 2), "n": 4 * n, "per_task": {"quadrant": round(100.0 * correct / (4 * n), 2)},
            "per_turn": {}}


def run_readout(ctx: Context, name: str, seed: int) -> dict[str, Any]:
    """The feasibility study's protocol on the same encoder: insert the compressor, train only it against the
    frozen pretrained quadrant read-out (the consumer is pretrained and frozen, like a frozen LLM)."""
    from tqdm.auto import tqdm

    from laco.encoders import compress_encoder

    p, spec = ctx.preset, parse_method(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = compress_encoder(ctx.encoder, spec.compressor, layer=spec.layer, ratio=p.ratio,
                                 **dict(spec.kwargs)) if spec.compressor != "none" else compress_encoder(ctx.encoder, "none")
    start = min(tower.merge_layers, default=tower.num_layers)
    row: dict[str, Any] = {"method": name, "scenario": "readout", "seed": seed, "compressor": spec.compressor,
                           "layer": spec.layer, "merge_layer": start if spec.compressor != "none" else None}
    row["before"] = _readout_accuracy(ctx, tower, start, "test", p.eval_limit)
    params = list(tower.compressors.parameters())
    t0 = time.perf_counter()
    if params and p.readout_steps > 0:
        for q in params:
            q.requires_grad_(True)
        opt = build_optimizer(params, lr=p.lr_stage1, weight_decay=p.weight_decay)
        sched = build_scheduler(opt, p.readout_steps, warmup_steps=max(1, int(p.warmup_fraction * p.readout_steps)))
        gen = torch.Generator().manual_seed(seed)
        hidden, labels = ctx.hidden["train"][start], torch.as_tensor(ctx.ds.scenes["train"].labels)
        tower.train()
        for step in tqdm(range(p.readout_steps), desc=f"readout {name} s{seed}", leave=False):
            idx = torch.randint(0, len(hidden), (p.readout_batch_size,), generator=gen)
            out = tower.forward_from(hidden[idx].float(), tower.adapter.grid_for_image_size(), start)
            logits, _ = ctx.readout(out.last_hidden_state[:, tower.num_prefix_tokens:], out.grid)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels[idx].flatten())
            optimizer_step(loss, opt, sched)  # no clipping: the read-out protocol's
        for q in params:
            q.requires_grad_(False)
    row["train_seconds"] = round(time.perf_counter() - t0, 1)
    row["after"] = _readout_accuracy(ctx, tower, start, "test", p.eval_limit)
    row["trainable_params"] = sum(q.numel() for q in params)
    row["cached_train_samples_per_s"] = None
    cost = encoder_cost(tower)
    row.update({"visual_tokens": tower.num_output_tokens(), "encoder_gflops": round(cost.total_flops / 1e9, 4),
                "encoder_flop_ratio": round(cost.flop_ratio, 3), "num_layers": tower.num_layers,
                "train_samples_per_s": None, "infer_samples_per_s": None})
    return row


def _costs(model) -> dict[str, Any]:
    cost = encoder_cost(model.vision_tower)
    return {"visual_tokens": model.num_image_tokens, "encoder_gflops": round(cost.total_flops / 1e9, 4),
            "encoder_flop_ratio": round(cost.flop_ratio, 3), "num_layers": model.vision_tower.num_layers}


def run_compare(preset: ComparePreset, out_dir: str | os.PathLike, *, command: str | None = None,
                log=print) -> dict[str, Any]:
    """The whole experiment; writes results.json, results.md, the plots and command.txt into ``out_dir``."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = prepare(preset, log=log)
    runs = []
    mllm = [s for s in preset.scenarios if s != "readout"]
    for seed in preset.seeds:
        if "readout" in preset.scenarios:
            for name in preset.methods:
                row = run_readout(ctx, name, seed)
                runs.append(row)
                log(f"  readout  {name:18s} seed {seed}: quadrant acc {row['after']['accuracy']:.1f} "
                    f"(before {row['before']['accuracy']:.1f})")
        if not mllm:
            continue
        base_row, base = run_method(ctx, "none", seed, "train")
        log(f"  train    {'none':18s} seed {seed}: acc {base_row['after']['accuracy']:.1f} (the retrofit base)")
        if "train" in preset.scenarios and "none" in preset.methods:
            runs.append(base_row)
        if "retrofit" in preset.scenarios and "none" in preset.methods:
            runs.append({**base_row, "scenario": "retrofit", "before": base_row["after"], "trainable_params": 0,
                         "train_seconds": 0.0, "cached_train_samples_per_s": None, "train_samples_per_s": None})
        for name in preset.methods:
            if name == "none":
                continue
            for scenario in mllm:
                row, _ = run_method(ctx, name, seed, scenario, base=base)
                runs.append(row)
                log(f"  {scenario:8s} {name:18s} seed {seed}: acc {row['after']['accuracy']:.1f}"
                    + (f" (before {row['before']['accuracy']:.1f})" if "before" in row else ""))
    ctx.timings["total_s"] = time.perf_counter() - t_start
    results = {
        "preset": preset.name, "config": asdict(preset), "data_source": ctx.ds.source, "data_dir": str(ctx.ds.root),
        "encoder": {"pretrain_metrics": ctx.encoder_metrics, "config": ctx.encoder.config.to_dict()},
        "timings_s": {k: round(v, 1) for k, v in ctx.timings.items()},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                        "machine": platform.machine()},
        "command": command, "runs": runs, "table": aggregate(runs), "contrasts": contrasts(runs),
    }
    from laco.experiments.report import write_report

    write_report(results, out)
    return results
