"""Atomic checkpoints and exact resume.

Layout of a run's ``output_dir``::

    run_config.yaml                 the resolved config (written when the run starts)
    metrics.jsonl                   one line per log step
    checkpoints/checkpoint-00000040/
        model.safetensors           all weights (accelerate ``save_state``; sharded for FSDP/DeepSpeed)
        optimizer.bin               optimizer state (read back with torch.load(weights_only=True))
        random_states_<rank>.pkl    python / numpy / torch (/ cuda) RNG states of every process
        trainer_state.json          stage, steps, epoch, data position, scheduler state
        checksums.sha256            sha256 of every file above (verified on resume)
    <stage name>/                   the model (save_pretrained, safetensors) + processor after each stage
        laco_stage.json             marks the stage as complete
        checksums.sha256            sha256 of every file of the stage folder

Every directory is written under a temporary name in the same folder and renamed into place with
``os.replace`` once complete, so a killed run leaves either the previous checkpoint or the new one,
never half of one. Temporary leftovers are removed when a run starts.

Resume: the completed stages are read from their ``laco_stage.json`` markers; the newest checkpoint of
the first unfinished stage that passes its checksums (older ones are fallbacks, with a warning; a stage
folder that fails them is trained again) restores weights, optimizer, scheduler, RNG states and the data position
(epoch and micro-batches consumed; the per-epoch shuffle is a function of ``(seed, epoch)``), so the
resumed run replays exactly the batches and updates the uninterrupted run would have made.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from laco.io import TMP_PREFIX, replace_dir
from laco.safety import CHECKSUM_FILE, read_json_object, verify_checksums, write_checksums

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
STAGE_MARKER = "laco_stage.json"


@dataclass
class TrainerState:
    """Where a run stands; saved in every checkpoint as JSON."""

    stage_index: int
    stage_name: str
    step: int  # optimizer steps done in this stage
    global_step: int  # optimizer steps done in the run
    epoch: int  # current epoch in this stage
    batches_in_epoch: int  # micro-batches (per process) of this epoch already consumed
    samples_seen: int  # samples consumed in this stage, all processes
    num_processes: int
    batch_size: int
    grad_accum: int
    num_samples: int  # usable samples of the stage's data (a changed data set cannot resume exactly)
    scheduler: dict[str, Any] = field(default_factory=dict)  # LR scheduler state_dict (JSON-safe)
    last_loss: float | None = None

    updates: int = 0  # optimizer updates made in this stage (steps whose whole global batch was dropped make none)
    samples_requested: int = 0  # samples drawn in this stage, all processes (kept + dropped)

    @classmethod
    def from_json(cls, path: Path) -> "TrainerState":
        data = read_json_object(path, "trainer state")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"trainer state does not match this laco version ({err}): {path}") from None


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def clean_temporary(output_dir: str | os.PathLike) -> None:
    """Remove half-written directories a killed run left behind (main process, before training)."""
    for parent in (Path(output_dir), Path(output_dir) / CHECKPOINT_DIR):
        if parent.is_dir():
            for p in parent.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint or stage folder cannot be trusted (``None``: it verifies). Folders written before
    checksums existed are accepted as they are."""
    if not (path / CHECKSUM_FILE).is_file():
        return None
    return verify_checksums(path)


def verified_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that passes its checksums; each newer one that fails is reported."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s fails verification (%s); falling back to an older one", path, problem)
    return None


def completed_stages(output_dir: str | os.PathLike, stage_names: list[str]) -> int:
    """How many leading stages are complete (their model directory carries the stage marker and verifies)."""
    n = 0
    for name in stage_names:
        folder = Path(output_dir) / name
        if not (folder / STAGE_MARKER).is_file():
            break
        problem = checkpoint_problem(folder)
        if problem is not None:
            logger.warning("stage folder %s fails verification (%s); the stage is trained again", folder, problem)
            break
        n += 1
    return n


def save_checkpoint(accelerator, output_dir: str | os.PathLike, state: TrainerState, keep: int) -> Path:
    """Save model, optimizer, RNG states (all processes) and ``state`` atomically; keep the ``keep`` newest.

    Collective: every process must call it.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"{CHECKPOINT_PREFIX}{state.global_step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)  # each process writes its own RNG file
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / STATE_FILE, asdict(state))  # its presence marks a complete checkpoint
        write_checksums(tmp)
        replace_dir(tmp, final, old=final.with_name(f"{TMP_PREFIX}old-{final.name}"))
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> TrainerState:
    """Restore what ``save_checkpoint`` saved into the prepared objects; return the trainer state."""
    path = Path(path)
    state = TrainerState.from_json(path / STATE_FILE)
    if state.num_processes != accelerator.num_processes:
        raise ValueError(
            f"checkpoint {path} was written by {state.num_processes} process(es) but this run has "
            f"{accelerator.num_processes}; an exact resume needs the same number of processes"
        )
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no RNG state for process {accelerator.process_index}")
    # accelerate only logs (INFO) an RNG file it cannot read, and the resume is then not exact: check it here
    from accelerate.utils import load

    try:
        rng = load(rng_file)
        missing = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(rng)
    except Exception as err:
        raise ValueError(f"cannot restore the RNG state of checkpoint {path} ({type(err).__name__}: {err}): "
                         f"{rng_file}") from None
    if missing:
        raise ValueError(f"cannot restore the RNG state of checkpoint {path} (no {sorted(missing)}): {rng_file}")
    try:
        accelerator.load_state(str(path))
    except Exception as err:
        raise ValueError(f"cannot restore weights or optimizer state from checkpoint {path} "
                         f"({type(err).__name__}: {err})") from None
    return state


def save_stage_model(accelerator, model, processor, output_dir: str | os.PathLike, stage_name: str,
                     info: dict[str, Any]) -> Path:
    """``save_pretrained`` the model (+ processor) of a finished stage atomically. Collective."""
    final = Path(output_dir) / stage_name
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    state_dict = accelerator.get_state_dict(model)  # gathers sharded (FSDP / ZeRO-3) weights; collective
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        _write_json(tmp / STAGE_MARKER, info)
        write_checksums(tmp)
        replace_dir(tmp, final, old=final.with_name(f"{TMP_PREFIX}old-{final.name}"))
    accelerator.wait_for_everyone()
    return final
