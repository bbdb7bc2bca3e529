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
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: "
                                       "MODEL_DIR/eval/<data stem>-<data hash>)"),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="questions per generate call"),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="generation budget per answer"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="evaluate only the first N records"),
    fresh: bool = typer.Option(False, "--fresh", help="discard predictions already in --out (of another model, "
                                                      "data file or setting) and start over"),
    device: str = typer.Option("auto", "--device", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."),
    dtype: str = typer.Option("auto", "--dtype", help="'auto' (as saved), 'float32', 'bfloat16', 'float16'"),
) -> None:
    """Batched greedy generation + scoring; writes predictions.jsonl, summary.json/.md/.png; resumable."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from laco.eval import evaluate, load_records

    from laco.cli.generate import check_new_tokens
    from laco.eval.evaluator import check_images
    from laco.safety import check_device, check_model_dir, check_output_path, sha256_file

    # every argument and input is checked before the model is loaded (bad data: every image decoded too)
    check_device(device, allow_auto=True)
    if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"--dtype must be 'auto' or a torch dtype name such as 'bfloat16', got {dtype!r}")
    check_images(load_records(data, images), data)
    check_model_dir(model_dir, processor=True)
    check_new_tokens(model_dir, max_new_tokens)
    # the default folder is keyed by the data file's content: another file with the same name gets its own
    out_dir = out if out is not None else model_dir / "eval" / f"{data.stem}-{sha256_file(data)[:10]}"
    check_output_path(out_dir, "--out")
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import laco.model  # noqa: F401  (registers model_type 'laco' with the Auto classes)

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(model_dir)
    model.to(torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device))
    summary = evaluate(model, processor, data, image_dir=images, out_dir=out_dir, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, limit=limit, fresh=fresh)

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
