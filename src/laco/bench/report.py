"""Analysis and output of a ``laco bench`` run: speedups against the FLOP model, JSON + markdown + PNG.

Files go to ``<out>/<device slug>/<vision>_<llm>.{json,md,png}`` (plus ``*_profile.txt`` when profiled).
Every speedup is relative to the run's baseline method (default ``laco@post``, the paper's external
compression): ``measured = median time(baseline) / median time(method)``, ``predicted = FLOPs(baseline)
/ FLOPs(method)``, and ``efficiency = measured / predicted`` (1.0: the method saves exactly the
time its FLOPs promise). The speedup range is the lowest and highest per-round ratio: methods are
interleaved within a round, so pairing by round cancels load that the round shares.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from laco.io import atomic_write_text

#: issue #5's targets for an inside merge (e.g. laco@1/4) against external compression (laco@post)
TARGETS = {
    "train_stage1": 1.25, "train_stage2": 1.25, "encode_prefill": 1.20,  # minimum measured speedups
    "efficiency": 0.90,  # measured / predicted speedup, for every part with a FLOP difference
    "compressor_share": 0.02,  # merge time / encoder time
}
FB1, FB2 = "train_stage1:forward_backward", "train_stage2:forward_backward"
EFFICIENCY_PARTS = ("encoder", "encode_prefill", "train_stage1", FB1, "train_stage2", FB2)
SPEEDUP_PARTS = ("encoder", "prefill", "encode_prefill", "decode", "generate", "train_stage1", FB1,
                 "train_stage2", FB2)
#: row keys in display order; "<part>:<phase>" rows are the timed phases of a training step
LABELS = {
    "encoder": "encoder", "compressor": "merge (PML)", "projector": "projector", "prefill": "LLM prefill",
    "encode_prefill": "encode + prefill", "decode": "decode", "generate": "generate (e2e)",
    "train_stage1": "train step, stage 1", FB1: "  stage 1: forward+backward",
    "train_stage1:optimizer": "  stage 1: optimizer", "train_stage2": "train step, stage 2",
    FB2: "  stage 2: forward+backward", "train_stage2:optimizer": "  stage 2: optimizer",
}


def _throughput(part: str, seconds: float, cfg: dict[str, Any]) -> tuple[float, str]:
    work = cfg["work"]
    if part == "decode":
        return work["batch_size"] * work["new_tokens"] / seconds, "tokens/s"
    return work["batch_size"] / seconds, "samples/s"


def analyze(result: dict[str, Any]) -> dict[str, Any]:
    """Per (method, part): median, spread, throughput, FLOPs, achieved FLOP/s; speedups; targets."""
    cfg, predicted = result["config"], result["predicted"]
    base = cfg["baseline"]
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    def row(part: str, t: dict[str, Any], flops: float | None, memory: dict[str, int]) -> dict[str, Any]:
        thr, unit = _throughput(part, t["median"], cfg)
        return {
            "median_s": t["median"], "q1_s": t["q1"], "q3_s": t["q3"], "rel_iqr": t["rel_iqr"], "n": t["n"],
            "throughput": thr, "throughput_unit": unit, "flops": flops,
            "gflops_per_s": flops / t["median"] / 1e9 if flops else None,
            "memory_peak": memory.get("peak"), "memory_delta": memory.get("delta"), "samples": t.get("samples", []),
        }

    for rec in result["measured"]:
        m, part = rec["method"], rec["part"]
        rows.setdefault(m, {})[part] = row(part, rec["time"], predicted[m].get(part), rec.get("memory", {}))
        for phase, t in rec.get("splits", {}).items():
            # the FLOP model counts forward + backward; the optimizer step has no matmuls
            flops = predicted[m].get(part) if phase == "forward_backward" else None
            rows[m][f"{part}:{phase}"] = row(part, t, flops, {})
    cpu_clock = result["environment"]["device_type"] == "cpu"
    for rec in result["measured"]:
        if cpu_clock and "cpu_time" in rec:
            c = rec["cpu_time"]
            rows[rec["method"]][rec["part"]].update(cpu_median_s=c["median"], cpu_q1_s=c["q1"], cpu_q3_s=c["q3"],
                                                     cpu_samples=c.get("samples", []))
    speedups = _speedups(rows, base, "")
    speedups_cpu = _speedups(rows, base, "cpu_") if cpu_clock else {}
    shares = {m: p["compressor"]["median_s"] / p["encoder"]["median_s"]
              for m, p in rows.items() if "compressor" in p and "encoder" in p}
    return {"baseline": base, "rows": rows, "speedups": speedups, "speedups_cpu_time": speedups_cpu,
            "compressor_share": shares, "targets": _targets(result, speedups, shares, speedups_cpu)}


def _speedups(rows, base: str, clock: str) -> dict[str, dict[str, dict[str, float]]]:
    """Speedup of every method over ``base`` per part, from wall (``clock=""``) or CPU (``"cpu_"``) times."""
    med, samples = f"{clock}median_s", f"{clock}samples"
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m, parts in rows.items():
        if m == base:
            continue
        for part, r in parts.items():
            b = rows.get(base, {}).get(part)
            if part not in SPEEDUP_PARTS or b is None or not r["flops"] or not b["flops"] or med not in r:
                continue
            measured = b[med] / r[med]
            pred = b["flops"] / r["flops"]
            # range: per-round ratios -- both ran in the same round, so load shared by the round cancels
            paired = [x / y for x, y in zip(b.get(samples, []), r.get(samples, [])) if y > 0]
            out.setdefault(m, {})[part] = {
                "measured": measured, "predicted": pred, "efficiency": measured / pred,
                "low": min(paired, default=measured), "high": max(paired, default=measured), "per_round": paired,
            }
    return out


def _is_inside(method: str, result: dict[str, Any]) -> bool:
    info = result["models"].get(method, {})
    layers = info.get("merge_layers", [])
    return bool(layers) and max(layers) < info.get("encoder_layers", 0)


def _targets(result, speedups, shares, speedups_cpu) -> list[dict[str, Any]]:
    """Issue #5's targets for every inside-merge method, when the baseline is external compression."""
    base = result["config"]["baseline"]
    if _is_inside(base, result) or not result["models"].get(base, {}).get("merge_layers"):
        return []  # the targets compare inside against external (post) compression
    out = []
    for m, sp in speedups.items():
        if not _is_inside(m, result):
            continue
        cpu = speedups_cpu.get(m, {})
        for part in ("train_stage1", "train_stage2", "encode_prefill"):
            if part in sp:
                v, c = sp[part]["measured"], cpu.get(part, {}).get("measured")
                out.append({"method": m, "target": f"{LABELS[part]} speedup >= {TARGETS[part]:.2f}x",
                            "value": v, "met": v >= TARGETS[part], "value_cpu_time": c})
        for part, s in sp.items():
            # the parts (decoding is memory-bound: FLOPs do not predict its time, see docs)
            if part in EFFICIENCY_PARTS and abs(s["predicted"] - 1) > 0.05:
                out.append({"method": m, "target": f"{LABELS[part].strip()}: measured/predicted >= {TARGETS['efficiency']:.2f}",
                            "value": s["efficiency"], "met": s["efficiency"] >= TARGETS["efficiency"],
                            "value_cpu_time": cpu.get(part, {}).get("efficiency")})
        if m in shares:
            out.append({"method": m, "target": f"merge time <= {TARGETS['compressor_share']:.0%} of encoder time",
                        "value": shares[m], "met": shares[m] <= TARGETS["compressor_share"]})
    return out


# -- markdown ---------------------------------------------------------------------------------------
def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(result: dict[str, Any], analysis: dict[str, Any]) -> str:
    cfg, env = result["config"], result["environment"]
    work, rows, base = cfg["work"], analysis["rows"], analysis["baseline"]
    methods = list(rows)
    parts = [p for p in LABELS if any(p in rows[m] for m in methods)]
    load = env.get("loadavg_start"), env.get("loadavg_end")
    md = [
        f"# laco bench: {cfg['vision']} + {cfg['llm']} on {env['device_name']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Device: {env['device_type']} ({env['device_name']}), {env['torch_threads']} torch threads of "
        f"{env['cpu_count']} CPUs, dtype {cfg['dtype']}, attention {cfg['attn_implementation']}. "
        f"Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f", Python {env['python']}. "
        f"Load average (1/5/15 min) at start {_load(load[0])}, at end {_load(load[1])}.",
        "",
        f"Workload: batch {work['batch_size']}, {work['images_per_sample']} image(s) per sample, "
        f"{work['text_tokens']} text tokens, {work['new_tokens']} generated tokens; "
        f"{cfg['warmup']} warm-up round(s), {cfg['repeats']} timed rounds, methods interleaved. "
        f"Random weights at the real shapes. Speedups are relative to **{base}**.",
        "",
        "## Tokens and parameters",
        "",
        _table(["method", "merge after layer", "image tokens", "LLM sequence", "compressor params"],
               [[m, ", ".join(str(k) for k in result["models"][m]["merge_layers"]) or "-",
                 str(result["models"][m]["num_image_tokens"]), str(result["models"][m]["sequence_length"]),
                 f"{result['models'][m]['params']['compressor'] / 1e6:.2f} M"] for m in methods]),
        "",
        "## Median wall time (IQR / median), and process CPU time",
        "",
        _table(["part", *methods],
               [[LABELS[p], *[(f"{rows[m][p]['median_s'] * 1e3:.1f} ms ({rows[m][p]['rel_iqr']:.0%})"
                               + (f", CPU {rows[m][p]['cpu_median_s']:.2f} s" if "cpu_median_s" in rows[m][p] else "")
                               if p in rows[m] else "-") for m in methods]] for p in parts]),
        "",
        "## Throughput and achieved GFLOP/s",
        "",
        _table(["part", *methods],
               [[LABELS[p], *[(f"{rows[m][p]['throughput']:.3g} {rows[m][p]['throughput_unit']}"
                               + (f", {rows[m][p]['gflops_per_s']:.3g} GFLOP/s" if rows[m][p]["gflops_per_s"] else "")
                               if p in rows[m] else "-") for m in methods]] for p in parts]),
        "",
        f"## Speedup against {base}: measured (range over rounds) / FLOP-predicted = efficiency",
        "",
    ]
    md += [_speedup_table(analysis["speedups"], methods), ""]
    if analysis.get("speedups_cpu_time"):
        md += [f"## Speedup against {base} by process CPU time", "",
               "The same, from the CPU seconds this process used (all threads): on a machine shared with other "
               "jobs this counts the work done, not the time spent waiting for a core.", "",
               _speedup_table(analysis["speedups_cpu_time"], methods), ""]
    whole = [p for p in parts if ":" not in p]  # not the phases of a training step
    md += ["## Predicted GFLOPs (whole batch)", "",
           _table(["part", *methods], [[LABELS[p], *[(f"{result['predicted'][m][p] / 1e9:.4g}"
                                                      if result["predicted"][m].get(p) else "-") for m in methods]]
                                       for p in whole]), ""]
    md += ["## Peak memory", "",
           f"{'CUDA max_memory_allocated' if env['device_type'] == 'cuda' else 'Peak RSS of the process'} "
           "during each case (weights included; the growth over the start of the case in brackets).", "",
           _table(["part", *methods], [[LABELS[p], *[(f"{_fmt_bytes(rows[m][p]['memory_peak'])} "
                                                      f"(+{_fmt_bytes(rows[m][p]['memory_delta'])})"
                                                      if p in rows[m] and rows[m][p]["memory_peak"] else "-")
                                                     for m in methods]] for p in whole]), ""]
    if analysis["compressor_share"]:
        md += ["## Merge time as a share of encoder time", "",
               _table(["method", "merge", "encoder", "share"],
                      [[m, f"{rows[m]['compressor']['median_s'] * 1e3:.1f} ms",
                        f"{rows[m]['encoder']['median_s'] * 1e3:.1f} ms", f"{s:.2%}"]
                       for m, s in analysis["compressor_share"].items()]), ""]
    if analysis["targets"]:
        md += ["## Targets (issue #5)", "",
               _table(["method", "target", "value (wall)", "met", "value (CPU time)"],
                       [[t["method"], t["target"], f"{t['value']:.3g}", "yes" if t["met"] else "**no**",
                         "-" if t.get("value_cpu_time") is None else f"{t['value_cpu_time']:.3g}"]
                        for t in analysis["targets"]]), ""]
    return "\n".join(md)


def _speedup_table(sp: dict[str, dict[str, dict[str, float]]], methods: list[str]) -> str:
    cols = [m for m in methods if m in sp]
    parts = [p for p in SPEEDUP_PARTS if any(p in sp[m] for m in cols)]
    return _table(["part", *cols],
                  [[LABELS[p], *[(f"{s['measured']:.2f}x ({s['low']:.2f}-{s['high']:.2f}) / {s['predicted']:.2f}x "
                                  f"= {s['efficiency']:.2f}" if (s := sp[m].get(p)) else "-") for m in cols]]
                   for p in parts])


def _load(v) -> str:
    return "-" if not v else "/".join(f"{x:.2f}" for x in v)


# -- plot -------------------------------------------------------------------------------------------
def plot(result: dict[str, Any], analysis: dict[str, Any], path: Path) -> None:
    """Left: median time per part and method (log scale). Right: measured vs predicted speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, sp, base = analysis["rows"], analysis["speedups"], analysis["baseline"]
    methods = list(rows)
    parts = [p for p in LABELS if any(p in rows[m] for m in methods)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {m: palette[i % len(palette)] for i, m in enumerate(methods)}  # one colour per method, both panels
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(parts))
    for i, m in enumerate(methods):
        med = [rows[m][p]["median_s"] if p in rows[m] else np.nan for p in parts]
        lo = [rows[m][p]["median_s"] - rows[m][p]["q1_s"] if p in rows[m] else 0 for p in parts]
        hi = [rows[m][p]["q3_s"] - rows[m][p]["median_s"] if p in rows[m] else 0 for p in parts]
        ax1.bar(x + i * width, med, width, yerr=[lo, hi], label=m, capsize=2, color=color[m])
    ax1.set_xticks(x + width * (len(methods) - 1) / 2, [LABELS[p] for p in parts], rotation=30, ha="right")
    ax1.set_yscale("log")
    ax1.set_ylabel("median time (s), bars: quartiles")
    ax1.set_title("time per part")
    ax1.legend(fontsize=8)
    others = [m for m in methods if m in sp]
    sp_parts = [p for p in SPEEDUP_PARTS if any(p in sp.get(m, {}) for m in others)]
    x2 = np.arange(len(sp_parts))
    width2 = 0.8 / max(1, len(others))
    for i, m in enumerate(others):
        meas = np.array([sp[m][p]["measured"] if p in sp[m] else np.nan for p in sp_parts])
        lo = np.array([sp[m][p]["low"] if p in sp[m] else np.nan for p in sp_parts])
        hi = np.array([sp[m][p]["high"] if p in sp[m] else np.nan for p in sp_parts])
        pred = [sp[m][p]["predicted"] if p in sp[m] else np.nan for p in sp_parts]
        ax2.bar(x2 + i * width2, meas, width2, yerr=[np.nan_to_num(meas - lo), np.nan_to_num(hi - meas)],
                       capsize=2, label=f"{m} measured", color=color[m])
        ax2.scatter(x2 + i * width2, pred, marker="_", s=300, color="black", zorder=3,
                    label="FLOP-predicted" if i == 0 else None)
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set_xticks(x2 + width2 * (len(others) - 1) / 2, [LABELS[p] for p in sp_parts], rotation=30, ha="right")
    ax2.set_ylabel(f"speedup vs {base}")
    ax2.set_title(f"measured (bars; range of per-round ratios) vs predicted (black) speedup over {base}")
    ax2.legend(fontsize=8)
    cfg, env = result["config"], result["environment"]
    fig.suptitle(f"laco bench: {cfg['vision']} + {cfg['llm']}, batch {cfg['work']['batch_size']}, "
                 f"{env['device_name']} ({env['torch_threads']} threads), {cfg['dtype']}")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


# -- writing ----------------------------------------------------------------------------------------
def result_stem(result: dict[str, Any]) -> str:
    cfg = result["config"]
    tag = f"{cfg['vision']}_{cfg['llm']}_b{cfg['work']['batch_size']}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tag)


def write_report(result: dict[str, Any], out_dir: str | Path, *, plot_png: bool = True) -> dict[str, Path]:
    """Write ``<stem>.json`` (raw result + analysis), ``.md``, ``.png`` (and profiles) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    analysis = analyze(result)
    stem = result_stem(result)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    atomic_write_text(paths["json"], json.dumps({**result, "analysis": analysis}, indent=1, default=str))
    atomic_write_text(paths["markdown"], to_markdown(result, analysis) + "\n")
    if plot_png:
        paths["png"] = out / f"{stem}.png"
        plot(result, analysis, paths["png"])
    if result.get("profiles"):
        paths["profile"] = out / f"{stem}_profile.txt"
        atomic_write_text(paths["profile"], "\n\n".join(f"## {m}: encoder forward\n{t}"
                                                     for m, t in result["profiles"].items()))
    return paths
