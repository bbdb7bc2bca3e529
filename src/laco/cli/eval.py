"""``laco eval``: score a saved LaCo model on a JSONL VQA file (see docs/evaluation.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laco.cli import app


@app.command("eval")
def eval_(
    model_dir: Path = typer.Argument(..., help="a saved LaCo model folder (save_pretrained of model + processor)"),
    data: Path = typer.Option(..., "--data", "-d", help="JSONL eval file, one question per line"),
    images: Optional[Path] = typer.Option(None, "--images", "-i", help="image folder (default: the data file's)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: MODEL_DIR/eval/<data stem>)"),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="questions per generate call"),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="generation budget per answer"),
    limit: Optional[int] = typer.Option(None, "--limit", help="evaluate only the first N records"),
    device: str = typer.Option("auto", "--device", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."),
    dtype: str = typer.Option("auto", "--dtype", help="'auto' (as saved), 'float32', 'bfloat16', 'float16'"),
) -> None:
    """Batched greedy generation + scoring; writes predictions.jsonl, summary.json/.md/.png; resumable."""
    import torch
    from rich.console import Console
    from rich.table import Table

    import laco  # noqa: F401  (registers model_type "laco" with the Auto classes)
    from laco.eval import evaluate, load_records

    load_records(data, images)  # bad data fails here, before the model is loaded
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"not a saved model folder (no config.json): {model_dir}")
    if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"--dtype must be 'auto' or a torch dtype name such as 'bfloat16', got {dtype!r}")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(model_dir)
    model.to(torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device))
    out_dir = out if out is not None else model_dir / "eval" / data.stem
    summary = evaluate(model, processor, data, image_dir=images, out_dir=out_dir, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, limit=limit)

    console = Console()
    console.print(f"[bold]{model_dir.name}[/bold] on {data.name}: accuracy {100 * summary['accuracy']:.2f}% "
                  f"over {summary['num_samples']} questions")
    table = Table()
    for col in ("group", "n", "accuracy (%)"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for key, label in (("per_task", "task"), ("per_turn", "turn")):
        for name, g in summary[key].items():
            table.add_row(f"{label} {name}", str(g["n"]), f"{100 * g['accuracy']:.2f}")
    console.print(table)
    console.print(f"wrote {out_dir}/predictions.jsonl, summary.json, summary.md, summary.png")
