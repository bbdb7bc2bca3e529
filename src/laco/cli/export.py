"""``laco export MODEL_DIR [--out OUT]``: add remote code + ``auto_map`` so the model loads without laco."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laco.cli import app


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="a saved LaCo model (+ processor) folder"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write a copy here (must not exist); "
                                                                  "default: add the code to MODEL_DIR in place"),
) -> None:
    """Write the model's code next to its weights (auto_map in config.json / processor_config.json), so that
    AutoModelForImageTextToText / AutoProcessor .from_pretrained(dir, trust_remote_code=True) work without laco."""
    from laco.model.remote import export as export_remote

    target = export_remote(model_dir, out)
    typer.echo(f"remote code written to {target} (load with trust_remote_code=True)")
