"""The training loop: stages run one after another on ``accelerate``.

Per stage: set the seed, optionally add LoRA adapters to the LLM (peft), freeze every parameter group
the stage does not list, build AdamW with one parameter group per trained part (its own learning rate;
no weight decay on 1-D parameters), a warm-up + cosine/linear/constant schedule, and a DataLoader whose
shuffle is a pure function of ``(seed, stage, epoch)``; prepare them with ``accelerate`` (DDP / FSDP /
DeepSpeed come from the launch config); then run optimizer steps of ``grad_accum`` micro-batches.

Loss: the token-mean cross-entropy over the assistant tokens of the *whole* global batch (all
micro-batches of all processes): each micro-batch contributes ``sum of token losses * world / N``
where ``N`` is the global count of label tokens, so the gradient equals that of single-process
training on the same global batch however samples are split or padded.

Safety: a NaN/inf loss or gradient norm raises ``NonFiniteLossError`` before the optimizer step, so
the weights and the last checkpoint on disk stay good. Checkpoints (``save_every`` steps and every
stage end) are atomic; see ``laco.train.checkpoint`` for the layout and the exact-resume contract.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from laco.data.collator import IGNORE_INDEX, LlavaCollator
from laco.data.llava import LlavaDataset, load_llava
from laco.train.checkpoint import (
    CHECKPOINT_DIR,
    STAGE_MARKER,
    STATE_FILE,
    TrainerState,
    clean_temporary,
    completed_stages,
    load_checkpoint,
    save_checkpoint,
    save_stage_model,
    verified_checkpoint,
)
from laco.io import atomic_write_text
from laco.safety import (
    OutputLock,
    check_output_path,
    file_identity,
    fingerprint_mismatch,
    read_json_object,
    weights_identity,
    write_marker,
)
from laco.model.compat import set_activation_checkpointing
from laco.model.modeling import MODULE_LAYOUT
from laco.train.config import DataConfig, RunConfig, StageConfig, load_run_config, save_run_config
from laco.train.optim import _lora_wrapped, build_optimizer, build_scheduler, freeze_for_stage, param_groups

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.yaml"
FINGERPRINT_FILE = "fingerprint.json"
LAYOUT_KEY = "model module layout"  # in the fingerprint: checkpoints hold the in-memory module names


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; training stopped before updating the weights."""


class EmptyStageError(ValueError):
    """A stage made no optimizer update, or dropped more of its samples than ``max_dropped_fraction``."""


@dataclass
class StageResult:
    name: str
    steps: int  # optimizer steps of the stage (all of them, also those before a resume)
    model_dir: Path  # save_pretrained directory of the stage's model
    losses: list[float] = field(default_factory=list)  # per optimizer step, run in this call


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path  # the final model (the last stage's directory)
    global_step: int
    stages: list[StageResult]
    metrics_path: Path
    model: nn.Module | None = None  # the trained model (unwrapped), the same object that was passed in

    @property
    def losses(self) -> list[float]:
        return [x for s in self.stages for x in s.losses]


def set_train_mode(model: nn.Module, frozen_eval: bool = True) -> None:
    """``model.train()``; with ``frozen_eval`` every fully frozen submodule goes to eval mode
    (no dropout / drop-path in parts that do not learn)."""
    model.train()
    if not frozen_eval:
        return

    def visit(m: nn.Module) -> None:
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()
            return
        for child in m.children():
            visit(child)

    visit(model)


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """Gradient (activation) checkpointing on or off (non-reentrant: works with frozen inputs)."""
    if on and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    set_activation_checkpointing(model, on, use_reentrant=False)  # off: a previous stage may have enabled it


def apply_lora(model: nn.Module, lora) -> nn.Module:
    """Wrap the LLM's decoder (``model.get_decoder()``) with peft LoRA adapters (``lora``: a
    ``laco.train.config.LoraConfig``); ``lm_head`` gets none."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import LoraModel

    if _lora_wrapped(model.get_decoder()):
        raise ValueError("the LLM already carries LoRA adapters")
    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=list(lora.target_modules), bias="none")
    model.set_decoder(LoraModel(model.get_decoder(), cfg, "default"))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge LoRA adapters into the LLM weights and remove them (no-op without adapters)."""
    if _lora_wrapped(model.get_decoder()):
        model.set_decoder(model.get_decoder().merge_and_unload())
    return model


# -- data ----------------------------------------------------------------------------------------
class EpochSampler(torch.utils.data.Sampler[int]):
    """A random permutation per epoch that depends only on ``(seed, epoch)``: the data position of a
    resumed run is (epoch, batches consumed)."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


def _resolve_data(train_data: Any, stage: StageConfig, config: RunConfig, image_token: str,
                  video_token: str | None, progress: bool) -> tuple[LlavaDataset, DataConfig]:
    dc = config.stage_data(stage) or DataConfig()
    src = train_data.get(stage.name) if isinstance(train_data, Mapping) else train_data
    if src is None:
        if dc.path is None:
            raise ValueError(f"stage {stage.name!r} has no data: pass train_data or set data.path in the config")
        src = dc.path
    if isinstance(src, LlavaDataset):
        return src, dc
    ds = load_llava(src, dc.image_folder, on_bad_record=dc.on_bad_record, check_images=dc.check_images,
                    image_token=image_token, video_token=video_token or "<video>", max_frames=dc.max_frames,
                    progress=progress)
    return ds, dc


# -- loss ----------------------------------------------------------------------------------------
def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over label positions. logits (B, T, V), labels (B, T) -> scalar fp32."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _windows(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    window: list[dict] = []
    for b in batches:
        window.append(b)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def resolve_mixed_precision(value: str) -> str | None:
    """"auto": bf16 on CUDA GPUs that support it, fp16 on other CUDA GPUs, none on CPU; ``None`` defers
    to an ``accelerate launch`` config."""
    if value != "auto":
        if value == "fp16" and not torch.cuda.is_available():
            raise ValueError("mixed_precision 'fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")
        return value
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(config: RunConfig):
    """The ``Accelerator`` of a run (the distributed setup comes from ``accelerate launch``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    out = Path(config.output_dir)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        # accelerate only warns and logs nothing: fail early instead of losing the run's curves
        raise ValueError("tensorboard: true needs the tensorboard package: pip install 'laco[tensorboard]'")
    # without a GPU, say so: then torchrun-launched processes form a gloo group (accelerate's MULTI_CPU)
    no_gpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    cpu = os.environ.get("ACCELERATE_USE_CPU", str(no_gpu)).lower() in ("1", "true", "yes")
    acc = Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        log_with="tensorboard" if config.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.ddp_find_unused_parameters)],
    )
    if cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _fsdp_on_cpu(acc)
    return acc


def _fsdp_on_cpu(acc) -> None:
    """Turn a multi-CPU (gloo) accelerator into an FSDP2 one.

    ``accelerate launch`` with an FSDP config on a machine without GPUs starts the processes with the
    FSDP settings in the environment, but accelerate 1.15 enables FSDP only for GPU-like devices and
    silently falls back to DDP (MULTI_CPU). torch's ``fully_shard`` runs on CPU with gloo, so set the
    state accelerate would have set: the same sharded code path as on GPUs (sharded prepare, DCP
    checkpoints, full-state-dict gathering), testable on a CPU (``configs/accelerate/fsdp_cpu.yaml``).
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if acc.distributed_type != DistributedType.MULTI_CPU:
        return  # one process: nothing to shard
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch sets
    if plugin.fsdp_version != 2:
        raise ValueError(f"FSDP on CPU needs fsdp_version: 2 (fully_shard), got {plugin.fsdp_version}; "
                         "see configs/accelerate/fsdp_cpu.yaml")
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


# -- the run -------------------------------------------------------------------------------------
def _prepare_output(accelerator, config: RunConfig, resume: bool) -> OutputLock | None:
    """Refuse to overwrite a run or to resume one whose config changed (checked on every process, so all
    stop together); the main process takes the folder's lock (a second run into it is refused), clears
    half-written leftovers and saves the config. Returns the lock (main process) to release at the end."""
    out = check_output_path(config.output_dir, "output_dir")
    lock = OutputLock(out, "run's output_dir").acquire() if accelerator.is_main_process else None
    try:
        _check_resumable(out, config, resume)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        clean_temporary(out)
        save_run_config(config, out / RUN_CONFIG_FILE)
        atomic_write_text(out / FINGERPRINT_FILE, json.dumps(run_fingerprint(config), indent=2) + "\n")
        write_marker(out, "train")
    accelerator.wait_for_everyone()
    return lock


def _check_resumable(out: Path, config: RunConfig, resume: bool) -> None:
    saved = out / RUN_CONFIG_FILE
    if saved.exists():
        if not resume:
            raise ValueError(f"{out} already holds a run; resume it (--resume / resume=True) or use a new output_dir")
        before = load_run_config(saved).trajectory_dict()
        now = config.trajectory_dict()
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            raise ValueError(f"cannot resume {out}: the config changed since the run started ({', '.join(changed)})")
        if (out / FINGERPRINT_FILE).is_file():
            saved = read_json_object(out / FINGERPRINT_FILE, "run fingerprint")
            changed = fingerprint_mismatch(saved, run_fingerprint(config))
            if LAYOUT_KEY in changed:
                raise ValueError(
                    f"cannot resume {out}: its checkpoints hold the module names of the model layout "
                    f"{saved.get(LAYOUT_KEY, 'laco 0.1 (vision_tower, projector, language_model)')!r}, this laco "
                    f"builds {MODULE_LAYOUT!r}; start a new output_dir (a finished stage's model folder loads)")
            if changed:
                raise ValueError(f"cannot resume {out}: the content of {', '.join(changed)} changed since the run "
                                 "started (sha256 differs); start a new output_dir")


def run_fingerprint(config: RunConfig) -> dict[str, Any]:
    """Content hashes of what a run reads from disk (each stage's data file, the model source folders) and the
    model's module layout (``MODULE_LAYOUT``: its checkpoints hold the module names)."""
    fp: dict[str, Any] = {LAYOUT_KEY: MODULE_LAYOUT}
    for s in config.stages:
        dc = config.stage_data(s)
        if dc is not None and dc.path is not None and Path(dc.path).is_file():
            fp[f"data file of stage {s.name!r}"] = file_identity(dc.path)
    m = config.model
    for key in ("pretrained", "vision", "llm"):
        folder = getattr(m, key, None) if m is not None else None
        if folder and Path(folder).is_dir():
            fp[f"model.{key}"] = weights_identity(folder)
    return fp


def _resume_point(out: Path, names: list[str]) -> tuple[int, Path | None]:
    """(number of completed stages, the newest checkpoint of the next stage or None)."""
    done = completed_stages(out, names)
    ckpt = verified_checkpoint(out)
    if ckpt is not None and TrainerState.from_json(ckpt / STATE_FILE).stage_index != done:
        ckpt = None  # a finished stage's leftover: its model directory supersedes it
    return done, ckpt


def _truncate_metrics(path: Path, global_step: int) -> None:
    """Drop metric lines after ``global_step`` (written by a killed run after its last checkpoint)."""
    if not path.exists():
        return
    keep = []
    for i, ln in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            if ln.strip() and json.loads(ln)["global_step"] <= global_step:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line torn by a kill: a log line, not state
            logger.warning("%s:%d: dropping an unreadable metrics line", path, i)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def train(
    model: nn.Module,
    processor,
    train_data: Any = None,
    config: RunConfig | str | os.PathLike | dict | None = None,
    *,
    resume: bool = False,
    accelerator=None,
) -> TrainResult:
    """Run every stage of ``config`` on ``model`` (in place) and return a ``TrainResult``.

    Args:
        model: a ``LaCoForConditionalGeneration`` (anything with ``parameter_groups()`` and the same forward).
        processor: its ``LaCoProcessor`` (tokenizer, image processor, chat template, token count).
        train_data: a ``LlavaDataset``, a list of LLaVA records, a ``datasets.Dataset``, a path, or a dict
            ``{stage name: any of these}``; ``None`` uses each stage's ``data.path``.
        config: a ``RunConfig``, a YAML path or a dict.
        resume: continue the run in ``config.output_dir`` exactly where it stopped (fresh start if empty).
        accelerator: an ``accelerate.Accelerator`` to use (default: one built from the config).
    """
    if config is None:
        raise ValueError("train() needs a run config (RunConfig, YAML path or dict)")
    config = config if isinstance(config, RunConfig) else load_run_config(config)
    config.validate()
    acc = accelerator or make_accelerator(config)
    _check_sharding(acc, config)
    # load and check every stage's data before any training
    data = [_resolve_data(train_data, s, config, processor.image_token, getattr(processor, "video_token", None),
                          config.progress and acc.is_main_process)
            for s in config.stages]
    lock = _prepare_output(acc, config, resume)
    try:
        return _train_stages(acc, model, processor, config, data, resume)
    finally:
        if lock is not None:
            lock.release()


def _train_stages(acc, model: nn.Module, processor, config: RunConfig, data: list, resume: bool) -> TrainResult:
    out = Path(config.output_dir)
    if acc.is_main_process:
        for s, (ds, _) in zip(config.stages, data):
            if ds.bad_records:
                ds.write_report(out / f"bad_records-{s.name}.jsonl")
    if config.tensorboard:
        acc.init_trackers("laco")

    names = [s.name for s in config.stages]
    done, ckpt = _resume_point(out, names) if resume else (0, None)
    global_step = 0
    results: list[StageResult] = []
    if done:
        global_step = _load_stage_weights(model, out / names[done - 1])
        results = [StageResult(n, json.loads((out / n / STAGE_MARKER).read_text())["steps"], out / n) for n in names[:done]]
    if acc.is_main_process:  # metric lines past the resume point were written by the killed run
        resume_step = TrainerState.from_json(ckpt / STATE_FILE).global_step if ckpt is not None else global_step
        _truncate_metrics(out / METRICS_FILE, resume_step)

    for si in range(done, len(config.stages)):
        ds, dc = data[si]
        result, global_step = _run_stage(acc, model, processor, ds, dc, config, si, global_step,
                                         ckpt if si == done else None)
        results.append(result)
    if config.tensorboard:
        acc.end_training()
    if acc.is_main_process and (out / METRICS_FILE).is_file():
        from laco.train.plot import plot_metrics

        plot_metrics(out / METRICS_FILE)  # out/training.png
    return TrainResult(out, results[-1].model_dir, global_step, results, out / METRICS_FILE, model)


def _check_sharding(acc, config: RunConfig) -> None:
    """Refuse, before any training, what the sharded (FSDP) path cannot do yet."""
    from accelerate.utils import DistributedType

    lora = [s.name for s in config.stages if s.lora is not None]
    if acc.distributed_type == DistributedType.FSDP and lora:
        # merge_and_unload writes into parameters that FSDP holds as sharded DTensors; on CPU it fails with
        # "Attempted to access the data pointer on an invalid python storage" after the stage has trained
        raise ValueError(f"stage(s) {lora} use LoRA, which is not supported under FSDP (the adapters are merged "
                         "at the stage end, into sharded weights); use DDP or DeepSpeed, or train the LLM fully")


def _load_stage_weights(model: nn.Module, stage_dir: Path) -> int:
    """Load a completed stage's saved model into ``model``; return the run's global step at that point."""
    dtype = next(model.parameters()).dtype
    saved = type(model).from_pretrained(stage_dir, dtype=dtype)
    model.load_state_dict(saved.state_dict(), strict=True)
    return int(json.loads((stage_dir / STAGE_MARKER).read_text())["global_step"])


def _run_stage(acc, model: nn.Module, processor, ds: LlavaDataset, dc: DataConfig, config: RunConfig, si: int,
               global_step: int, ckpt: Path | None) -> tuple[StageResult, int]:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    stage = config.stages[si]
    out = Path(config.output_dir)
    stage_seed = config.seed + 1000 * si
    set_seed(stage_seed)
    if stage.lora is not None:
        apply_lora(model, stage.lora)
    freeze_for_stage(model, stage.trainable)
    _set_checkpointing(model, stage.gradient_checkpointing)

    collator = LlavaCollator(processor, dc.max_length, on_overflow=dc.on_overflow)
    sampler = EpochSampler(len(ds), stage_seed)
    # the loader's own generator: starting an epoch's iterator draws a seed from it, not from the global
    # RNG that dropout uses (a resumed run starts one more iterator than the uninterrupted run)
    loader = torch.utils.data.DataLoader(ds, batch_size=stage.batch_size, sampler=sampler, collate_fn=collator,
                                         num_workers=dc.num_workers, drop_last=False,
                                         generator=torch.Generator().manual_seed(stage_seed))
    optimizer = build_optimizer(
        param_groups(model, stage.trainable, lr=stage.learning_rate, group_lr=stage.group_lr,
                     weight_decay=stage.weight_decay), lr=stage.learning_rate, betas=stage.adam_betas)
    wrapped, optimizer, loader = acc.prepare(model, optimizer, loader)
    if len(loader) == 0:
        raise ValueError(f"stage {stage.name!r}: the data loader is empty ({len(ds)} samples)")
    steps_per_epoch = math.ceil(len(loader) / stage.grad_accum)
    total = stage.max_steps or max(1, math.ceil(stage.epochs * steps_per_epoch))
    warmup = stage.warmup_steps if stage.warmup_steps is not None else round(stage.warmup_ratio * total)
    scheduler = build_scheduler(optimizer, total, warmup_steps=warmup, name=stage.scheduler)

    step = epoch = skip = samples_seen = updates = requested = 0
    last_loss = None
    if ckpt is not None:
        st = load_checkpoint(acc, ckpt)
        if (st.batch_size, st.grad_accum) != (stage.batch_size, stage.grad_accum):
            raise ValueError(f"checkpoint {ckpt}: batch_size/grad_accum {st.batch_size}/{st.grad_accum} differ from "
                             f"the config's {stage.batch_size}/{stage.grad_accum}")
        if st.num_samples != len(ds):
            raise ValueError(f"checkpoint {ckpt} was written for {st.num_samples} samples but stage {stage.name!r} "
                             f"now has {len(ds)}: the data changed, so the run cannot resume exactly")
        scheduler.load_state_dict(st.scheduler)
        step, epoch, skip, samples_seen, global_step, last_loss = (st.step, st.epoch, st.batches_in_epoch,
                                                                    st.samples_seen, st.global_step, st.last_loss)
        updates, requested = (st.updates, st.samples_requested) if st.samples_requested else (step, samples_seen)
        logger.info("resumed stage %r at step %d (epoch %d, batch %d) from %s", stage.name, step, epoch, skip, ckpt)

    frozen_eval = not stage.gradient_checkpointing  # checkpointing only acts on modules in train mode
    set_train_mode(acc.unwrap_model(wrapped), frozen_eval=frozen_eval)
    losses: list[float] = []
    bar = tqdm(total=total, initial=step, desc=f"stage {si + 1}/{len(config.stages)} {stage.name}",
               disable=not (config.progress and acc.is_main_process), dynamic_ncols=True)
    window_log: dict[str, float] = {"loss": 0.0, "n": 0, "tokens": 0, "samples": 0, "t0": time.perf_counter()}

    def make_state() -> TrainerState:
        return TrainerState(si, stage.name, step, global_step, epoch, batches_in_epoch, samples_seen,
                            acc.num_processes, stage.batch_size, stage.grad_accum, len(ds), scheduler.state_dict(),
                            last_loss, updates, requested)

    batches_in_epoch = skip
    while step < total:
        batches = acc.skip_first_batches(loader, skip) if skip else loader
        # the prepared loader passes its epoch to our sampler at every pass (and would otherwise count
        # passes itself, which a resumed run cannot reproduce): set it explicitly
        batches.set_epoch(epoch)
        batches_in_epoch, skip = skip, 0
        for window in _windows(batches, stage.grad_accum):
            st = _optimizer_step(acc, wrapped, optimizer, window, stage)
            loss, grad_norm, n_tok, n_samp = st.loss, st.grad_norm, st.tokens, st.samples
            updates += st.updated
            requested += st.requested
            lrs = _group_lrs(optimizer)  # the learning rates this step used
            scheduler.step()
            step += 1
            global_step += 1
            batches_in_epoch += len(window)
            samples_seen += n_samp
            last_loss = loss
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            window_log["loss"] += loss
            window_log["n"] += 1
            window_log["tokens"] += n_tok
            window_log["samples"] += n_samp
            if step % config.log_every == 0 or step == total:
                _log(acc, config, out, stage, si, step, global_step, epoch, lrs, grad_norm, window_log)
            if config.save_every and step % config.save_every == 0 and step < total:
                save_checkpoint(acc, out, make_state(), config.keep_checkpoints)
            if step >= total:
                break
        else:
            epoch += 1
            batches_in_epoch = 0
    bar.close()
    dropped = _check_stage_trained(stage, dc, ds, updates, requested, samples_seen)

    model = acc.unwrap_model(wrapped, keep_fp32_wrapper=False)
    acc.free_memory()  # release the wrappers / optimizer; the next stage prepares again
    merge_lora(model)
    model.eval()
    info = {"stage": stage.name, "index": si, "steps": step, "global_step": global_step, "last_loss": last_loss,
            "updates": updates, "samples_requested": requested, "samples_dropped": dropped,
            "bad_records": len(ds.bad_records)}
    model_dir = save_stage_model(acc, model, processor, out, stage.name, info)
    if acc.is_main_process:  # this stage's mid-stage checkpoints are superseded by its model directory
        for p in (out / CHECKPOINT_DIR).glob("checkpoint-*"):
            if TrainerState.from_json(p / STATE_FILE).stage_index <= si:
                shutil.rmtree(p, ignore_errors=True)
    acc.wait_for_everyone()
    return StageResult(stage.name, step, model_dir, losses), global_step


def _zero_loss(model) -> torch.Tensor:
    """0 that depends on every trainable parameter: backward then gives zero gradients everywhere, so
    collectives (DDP, ZeRO) stay aligned and ``backward`` has a graph even when no trained part was used."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


@dataclass
class StepStats:
    """One optimizer step, summed over all processes."""

    loss: float
    grad_norm: float | None
    tokens: int  # non-pad tokens
    samples: int  # samples kept
    requested: int  # samples drawn (kept + dropped by the collator)
    updated: bool  # False when the whole global batch had no label token


def _check_stage_trained(stage: StageConfig, dc: DataConfig, ds: LlavaDataset, updates: int, requested: int,
                         kept: int) -> int:
    """Raise ``EmptyStageError`` when the stage made no update or dropped more than ``dc.max_dropped_fraction``
    of its samples (records rejected when the data was loaded, plus samples the collator dropped); else
    return the number dropped in training."""
    dropped = max(requested - kept, 0)
    bad = len(ds.bad_records)
    why = (f"{dropped} of {requested} samples drawn were dropped in training (over max_length with on_overflow: "
           f"drop, or images that failed to decode) and {bad} of {len(ds) + bad} records were rejected when "
           f"the data was loaded")
    if updates == 0:
        raise EmptyStageError(f"stage {stage.name!r} made no optimizer update: {why}")
    worst = max(dropped / max(requested, 1), bad / max(len(ds) + bad, 1))
    if worst > dc.max_dropped_fraction:
        raise EmptyStageError(f"stage {stage.name!r} dropped more than max_dropped_fraction "
                              f"({dc.max_dropped_fraction}) of its samples: {why}")
    return dropped


def _optimizer_step(acc, model, optimizer, window: list[dict], stage: StageConfig) -> StepStats:
    """Forward/backward every micro-batch of ``window``, then one optimizer step."""
    device = acc.device
    local = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window),
                          sum(int(b["attention_mask"].sum()) for b in window),
                          sum(int(b["input_ids"].shape[0]) for b in window),
                          sum(int(b.get("num_requested", b["input_ids"].shape[0])) for b in window)],
                         dtype=torch.float64, device=device)
    n_items, n_tok, n_samp, n_req = acc.reduce(local, reduction="sum").tolist()
    scale = acc.num_processes / max(n_items, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for j, batch in enumerate(window):
        last = j == len(window) - 1
        acc.sync_gradients = last  # the DeepSpeed accumulation boundary; DDP syncs outside no_sync
        with nullcontext() if last else acc.no_sync(model):
            if batch["input_ids"].shape[0] == 0:  # every sample dropped: a zero loss keeps collectives aligned
                loss = _zero_loss(model)
            else:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch.get("pixel_values"), image_sizes=batch.get("image_sizes"),
                            batch_num_images=batch.get("batch_num_images"),
                            pixel_values_videos=batch.get("pixel_values_videos"), use_cache=False)
                loss = token_loss_sum(out.logits, batch["labels"])
                if batch.get("pixel_values") is None and batch.get("pixel_values_videos") is None:
                    # text-only: the image path (maybe all that trains) unused
                    loss = loss + _zero_loss(model)
            loss_sum += loss.detach().double()
            acc.backward(loss * scale)
    loss_value = float(acc.reduce(loss_sum, reduction="sum")) / max(n_items, 1.0)
    if n_items and not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"loss is {loss_value} in stage {stage.name!r}; stopped before updating the weights. The last good "
            "checkpoint is kept: lower the learning rate or check the data, then resume"
        )
    if n_items == 0:  # every sample of the global batch was dropped: no update (the step still counts)
        logger.warning("stage %r: a global batch without label tokens; skipping its update", stage.name)
        optimizer.zero_grad(set_to_none=True)
        return StepStats(float("nan"), None, int(n_tok), int(n_samp), int(n_req), updated=False)
    grad_norm = None
    if stage.max_grad_norm is not None:
        # all parameters (frozen ones have no gradient): FSDP needs exactly the model's parameter list
        norm = acc.clip_grad_norm_(list(model.parameters()), stage.max_grad_norm)
        grad_norm = float(norm) if norm is not None else None
        if grad_norm is not None and not math.isfinite(grad_norm) and acc.scaler is None:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"gradient norm is {grad_norm} in stage {stage.name!r}; stopped before updating "
                                     "the weights (the last good checkpoint is kept)")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_value, grad_norm, int(n_tok), int(n_samp), int(n_req), updated=True)


def _group_lrs(optimizer) -> dict[str, float]:
    """Learning rate per trained part (param groups carry the part's name)."""
    lrs: dict[str, float] = {}
    for g in optimizer.param_groups:
        lrs.setdefault(g.get("name", str(len(lrs))), g["lr"])
    return lrs


def _log(acc, config: RunConfig, out: Path, stage: StageConfig, si: int, step: int, global_step: int, epoch: int,
         lrs: dict[str, float], grad_norm: float | None, w: dict[str, float]) -> None:
    now = time.perf_counter()
    dt = max(now - w["t0"], 1e-9)
    row = {"stage": stage.name, "stage_index": si, "step": step, "global_step": global_step, "epoch": epoch,
           "loss": w["loss"] / max(w["n"], 1), "lr": lrs, "grad_norm": grad_norm,
           "tokens_per_s": w["tokens"] / dt, "samples_per_s": w["samples"] / dt, "time": time.time()}
    if acc.is_main_process:
        with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    if config.tensorboard:
        acc.log({"loss": row["loss"], "tokens_per_s": row["tokens_per_s"], "samples_per_s": row["samples_per_s"],
                 **{f"lr/{k}": v for k, v in lrs.items()}}, step=global_step)
    w.update(loss=0.0, n=0, tokens=0, samples=0, t0=now)
