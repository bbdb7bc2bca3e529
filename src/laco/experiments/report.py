"""Results of ``laco compare``: results.json, results.md, PNG plots, command.txt, and the rich table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from laco.compressors.spec import MethodSpec, parse_method
from laco.experiments.compare.presets import MLLM_SCENARIOS
from laco.io import atomic_write_text


def _spec(r: dict[str, Any]) -> MethodSpec:
    """The method of a result row (rows before #15 spell "laco@post" "ext_laco": an accepted alias)."""
    return parse_method(r["method"])


def _fmt(mean: float | None, std: float | None, seeds: int | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.1f} ± {std:.1f}" if (seeds or 1) > 1 else f"{mean:.1f}"


def _num(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _depth(r: dict[str, Any]) -> str:
    if r["merge_layer"] is None:
        return "–"
    return "post" if r["merge_layer"] == r["num_layers"] else f"{r['merge_layer']} of {r['num_layers']}"


def table_rows(results: dict[str, Any], scenario: str) -> tuple[list[str], list[list[str]]]:
    """Header and string rows of one scenario's table (shared by markdown and rich). MLLM scenarios end with
    the reference rows: the blind baseline and the text-only LLM."""
    retro = scenario in ("retrofit", "readout")
    header = ["method", "merge after layer", "visual tokens", "enc. GFLOPs", "FLOP ratio", "accuracy %"]
    if retro:
        header.insert(5, "before training %")
    header.append("trainable params")
    rows = []
    for r in results["table"]:
        if r["scenario"] != scenario:
            continue
        acc = "n/a" if r.get("not_applicable") else _fmt(r["acc_mean"], r["acc_std"], r["seeds"])
        row = [r["method"], _depth(r), str(r["visual_tokens"]), f"{r['encoder_gflops']:.3f}",
               f"{r['encoder_flop_ratio']:.2f}", acc]
        if retro:
            row.insert(5, "n/a" if r.get("not_applicable") else _fmt(r["before_mean"], r["before_std"], r["seeds"]))
        rows.append(row + [f"{r['trainable_params']:,}"])
    if rows and scenario in MLLM_SCENARIOS:
        for b in results.get("baselines") or []:
            row = [f"*{b['name']}*", "", "0", "", "", _fmt(b["acc_mean"], b["acc_std"], b["seeds"])]
            rows.append(row[:5] + [""] + row[5:] + [""] if retro else row + [""])
    return header, rows


def task_rows(results: dict[str, Any], scenario: str) -> tuple[list[str], list[list[str]]]:
    tasks = sorted({t for r in results["table"] if r["scenario"] == scenario for t in r["per_task"]})
    rows = [[r["method"], *[_num(r["per_task"].get(t)) for t in tasks]]
            for r in results["table"] if r["scenario"] == scenario]
    if rows and scenario in MLLM_SCENARIOS:
        rows += [[f"*{b['name']}*", *[_num(b["per_task"].get(t)) for t in tasks]] for b in results.get("baselines") or []]
    return ["method", *tasks], rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


SCENARIO_TEXT = {
    "readout": "the feasibility protocol on the same encoder: compressor inserted, trained alone against the frozen "
               "pretrained quadrant read-out (accuracy = quadrant classification of the eval scenes)",
    "train": "encoder frozen throughout: pretrained encoder + new compressor and projector; stage 1 trains "
             "compressor + projector (LLM frozen), stage 2 also the LLM",
    "train_encoder": "the same stage 1, then stage 2 trains compressor, projector, LLM and the encoder's layers "
                     "(at a lower learning rate), as LLaVA-OneVision's stage 2 does",
    "retrofit": "the trained uncompressed MLLM with the compressor inserted; only the compressor is trained, "
                "everything else frozen ('before training' = right after insertion)",
}


def _encoder_accuracies(encoder: dict[str, Any], seeds: list[int]) -> str:
    """Held-out accuracies of the pretrained encoder of each seed (a merged run has ``per_seed``)."""
    per_seed = encoder.get("per_seed") or {str(seeds[0]): encoder["pretrain_metrics"]}
    return "; ".join(f"seed {s}: held-out quadrant accuracy {m['quadrant_acc']}%, dot colour {m['dot_acc']}%"
                     for s, m in per_seed.items())


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    seeds = cfg["seeds"]
    split = results.get("eval_split", "test")
    out = [
        f"# laco compare — preset `{results['preset']}`",
        "",
        _user_intro(results) if results.get("data") else
        f"Data: {results['data_source']} scenes ({cfg['data']['num_train']} train conversations, "
        f"{cfg['data'][f'num_{split}']} {split} scenes, {cfg['data']['canvas']} px). Encoder: SigLIP-structured, "
        f"{cfg['pretrain']['num_hidden_layers']} layers, width {cfg['pretrain']['hidden_size']}, pretrained on quadrant "
        f"classification ({_encoder_accuracies(results['encoder'], seeds)}). LLM: Qwen2-structured, "
        f"{cfg['llm']['num_hidden_layers']} layers, width {cfg['llm']['hidden_size']}, trained on the questions as text first. Seeds: {seeds}"
        + (" (each seed pretrains its own encoder and LLM and draws its own data order; the projector starts from "
           "the same weights for every method of a seed)" if "blind" in results else "")
        + f". Accuracy: greedy exact match on the {split} questions"
        + (" (mean ± sample std over seeds)." if len(seeds) > 1 else " (one seed)."),
        "",
        f"Budgets (batch {cfg['batch_size']}): readout {cfg['readout_steps']} steps at lr {cfg['lr_stage1']:g}; "
        f"stage 1 {cfg['stage1_steps']} steps at lr {cfg['lr_stage1']:g}, stage 2 {cfg['stage2_steps']} steps at lr "
        f"{cfg['lr_stage2']:g} (train_encoder's encoder layers: {cfg.get('lr_stage2_encoder', 0):g}), retrofit "
        f"{cfg['retrofit_steps']} steps at lr {cfg['lr_retrofit']:g}. Speed is `laco bench`'s job: accuracy runs "
        "on a shared 2-core machine do not time methods fairly.",
        "",
    ]
    if cfg.get("scenario_methods"):
        out += ["Methods per scenario: " + "; ".join(f"{sc}: {len(ms)} ({', '.join(ms)})"
                                                    for sc, ms in cfg["scenario_methods"].items()) + ".", ""]
    for scenario in SCENARIO_TEXT:
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


def _user_intro(results: dict[str, Any]) -> str:
    from laco.experiments.compare.userdata import markdown_intro  # laco compare --data

    return markdown_intro(results)


def _style(rows: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """(colour, marker) per method: a colour per method, the marker says where it merges."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    out = {}
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        layer = _spec({"method": m}).layer
        marker = "D" if m == "none" else "s" if layer == "post" else "o"
        # tab20 pairs a dark and a light shade of each hue: the first 10 methods get the 10 dark hues
        out[m] = ("gray" if m == "none" else cmap((2 * i) % 20 + (i // 10) % 2), marker)
    return out


def _reference_lines(ax, results: dict[str, Any], scenario: str) -> None:
    """The blind baseline and the text-only LLM as horizontal lines (MLLM scenarios)."""
    if scenario not in MLLM_SCENARIOS:
        return
    for b, ls in zip(results.get("baselines") or [], ("--", ":")):
        ax.axhline(b["acc_mean"], color="black", ls=ls, lw=1, label=b["name"])


def _finish(fig, axes, title: str, path: Path) -> Path:
    """y from 0 (a zoomed axis makes noise look like a ranking), one legend for the figure, saved."""
    handles = {}
    for ax in axes:
        ax.set_ylim(bottom=0, top=max(1.08 * ax.get_ylim()[1], 10))  # room above the top point and lines
        ax.grid(alpha=0.3)
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """acc_vs_flops.png (one panel per scenario), acc_vs_depth.png (laco / pixel_shuffle by merge depth) and,
    with learning curves, acc_vs_step.png; error bars = std over seeds; blind and text-only lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in results["table"] if r["acc_mean"] is not None]
    scenarios = [s for s in SCENARIO_TEXT if any(r["scenario"] == s for r in table)]
    style, name = _style(table), results["preset"]
    paths = []
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.5 * len(scenarios), 4.6), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        for r in (r for r in table if r["scenario"] == scenario):
            colour, marker = style[r["method"]]
            ax.errorbar(r["encoder_gflops"], r["acc_mean"], yerr=r["acc_std"] or None, fmt=marker, color=colour,
                        capsize=3, label=r["method"])
            if r["before_mean"] is not None and scenario != "train":
                ax.plot([r["encoder_gflops"]], [r["before_mean"]], marker="x", color=colour, alpha=0.5)
        _reference_lines(ax, results, scenario)
        ax.set_xlabel("encoder GFLOPs per image")
        ax.set_ylabel(f"{results.get('eval_split', 'test')} accuracy (%)")
        ax.set_title(scenario + (" (x = before training)" if scenario in ("readout", "retrofit") else ""))
    paths.append(_finish(fig, axes[0], f"laco compare ({name}): accuracy vs encoder FLOPs (mean ± std over seeds)",
                         out / "acc_vs_flops.png"))

    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.5 * len(scenarios), 4.3), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        rows = [r for r in table if r["scenario"] == scenario]
        for family, colour in (("laco", "C0"), ("pixel_shuffle", "C3")):  # the default variants, by depth
            pts = sorted((r["merge_layer"] / r["num_layers"], r["acc_mean"], r["acc_std"]) for r in rows
                         if _spec(r).compressor == family and not _spec(r).kwargs and r["merge_layer"] is not None)
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=[e or 0 for e in es], marker="o", color=colour, capsize=3, label=family)
        for r in rows:
            spec = _spec(r)
            if r["merge_layer"] is not None and (spec.compressor not in ("laco", "pixel_shuffle") or spec.kwargs):
                colour, marker = style[r["method"]]
                ax.errorbar(r["merge_layer"] / r["num_layers"], r["acc_mean"], yerr=r["acc_std"] or None,
                            fmt=marker, color=colour, alpha=0.8, capsize=3, label=r["method"])
        none = [r for r in rows if r["method"] == "none"]
        if none:
            ax.axhline(none[0]["acc_mean"], color="gray", lw=1, label="none (all tokens)")
        _reference_lines(ax, results, scenario)
        ax.set_xlabel("merge depth k / L (1 = after the encoder)")
        ax.set_ylabel(f"{results.get('eval_split', 'test')} accuracy (%)")
        ax.set_title(scenario)
    paths.append(_finish(fig, axes[0], f"laco compare ({name}): accuracy vs merge depth", out / "acc_vs_depth.png"))

    curves = [r for r in table if r["scenario"] in ("train", "train_encoder") and r.get("curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for r in curves:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker=".", color=style[r["method"]][0], ls="-" if r["scenario"] == "train" else "--",
                    label=f"{r['method']} ({r['scenario']})")
        ax.axvline(results["config"]["stage1_steps"], color="gray", lw=0.8)
        _reference_lines(ax, results, "train")
        limit = results["config"].get("curve_limit")
        ax.set_xlabel("training step (stage 1 + stage 2)")
        ax.set_ylabel("accuracy (%)" + (f", first {limit} questions" if limit else ""))
        paths.append(_finish(fig, [ax], f"laco compare ({name}): learning curves (mean over seeds)",
                             out / "acc_vs_step.png"))
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
    for scenario in SCENARIO_TEXT:
        header, rows = table_rows(results, scenario)
        if not rows:
            continue
        table = Table(title=f"laco compare ({results['preset']}) — {scenario}: {SCENARIO_TEXT[scenario]}")
        for h in header:
            table.add_column(h, justify="left" if h == "method" else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
