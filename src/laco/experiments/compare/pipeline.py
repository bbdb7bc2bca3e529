"""``laco compare``'s pipeline: data and tokenizer once (``prepare_data``), then per seed a replicate
(``prepare``: its own pretrained encoder and text LLM, hidden-state caches) on which every (method,
scenario) runs (``run_train``, ``run_retrofit``, ``run_readout``), and the results (``run_compare``)."""

from __future__ import annotations

import copy
import dataclasses
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
from laco.experiments.compare.parallel import progress_enabled, run_jobs
from laco.experiments.compare.presets import MLLM_SCENARIOS, ComparePreset
from laco.experiments.compare.results import aggregate, baseline_rows, contrasts
from laco.experiments.compare.steps import (
    build_model,
    cache_hidden_states,
    derive_seed,
    evaluate_cached,
    evaluate_text_only,
    llm_config,
    start_layer,
    train_steps,
)
from laco.experiments.compare.text import TokenizedSplit, build_tokenizer, conversations, tokenize_split
from laco.experiments.compare import userdata
from laco.experiments.compare.userdata import UserSource
from laco.experiments.pretrain import load_pretrained_encoder, to_pixel_values
from laco.flops import encoder_cost
from laco.train.optim import build_optimizer, build_scheduler, freeze_for_stage, optimizer_step, param_groups


# -- what every seed shares: data, tokenizer, tokenised splits, the blind baseline ---------------------------
@dataclass
class Shared:
    """The data side of the experiment: the same for every seed."""

    preset: ComparePreset
    ds: EmbeddedDataset
    tok: Any
    splits: dict[tuple[str, int], TokenizedSplit]  # (split, image tokens) -> tokens; 0 tokens = text only
    starts: list[int]  # the encoder layers whose states the methods start from (cached per seed)
    blind: dict[str, Any] | None  # laco.eval.blind on the eval split (None: readout only)
    timings: dict[str, float] = field(default_factory=dict)
    user: UserSource | None = None  # --data: the user's files and models (userdata.py)


@dataclass
class Context:
    """One replicate (seed): the shared data plus its pretrained encoder and LLM and their caches."""

    preset: ComparePreset
    seed: int
    ds: EmbeddedDataset
    tok: Any
    encoder: Any
    llm: Any  # None when the preset runs only the readout scenario
    encoder_metrics: dict
    readout: Any  # the encoder's pretraining head (quadrant classes), frozen; None for --vision
    hidden: dict[str, dict[int, torch.Tensor]]  # split -> layer -> states
    splits: dict[tuple[str, int], TokenizedSplit]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def eval_split(self) -> str:
        return self.preset.eval_split


def _vision_meta(preset: ComparePreset, user: UserSource | None = None):
    from transformers import AutoModel

    config = userdata.vision_config(user.vision) if user and user.vision else preset.pretrain.vision_config()
    with torch.device("meta"):
        return AutoModel.from_config(config)


def _llm_meta(preset: ComparePreset, tok, user: UserSource | None = None):
    from transformers import AutoModelForCausalLM

    config = userdata.llm_config_from_disk(user.llm, tok) if user and user.llm else llm_config(preset.llm, tok)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def prepare_data(preset: ComparePreset, *, user: UserSource | None = None, log=print) -> Shared:
    """Data (cached on disk; or the user's, ``user``), tokenizer, the splits tokenised at every image-token count,
    the blind baseline."""
    from laco.eval.blind import blind_baseline

    torch.set_num_threads(preset.threads)
    t = time.perf_counter()
    if user is not None:
        ds = userdata.load_user_dataset(user, preset, log=log)
    else:
        ds = build_embedded_dataset(preset.data, Path(preset.cache_dir) / "data" / _data_name(preset)
                                    if preset.cache_dir else None)
        if ds.source != "fashion_mnist":
            log("[yellow]Fashion-MNIST is not installed: using PIL-generated scenes "
                "(apt-get install dataset-fashion-mnist for the real images)[/yellow]")
        log(f"data: {ds.source} scenes in {ds.root} (train {len(ds.scenes['train'])}, "
            f"{preset.eval_split} {len(ds.scenes[preset.eval_split])})")
    tok = userdata.load_tokenizer(user.llm) if user and user.llm else build_tokenizer(ds, preset.llm.vocab_size)
    convs = {s: conversations(ds, s) for s in ("train", preset.eval_split)}
    # how many image tokens each method gives the LLM, and after which encoder layer its trainable part starts
    # (config only: meta-device modules); train_encoder trains every layer, so it starts at 0
    vision, llm = _vision_meta(preset, user), _llm_meta(preset, tok, user)
    tokens, starts = set(), {0} if "train_encoder" in preset.scenarios else set()
    with torch.device("meta"):
        for m in {*preset.methods, "none"}:
            model = build_model(parse_method(m), preset, vision, llm, tok, 0, load_weights=False)
            tokens.add(model.num_image_tokens)
            starts.add(start_layer(model))
    if not _has_mllm(preset):  # readout only: no LLM, so no token splits and no blind row
        return Shared(preset, ds, tok, {}, sorted(starts), None, {"data_s": time.perf_counter() - t}, user)
    splits = {(s, n): tokenize_split(tok, convs[s], n) for s in convs for n in sorted(tokens)}
    splits.update({(s, 0): tokenize_split(tok, convs[s], 0, with_image=False) for s in convs})
    blind = blind_baseline(ds.train_file, ds.eval_file(preset.eval_split), ds.eval_image_dir).as_dict()
    blind.pop("predictions", None)
    log(f"blind baseline (most frequent training answer per question): {blind['accuracy']:.1f}% on {preset.eval_split}")
    return Shared(preset, ds, tok, splits, sorted(starts), blind, {"data_s": time.perf_counter() - t}, user)


def _has_mllm(preset: ComparePreset) -> bool:
    return any(s in MLLM_SCENARIOS for s in preset.scenarios)


def pretrain_llm(preset: ComparePreset, tok, text: TokenizedSplit, seed: int) -> Any:
    """The seed's small Qwen2 LLM, trained on the training conversations as text only (no image)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "llm"))
        llm = AutoModelForCausalLM.from_config(llm_config(preset.llm, tok))
    train_steps(llm, list(llm.parameters()), None, 0, text, preset.llm_pretrain_steps, preset.lr_llm_pretrain,
                preset, seed=derive_seed(seed, "llm-order"), desc=f"pretraining LLM on text (seed {seed})")
    return llm.eval()


def prepare(preset: ComparePreset, seed: int | None = None, shared: Shared | None = None, *, log=print) -> Context:
    """Replicate ``seed`` (default: the preset's first): its encoder (pretrained with ``pretrain.seed = seed``,
    cached on disk), its text-pretrained LLM, and the frozen encoder's states where the methods start."""
    seed = preset.seeds[0] if seed is None else seed
    shared = shared or prepare_data(preset, log=log)
    timings = dict(shared.timings)
    t = time.perf_counter()
    user = shared.user
    if user is not None and user.vision is not None:  # the same encoder for every seed
        encoder, readout, enc_metrics = userdata.load_vision(user.vision), None, {"source": str(user.vision)}
        log(f"seed {seed}: vision encoder {type(encoder).__name__} from {user.vision}")
    else:
        pre = dataclasses.replace(preset.pretrain, seed=seed)
        encoder, readout, enc_metrics = load_pretrained_encoder(preset.cache_dir, pre, with_head=True)
        log(f"seed {seed}: pretrained encoder, quadrant accuracy {enc_metrics['quadrant_acc']}%, dot "
            f"{enc_metrics['dot_acc']}% (held-out scenes; pretraining took {enc_metrics['train_seconds']} s, once)")
    timings["encoder_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if user is not None and user.llm is not None:  # the same LLM for every seed
        llm = userdata.load_llm(user.llm, shared.tok)
    else:
        llm = pretrain_llm(preset, shared.tok, shared.splits[("train", 0)], seed) if _has_mllm(preset) else None
    timings["llm_pretrain_s"] = time.perf_counter() - t
    t = time.perf_counter()
    dtype = getattr(torch, preset.cache_dtype)
    if user is not None:  # image files -> pixels: the --vision folder's processor, or resized for the embedded encoder
        shared.ds.to_pixels = (userdata.processor_pixels(user.vision, encoder.config.image_size) if user.vision
                               else userdata.resized_pixels(encoder.config.image_size))
    sources = {s: shared.ds.pixel_source(s) if user is not None else (shared.ds.scenes[s].images, to_pixel_values)
               for s in ("train", preset.eval_split)}
    hidden = {s: cache_hidden_states(encoder, images, shared.starts, dtype=dtype, desc=f"caching {s} states",
                                     to_pixels=to_pixels) for s, (images, to_pixels) in sources.items()}
    timings["cache_s"] = time.perf_counter() - t
    for q in [*encoder.parameters(), *(m for part in (readout, llm) if part is not None for m in part.parameters())]:
        q.requires_grad_(False)
    return Context(preset, seed, shared.ds, shared.tok, encoder, llm, enc_metrics, readout, hidden, shared.splits,
                   timings)


def _data_name(preset: ComparePreset) -> str:
    from laco.data.embedded import get_item_source

    src = get_item_source(preset.data.source).name
    return f"{src}-{preset.data.key(src)}"


# -- the MLLM scenarios -----------------------------------------------------------------------------------
def _new_model(ctx: Context, name: str):
    return build_model(parse_method(name), ctx.preset, ctx.encoder, ctx.llm, ctx.tok, ctx.seed)


def _row(ctx: Context, name: str, scenario: str, model) -> dict[str, Any]:
    spec, tower = parse_method(name), model.vision_tower
    cost = encoder_cost(tower)
    return {"method": name, "scenario": scenario, "seed": ctx.seed, "compressor": spec.compressor, "layer": spec.layer,
            "merge_layer": min(tower.merge_layers) if spec.compressor != "none" else None,
            "visual_tokens": model.num_image_tokens, "encoder_gflops": round(cost.total_flops / 1e9, 4),
            "encoder_flop_ratio": round(cost.flop_ratio, 3), "num_layers": tower.num_layers}


def _evaluate(ctx: Context, model, start: int) -> dict[str, Any]:
    split = ctx.eval_split
    return evaluate_cached(model, ctx.hidden[split][start], start, ctx.splits[(split, model.num_image_tokens)],
                           ctx.preset.eval_batch_size, ctx.preset.eval_limit)


def _trainable(model, groups: list[str]) -> list:
    """``freeze_for_stage`` minus the encoder's embeddings: the cached states start after them."""
    params = freeze_for_stage(model, groups)
    if "encoder" in groups:
        for q in model.vision_tower.adapter.model.embeddings.parameters():
            q.requires_grad_(False)
        params = [q for q in params if q.requires_grad]
    return params


def run_train(ctx: Context, name: str, scenarios: list[str]) -> dict[str, tuple[dict[str, Any], Any]]:
    """Stage 1 (compressor + projector, LLM and encoder frozen) once, then per scenario stage 2:
    ``train`` adds the LLM; ``train_encoder`` adds the LLM and every encoder layer (at ``lr_stage2_encoder``).

    Returns {scenario: (result row, trained model)}."""
    p = ctx.preset
    model = _new_model(ctx, name)
    start = start_layer(model)
    train = ctx.splits[("train", model.num_image_tokens)]
    t0 = time.perf_counter()
    params = _trainable(model, ["compressor", "projector"])
    train_steps(model, params, ctx.hidden["train"][start], start, train, p.stage1_steps, p.lr_stage1, p,
                derive_seed(ctx.seed, "stage1"), f"{name} s{ctx.seed} stage 1")
    stage1_s = time.perf_counter() - t0
    out = {}
    for scenario in scenarios:
        m = copy.deepcopy(model) if scenario != scenarios[-1] else model
        groups = ["compressor", "projector", "llm"] + (["encoder"] if scenario == "train_encoder" else [])
        k = 0 if scenario == "train_encoder" else start  # where the (frozen) cached part ends
        params = _trainable(m, groups)
        opt_groups = param_groups(m, groups, lr=p.lr_stage2, group_lr={"encoder": p.lr_stage2_encoder},
                                  weight_decay=p.weight_decay)
        curve: list[list[float]] = []

        def record(step: int, m=m, k=k, curve=curve) -> None:  # eval accuracy during stage 2 (a curve, not selection)
            if p.curve_every and (step % p.curve_every == 0 or step == p.stage2_steps):
                curve.append([p.stage1_steps + step, evaluate_cached(
                    m, ctx.hidden[ctx.eval_split][k], k, ctx.splits[(ctx.eval_split, m.num_image_tokens)],
                    p.eval_batch_size, p.curve_limit)["accuracy"]])

        t1 = time.perf_counter()
        loss = train_steps(m, opt_groups, ctx.hidden["train"][k], k, train, p.stage2_steps, p.lr_stage2, p,
                           derive_seed(ctx.seed, "stage2"), f"{scenario} {name} s{ctx.seed} stage 2", on_step=record)
        row = _row(ctx, name, scenario, m)
        row.update({"train_seconds": round(stage1_s + time.perf_counter() - t1, 1), "final_loss": loss,
                    "after": _evaluate(ctx, m, k),
                    "trainable_params": sum(q.numel() for q in params)})
        if curve:
            row["curve"] = curve
        m.requires_grad_(False)
        out[scenario] = (row, m)
    return out


def run_retrofit(ctx: Context, name: str, base) -> dict[str, Any]:
    """The trained uncompressed MLLM ``base`` with the compressor inserted; only the compressor trains."""
    p = ctx.preset
    model = _new_model(ctx, name)
    state = {k: v for k, v in base.state_dict().items() if ".compressors." not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(".compressors." not in k for k in missing):
        raise RuntimeError(f"retrofit load mismatch: missing {missing}, unexpected {unexpected}")
    start = start_layer(model)
    row = _row(ctx, name, "retrofit", model)
    row["before"] = _evaluate(ctx, model, start)
    # parameter-free compressors (avg_pool, tome) have nothing to retrofit: freeze all, train nothing
    if any(True for _ in model.vision_tower.compressors.parameters()):
        params = _trainable(model, ["compressor"])
    else:
        model.requires_grad_(False)
        params = []
    t0 = time.perf_counter()
    loss = train_steps(model, params, ctx.hidden["train"][start], start, ctx.splits[("train", model.num_image_tokens)],
                       p.retrofit_steps, p.lr_retrofit, p, derive_seed(ctx.seed, "retrofit"), f"retrofit {name} s{ctx.seed}")
    row.update({"train_seconds": round(time.perf_counter() - t0, 1), "final_loss": loss,
                "after": _evaluate(ctx, model, start),
                "trainable_params": sum(q.numel() for q in params)})
    return row


# -- the read-out scenario --------------------------------------------------------------------------------
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
    acc = round(100.0 * correct / (4 * n), 2)
    return {"accuracy": acc, "n": 4 * n, "per_task": {"quadrant": acc}, "per_turn": {}}


def _not_applicable(reason: str) -> dict[str, Any]:
    return {"accuracy": None, "n": 0, "per_task": {}, "per_turn": {}, "not_applicable": reason}


def run_readout(ctx: Context, name: str) -> dict[str, Any]:
    """The feasibility study's protocol on the same encoder: insert the compressor, train only it against the
    frozen pretrained quadrant read-out (the consumer is pretrained and frozen, like a frozen LLM).

    A compressor whose output is not a grid (ToMe: an unordered set) gets "not applicable": the read-out
    averages quadrants of a raster grid, which such an output does not have."""
    from tqdm.auto import tqdm

    from laco.encoders import compress_encoder

    p, spec, seed = ctx.preset, parse_method(name), ctx.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "compressor"))
        tower = (compress_encoder(ctx.encoder, spec.compressor, layer=spec.layer, ratio=p.ratio, **dict(spec.kwargs))
                 if spec.compressor != "none" else compress_encoder(ctx.encoder, "none"))
    start = min(tower.merge_layers, default=tower.num_layers)
    cost = encoder_cost(tower)
    row: dict[str, Any] = {"method": name, "scenario": "readout", "seed": seed, "compressor": spec.compressor,
                           "layer": spec.layer, "merge_layer": start if spec.compressor != "none" else None,
                           "visual_tokens": tower.num_output_tokens(), "encoder_gflops": round(cost.total_flops / 1e9, 4),
                           "encoder_flop_ratio": round(cost.flop_ratio, 3), "num_layers": tower.num_layers}
    if not all(getattr(c, "grid_output", True) for c in tower.compressors.values()):
        na = _not_applicable("the output is an unordered token set; the read-out averages grid quadrants")
        return {**row, "before": na, "after": na, "train_seconds": 0.0, "trainable_params": 0}
    split = ctx.eval_split
    row["before"] = _readout_accuracy(ctx, tower, start, split, p.eval_limit)
    params = list(tower.compressors.parameters())
    t0 = time.perf_counter()
    if params and p.readout_steps > 0:
        for q in params:
            q.requires_grad_(True)
        opt = build_optimizer(params, lr=p.lr_stage1, weight_decay=p.weight_decay)
        sched = build_scheduler(opt, p.readout_steps, warmup_steps=max(1, int(p.warmup_fraction * p.readout_steps)))
        gen = torch.Generator().manual_seed(derive_seed(seed, "readout"))
        hidden, labels = ctx.hidden["train"][start], torch.as_tensor(ctx.ds.scenes["train"].labels)
        tower.train()
        for _ in tqdm(range(p.readout_steps), desc=f"readout {name} s{seed}", leave=False, disable=not progress_enabled()):
            idx = torch.randint(0, len(hidden), (p.readout_batch_size,), generator=gen)
            out = tower.forward_from(hidden[idx].float(), tower.adapter.grid_for_image_size(), start)
            logits, _ = ctx.readout(out.last_hidden_state[:, tower.num_prefix_tokens:], out.grid)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels[idx].flatten())
            optimizer_step(loss, opt, sched)  # no clipping: the read-out protocol's
        for q in params:
            q.requires_grad_(False)
    row.update({"train_seconds": round(time.perf_counter() - t0, 1),
                "after": _readout_accuracy(ctx, tower, start, split, p.eval_limit),
                "trainable_params": sum(q.numel() for q in params)})
    return row


# -- the experiment -----------------------------------------------------------------------------------------
def _train_rows(ctx: Context, name: str, scenarios: list[str]) -> list[dict[str, Any]]:
    return [row for row, _ in run_train(ctx, name, scenarios).values()]


def _train_base(ctx: Context, scenarios: list[str], keep: bool) -> tuple[list[dict[str, Any]], bytes | None]:
    """The uncompressed model's rows and, when ``keep`` (retrofit), its trained `train` weights as safetensors
    bytes (a forked worker sends them back; a safetensors blob needs no pickled tensors)."""
    from safetensors.torch import save

    out = run_train(ctx, "none", scenarios)
    return [row for row, _ in out.values()], save(out["train"][1].state_dict()) if keep else None


def _load_base(ctx: Context, blob: bytes):
    from safetensors.torch import load

    base = _new_model(ctx, "none")
    base.load_state_dict(load(blob))
    return base.requires_grad_(False).eval()


def run_seed(ctx: Context, *, log=print) -> list[dict[str, Any]]:
    """Every (method, scenario) of the preset on one replicate, plus the text-only LLM's row.

    Jobs (the uncompressed model first, the retrofit base; each read-out; each method's training) run in
    ``preset.workers`` processes, then the retrofits from the base; rows come back in the preset's order."""
    p, seed = ctx.preset, ctx.seed

    def report(row: dict[str, Any]) -> None:
        acc, before = row["after"]["accuracy"], (row.get("before") or {}).get("accuracy")
        log(f"  {row['scenario']:13s} {row['method']:48s} seed {seed}: "
            + ("n/a" if acc is None else f"acc {acc:.1f}") + ("" if before is None else f" (before {before:.1f})"))

    mllm = [s for s in p.scenarios if s in MLLM_SCENARIOS]
    trains = [s for s in ("train", "train_encoder") if s in mllm]
    # the uncompressed model's scenarios; its `train` model is the retrofit base
    base_scenarios = [s for s in trains if "none" in p.methods_for(s)]
    if "retrofit" in mllm and "train" not in base_scenarios:
        base_scenarios.insert(0, "train")
    readouts = p.methods_for("readout") if "readout" in p.scenarios else []
    trained = [(m, [s for s in trains if m in p.methods_for(s)]) for m in p.methods if m != "none"]
    trained = [(m, scenarios) for m, scenarios in trained if scenarios]
    retrofits = [m for m in p.methods_for("retrofit") if m != "none"] if "retrofit" in mllm else []

    # (key, job) pairs, the longest job (the uncompressed model's training) first
    jobs = ([(("base", "none"), lambda: _train_base(ctx, base_scenarios, bool(retrofits)))] if base_scenarios else []) \
        + [(("readout", m), lambda m=m: [run_readout(ctx, m)]) for m in readouts] \
        + [(("train", m), lambda m=m, sc=sc: _train_rows(ctx, m, sc)) for m, sc in trained]
    text = None
    if mllm:
        text = evaluate_text_only(ctx.llm, ctx.splits[(ctx.eval_split, 0)], p.eval_batch_size, p.eval_limit)
        log(f"  text-only LLM (no image) seed {seed}: acc {text['accuracy']:.1f}")
    done: dict[tuple[str, str], list[dict[str, Any]]] = {}
    base_blob = None
    for i, result in run_jobs([job for _, job in jobs], p.workers, p.threads):
        key = jobs[i][0]
        if key[0] == "base":
            result, base_blob = result
        done[key] = result
        for row in result:
            report(row)
    if retrofits:
        base = _load_base(ctx, base_blob)
        for i, row in run_jobs([lambda m=m: run_retrofit(ctx, m, base) for m in retrofits], p.workers, p.threads):
            done[("retrofit", retrofits[i])] = [row]
            report(row)

    # the rows in the preset's order: read-outs, the text-only LLM, `none`, then each method's scenarios
    runs = [row for m in readouts for row in done[("readout", m)]]
    if text is None:
        return runs
    runs.append({"method": "text-only LLM", "scenario": "baseline", "seed": seed, "after": text})
    base_rows = {row["scenario"]: row for row in done.get(("base", "none"), [])}
    runs += [base_rows[s] for s in trains if "none" in p.methods_for(s)]
    if "retrofit" in mllm and "none" in p.methods_for("retrofit"):
        row = base_rows["train"]
        runs.append({**row, "scenario": "retrofit", "before": row["after"], "trainable_params": 0, "train_seconds": 0.0,
                     "final_loss": None})
    for m in p.methods:
        runs += done.get(("train", m), []) + done.get(("retrofit", m), [])
    return runs


def run_compare(preset: ComparePreset, out_dir: str | os.PathLike, *, command: str | None = None,
                user: UserSource | None = None, log=print) -> dict[str, Any]:
    """The whole experiment; writes results.json, results.md, the plots and command.txt into ``out_dir``.
    ``user``: the MLLM scenarios on the user's data and models (``laco compare --data``, userdata.py)."""
    t_start = time.perf_counter()
    if user is not None:
        user.check_preset(preset)  # before any output or data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shared = prepare_data(preset, user=user, log=log)
    runs, encoders, timings = [], {}, dict(shared.timings)
    for seed in preset.seeds:
        ctx = prepare(preset, seed, shared, log=log)
        for k in ("encoder_s", "llm_pretrain_s", "cache_s"):
            timings[k] = timings.get(k, 0.0) + ctx.timings[k]
        encoders[str(seed)] = ctx.encoder_metrics
        runs += run_seed(ctx, log=log)
        del ctx  # the next seed's caches replace this one's
    timings["total_s"] = time.perf_counter() - t_start
    results = {
        "preset": preset.name, "config": asdict(preset), "data_source": shared.ds.source, "data_dir": str(shared.ds.root),
        "eval_split": preset.eval_split,
        "encoder": {"pretrain_metrics": encoders[str(preset.seeds[0])], "per_seed": encoders,
                    "config": _vision_meta(preset, user).config.to_dict()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                        "machine": platform.machine()},
        "command": command, "blind": shared.blind, "runs": runs, "table": aggregate(runs),
        "baselines": baseline_rows(runs, shared.blind), "contrasts": contrasts(runs),
    }
    if user is not None:
        results["data"] = userdata.describe(user, shared.ds)
    from laco.experiments.report import write_report

    write_report(results, out)
    return results

