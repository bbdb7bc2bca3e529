"""``laco train CONFIG.yaml [--resume]``: run the stages of a YAML run config (see docs/training.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laco.cli import app


@app.command("train")
def train_command(
    config: Path = typer.Argument(..., help="YAML run config: model, data, stages (see configs/train/)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in output_dir exactly where it stopped"),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="override the config's output_dir"),
) -> None:
    """Train a LaCo MLLM stage by stage (stage 1: PML + projector; stage 2: what the config lists).

    Multi-process: accelerate launch --config_file configs/accelerate/ddp.yaml -m laco.train CONFIG.yaml
    """
    from laco.train import NonFiniteLossError, load_run_config, train
    from laco.train.build import build_from_source

    cfg = load_run_config(config)
    if output_dir is not None:
        cfg.output_dir = output_dir
    model, processor = build_from_source(cfg.model, cfg.seed)
    try:
        result = train(model, processor, None, cfg, resume=resume)
    except NonFiniteLossError as err:
        typer.echo(f"laco: training stopped: {err}", err=True)
        raise typer.Exit(1) from None
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    last = result.losses[-1] if result.losses else None
    typer.echo(f"done: {result.global_step} steps; final model in {result.model_dir}"
               + (f"; last loss {last:.4f}" if last is not None else ""))
