"""``laco convert``: a LLaVA / LLaVA-OneVision checkpoint -> a LaCo model with a zero-initialised PML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from laco.cli import app


@app.command()
def convert(
    src_dir: Path = typer.Argument(..., help="Hugging Face LlavaForConditionalGeneration / "
                                             "LlavaOnevisionForConditionalGeneration checkpoint directory"),
    out_dir: Path = typer.Argument(..., help="where the LaCo model is written (must not exist unless --overwrite)"),
    layer: str = typer.Option("1/4", "--layer", "-l", help="merge after layer: int k, fraction '1/4', 'post', "
                                                           "or a comma list"),
    ratio: int = typer.Option(2, "--ratio", "-r", help="merge r x r tokens into one"),
    method: str = typer.Option("laco", "--method", "-m", help="compressor (laco starts as exact average pooling)"),
    proj: Optional[str] = typer.Option(None, "--proj", help="PML projection: mlp (default) or linear"),
    pad: Optional[str] = typer.Option(None, "--pad", help="odd grids: replicate (default), zero, crop, error"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT_DIR if it exists"),
    as_json: bool = typer.Option(False, "--json", help="print the conversion report as JSON"),
) -> None:
    """Insert the PML into the vision tower (zero-init: starts as in-encoder average pooling); carry the
    tower, projector and LLM weights over unchanged; save a LaCo model + processor for `laco train` stage 1."""
    from rich.console import Console

    from laco.cli.info import parse_layers
    from laco.model.convert import convert_checkpoint

    kwargs = {k: v for k, v in (("proj", proj), ("pad", pad)) if v is not None}
    report = convert_checkpoint(src_dir, out_dir, layer=parse_layers(layer), ratio=ratio, method=method,
                                compressor_kwargs=kwargs, overwrite=overwrite)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    console = Console()
    console.print(f"converted {report.architecture} {report.source} -> {report.out_dir}")
    console.print(f"  {report.compression['method']} after layer(s) {report.merge_after_layers} of "
                  f"{report.encoder_layers_run} run, r = {report.compression['ratio']}")
    console.print(f"  image tokens per image: {report.tokens_per_image_before} -> {report.tokens_per_image_after}; "
                  f"encoder FLOP ratio {report.encoder_flop_ratio:.3f}")
    for note in report.notes:
        console.print(f"  [yellow]note:[/] {note}")
    console.print(f"next: train stage 1 (PML + projector) with `laco train` using model: {{pretrained: {out_dir}}}")
