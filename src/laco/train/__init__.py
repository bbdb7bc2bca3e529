"""Two-stage LaCo training on ``accelerate``: typed stage configs, the loop, atomic checkpoints.

Python API (what ``laco train CONFIG.yaml`` calls)::

    from laco.train import RunConfig, StageConfig, train
    cfg = RunConfig(output_dir="runs/x", stages=[
        StageConfig("align", trainable=["compressor", "projector"], learning_rate=1e-3, epochs=1),   # stage 1
        StageConfig("finetune", trainable=["compressor", "projector", "llm"], learning_rate=2e-5),  # stage 2
    ])
    result = train(model, processor, records, cfg)           # records: list of LLaVA dicts, a path,
    result.model_dir, result.losses                          # a datasets.Dataset or a LlavaDataset
    train(model, processor, records, cfg, resume=True)       # continue a killed run exactly

``freeze_for_stage(model, ["compressor", "projector"])`` freezes everything else and returns the
trainable parameters; ``load_run_config("run.yaml")`` reads and checks a YAML run config. Multi-process
(DDP / FSDP / DeepSpeed): launch the same code with ``accelerate launch --config_file configs/accelerate/...``.
See docs/training.md.
"""

from laco.io import atomic_dir
from laco.train.checkpoint import TrainerState, latest_checkpoint, list_checkpoints
from laco.train.config import (
    PARAM_GROUPS,
    DataConfig,
    LoraConfig,
    ModelSource,
    RunConfig,
    StageConfig,
    load_run_config,
    save_run_config,
)
from laco.train.loop import (
    EpochSampler,
    NonFiniteLossError,
    StageResult,
    TrainResult,
    apply_lora,
    merge_lora,
    set_train_mode,
    token_loss_sum,
    train,
)
from laco.train.optim import build_optimizer, build_scheduler, freeze_for_stage, param_groups

__all__ = [
    "PARAM_GROUPS", "DataConfig", "EpochSampler", "LoraConfig", "ModelSource", "NonFiniteLossError", "RunConfig",
    "StageConfig", "StageResult", "TrainResult", "TrainerState", "apply_lora", "atomic_dir", "build_optimizer",
    "build_scheduler", "freeze_for_stage", "param_groups",
    "latest_checkpoint", "list_checkpoints", "load_run_config", "merge_lora", "save_run_config", "set_train_mode",
    "token_loss_sum", "train",
]
