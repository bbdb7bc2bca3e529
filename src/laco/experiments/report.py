"""Results of ``laco compare``: results.json, results.md, PNG plots, command.txt, and the rich table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from laco.compressors.spec import MethodSpec, parse_method
from laco.io import atomic_write_text


def _spec(r: dict[str, Any]) -> MethodSpec:
    """The method of a result row (rows before #15 spell "laco@post" "ext_laco": an accepted alias)."""
    return parse_method(r["method"])


def _fmt(mean: float | None, std: float | None, seeds: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f}"


def _num(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table_rows(results: dict[str, Any], scenario: str) -> tuple[list[str], list[list[str]]]:
    """Header and string rows of one scenario's table (shared by markdown and rich)."""
    retro = scenario in ("retrofit", "readout")
    header = ["method", "merge after layer", "visual tokens", "enc. GFLOPs", "FLOP ratio", "accuracy %"]
    if retro:
        header.insert(5, "before training %")
    header += ["train samples/s", "infer samples/s", "trainable params"]
    rows = []
    for r in results["table"]:
        if r["scenario"] != scenario:
            continue
        depth = "–" if r["merge_layer"] is None else (
            "post" if r["merge_layer"] == r["num_layers"] else f"{r['merge_layer']} of {r['num_layers']}")
        row = [r["method"], depth, str(r["visual_tokens"]), f"{r['encoder_gflops']:.3f}", f"{r['encoder_flop_ratio']:.2f}",
               _fmt(r["acc_mean"], r["acc_std"], r["seeds"])]
        if retro:
            row.insert(5, _fmt(r["before_mean"], r["before_std"], r["seeds"]))
        row += [_num(r["train_samples_per_s"]), _num(r["infer_samples_per_s"]), f"{r['trainable_params']:,}"]
        rows.append(row)
    return header, rows


def task_rows(results: dict[str, Any], scenario: str) -> tuple[list[str], list[list[str]]]:
    tasks = sorted({t for r in results["table"] if r["scenario"] == scenario for t in r["per_task"]})
    rows = [[r["method"], *[_num(r["per_task"].get(t)) for t in tasks]]
            for r in results["table"] if r["scenario"] == scenario]
    return ["method", *tasks], rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


SCENARIO_TEXT = {
    "readout": "the feasibility protocol on the same encoder: compressor inserted, trained alone against the frozen "
               "pretrained quadrant read-out (accuracy = quadrant classification of the test scenes)",
    "train": "pretrained encoder (frozen) + new compressor and projector; stage 1 trains compressor + projector "
             "(LLM frozen), stage 2 also the LLM",
    "retrofit": "the trained uncompressed MLLM with the compressor inserted; only the compressor is trained, "
                "everything else frozen ('before training' = right after insertion)",
}


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    enc = results["encoder"]["pretrain_metrics"]
    seeds = cfg["seeds"]
    out = [
        f"# laco compare — preset `{results['preset']}`",
        "",
        f"Data: {results['data_source']} scenes ({cfg['data']['num_train']} train conversations, "
        f"{cfg['data']['num_test']} test scenes, {cfg['data']['canvas']} px). Encoder: SigLIP-structured, "
        f"{cfg['pretrain']['num_hidden_layers']} layers, width {cfg['pretrain']['hidden_size']}, pretrained on quadrant "
        f"classification (held-out quadrant accuracy {enc['quadrant_acc']}%, dot colour {enc['dot_acc']}%). "
        f"LLM: Qwen2-structured, {cfg['llm']['num_hidden_layers']} layers, width {cfg['llm']['hidden_size']}. "
        f"Seeds: {seeds}. Accuracy: greedy exact match on the test questions"
        + (" (mean ± sample std over seeds)." if len(seeds) > 1 else " (one seed)."),
        "",
        f"Budgets: stage 1 {cfg['stage1_steps']} steps, stage 2 {cfg['stage2_steps']} steps, retrofit "
        f"{cfg['retrofit_steps']} steps, batch {cfg['batch_size']}. Throughput: real model from pixels, "
        f"{results['environment']['threads']} threads, median of {cfg['timing_batches']} batches of "
        f"{cfg['timing_batch_size']} (training = forward + backward, stage-2 / retrofit trainable set).",
        "",
    ]
    for scenario in ("readout", "train", "retrofit"):
        if not any(r["scenario"] == scenario for r in results["table"]):
            continue
        out += [f"## Scenario: {scenario}", "", SCENARIO_TEXT[scenario], "", _md_table(*table_rows(results, scenario)), "",
                "Accuracy per task (%):", "", _md_table(*task_rows(results, scenario)), ""]
    pairs = results.get("contrasts") or []
    if pairs:
        out += ["## Paired differences (A - B, accuracy points, same seed)", "",
                _md_table(["scenario", "A", "B", "mean ± std", "per seed", "verdict"],
                          [[c["scenario"], c["a"], c["b"], _fmt(c["mean"], c["std"], len(c["seeds"])),
                            ", ".join(f"{x:+.1f}" for x in c["diffs"]), c["verdict"]] for c in pairs]), ""]
    out += ["![accuracy vs encoder FLOPs](acc_vs_flops.png)", "", "![accuracy vs depth](acc_vs_depth.png)", ""]
    if any(r.get("curve") for r in results["table"]):
        out += ["![learning curves](acc_vs_step.png)", ""]
    t = results["timings_s"]
    parts = results.get("merged_from") or []
    if parts:
        out += [f"Merged from {len(parts)} runs (`laco compare --merge`); times below are their sum. Parts:", ""]
        out += [f"- seeds {p['seeds']}: `{p['command']}` ({p['timings_s'].get('total_s', 0):.0f} s, "
                f"{p['environment']['threads']} threads)" for p in parts]
        out += [""]
    out += [f"{'Summed' if parts else 'Wall'} time: {t.get('total_s', 0):.0f} s (data {t.get('data_s', 0):.0f} s, encoder "
            f"{t.get('encoder_s', 0):.0f} s, LLM text pretraining {t.get('llm_pretrain_s', 0):.0f} s, "
            f"feature cache {t.get('cache_s', 0):.0f} s).", ""]
    if results.get("command"):
        out += ["Command:", "", "```", results["command"], "```", ""]
    return "\n".join(out)


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """acc_vs_flops.png (one panel per scenario) and acc_vs_depth.png (laco / pixel_shuffle by merge depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in ("readout", "train", "retrofit") if any(r["scenario"] == s for r in results["table"])]
    paths = []
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios), 4.8), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        for r in (r for r in results["table"] if r["scenario"] == scenario):
            comp = _spec(r).compressor
            colour = {"laco": "C0", "pixel_shuffle": "C3", "none": "gray"}.get(comp, "C2")
            ax.errorbar(r["encoder_gflops"], r["acc_mean"], yerr=r["acc_std"] or None, fmt="o", color=colour, capsize=3)
            if r["before_mean"] is not None and scenario != "train":
                ax.plot([r["encoder_gflops"]], [r["before_mean"]], marker="x", color=colour, alpha=0.5)
            ax.annotate(r["method"], (r["encoder_gflops"], r["acc_mean"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xlabel("encoder GFLOPs per image")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{scenario}" + (" (x = before training)" if scenario != "train" else ""))
        ax.grid(alpha=0.3)
    fig.suptitle(f"laco compare ({results['preset']}): accuracy vs encoder FLOPs")
    fig.tight_layout()
    paths.append(out / "acc_vs_flops.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(scenarios), figsize=(6.5 * len(scenarios), 4.5), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        rows = [r for r in results["table"] if r["scenario"] == scenario and r["merge_layer"] is not None]
        for family, colour in (("laco", "C0"), ("pixel_shuffle", "C3")):
            pts = sorted((r["merge_layer"] / r["num_layers"], r["acc_mean"], r["acc_std"]) for r in rows
                         if _spec(r).compressor == family)
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=[e or 0 for e in es], marker="o", color=colour, capsize=3, label=family)
        for r in rows:
            if _spec(r).compressor not in ("laco", "pixel_shuffle"):
                ax.plot(r["merge_layer"] / r["num_layers"], r["acc_mean"], "s", color="C2", alpha=0.6)
                ax.annotate(r["method"].split("@")[0], (r["merge_layer"] / r["num_layers"], r["acc_mean"]), fontsize=7,
                            xytext=(4, -8), textcoords="offset points")
        none = [r for r in results["table"] if r["scenario"] == scenario and r["method"] == "none"]
        if none:
            ax.axhline(none[0]["acc_mean"], color="gray", ls="--", label="none (64 tokens)")
        ax.set_xlabel("merge depth k / L (1 = after the encoder)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(scenario)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"laco compare ({results['preset']}): accuracy vs merge depth")
    fig.tight_layout()
    paths.append(out / "acc_vs_depth.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    curves = [r for r in results["table"] if r["scenario"] == "train" and r.get("curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for r in curves:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker=".", label=r["method"], ls="--" if _spec(r).layer == "post" else "-")
        ax.axvline(results["config"]["stage1_steps"], color="gray", lw=0.8)
        limit = results["config"].get("curve_limit")
        ax.set_xlabel("training step (stage 1 + stage 2)")
        ax.set_ylabel("test accuracy (%)" + (f", first {limit} questions" if limit else ""))
        ax.set_title(f"laco compare ({results['preset']}), train scenario: learning curves (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out / "acc_vs_step.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(out / "results.md", markdown(results))
    if results.get("command"):
        atomic_write_text(out / "command.txt", results["command"] + "\n")
    plot(results, out)


def print_table(results: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for scenario in ("readout", "train", "retrofit"):
        header, rows = table_rows(results, scenario)
        if not rows:
            continue
        table = Table(title=f"laco compare ({results['preset']}) — {scenario}: {SCENARIO_TEXT[scenario]}")
        for h in header:
            table.add_column(h, justify="left" if h == "method" else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
