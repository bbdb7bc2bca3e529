"""``laco gpu-check``: the prepared check for a lent GPU; ``--dry-run`` runs the same plan on the CPU."""

from __future__ import annotations

import os
from typing import Optional

import typer

from laco.cli import app, comma_list


@app.command("gpu-check")
def gpu_check(
    out: Optional[str] = typer.Option(None, "--out", "-o",
                                      help="folder for summary.md/.json, gpu_check.tar.gz, bench_*.md "
                                           "(default: $OUT, else gpu_check_out)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and run it on the CPU at tiny shapes"),
    budget: float = typer.Option(450.0, "--budget", help="seconds for the whole check (steps are capped to fit)"),
    repeats: int = typer.Option(7, "--repeats", min=1, help="timed rounds per bench"),
    warmup: int = typer.Option(1, "--warmup", min=0, help="untimed rounds per bench"),
    only: Optional[str] = typer.Option(None, "--only", help="comma list of steps to run (default: all)"),
) -> None:
    """Run the gpu-marked tests, laco bench at SigLIP-so400m + Qwen2-0.5B/7B (bf16) and a tiny bf16 training run."""
    from pathlib import Path

    from laco.bench.gpu_check import CheckConfig, run_check
    from laco.safety import check_output_path

    folder = out or os.environ.get("OUT") or "gpu_check_out"
    check_output_path(folder, "--out")
    cfg = CheckConfig(out=Path(folder), dry_run=dry_run, budget_s=budget, repeats=repeats, warmup=warmup,
                      only=tuple(comma_list(only) or ()))
    summary = run_check(cfg, echo=typer.echo)
    typer.echo(f"summary: {Path(folder) / 'summary.md'}")
    if not summary["ok"]:
        raise typer.Exit(1)
