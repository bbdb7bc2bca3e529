"""A run's curves: ``metrics.jsonl`` -> ``training.png`` (loss and learning rate per optimizer step, one colour per stage)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    """Plot loss and learning rates against the run's global step; return the PNG path (default: beside the JSONL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = Path(metrics_path)
    rows = [json.loads(x) for x in metrics_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if not rows:
        raise ValueError(f"{metrics_path} holds no metrics")
    png_path = Path(png_path) if png_path is not None else metrics_path.with_name("training.png")
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[2, 1])
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    for i, stage in enumerate(stages):
        sel = [r for r in rows if r["stage"] == stage]
        steps = [r["global_step"] for r in sel]
        ax_loss.plot(steps, [r["loss"] for r in sel], color=f"C{i}", label=f"stage {stage}")
        for j, group in enumerate(sel[0]["lr"]):
            ax_lr.plot(steps, [r["lr"][group] for r in sel], color=f"C{i}", ls=["-", "--", ":", "-."][j % 4],
                       label=f"{stage}: {group}")
    ax_loss.set_ylabel("loss (assistant tokens)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.legend(fontsize=7, ncol=2)
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
