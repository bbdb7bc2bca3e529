"""Analysis and output of a ``laco bench`` run: speedups against the FLOP model, JSON + markdown + PNG.

Files go to ``<out>/<device slug>/<vision>_<llm>.{json,md,png}`` (plus ``*_profile.txt`` when profiled).
Every speedup is relative to the run's baseline method (default ``laco@post``, the paper's external
compression): ``measured = median time(baseline) / median time(method)``, ``predicted = FLOPs(baseline)
/ FLOPs(method)``, and ``efficiency = measured / predicted`` (1.0: the method saves exactly the
time its FLOPs promise). The speedup range is the lowest and highest per-round ratio: methods are
interleaved within a round, so pairing by round cancels load that the round shares.

Rounds taken under load are flagged (``round_flags``): the 1-minute load average above the run's
``load_threshold`` at the round's start or end, a round that started above ``--max-load`` after waiting,
or a round whose process CPU time per wall second fell below ``STARVED`` of the best round's (the process
waited for a core; CPU runs only). ``paired`` gives the median and range of the per-round ratios over all
rounds and over the unflagged ones, from wall time and from CPU time.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from laco.io import atomic_write, atomic_write_text

#: targets for an inside merge (e.g. laco@1/4) against external compression (laco@post): issue #18's, at
#: 0.90 of the FLOP model's prediction for SigLIP-so400m-384 + Qwen2-0.5B (issue #5 had 1.25 / 1.25 / 1.20)
TARGETS = {
    "train_stage1": 1.12, "train_stage2": 1.50, "encode_prefill": 1.58,  # minimum measured speedups
    "efficiency": 0.90,  # measured / predicted speedup, for every part with a FLOP difference
    "compressor_share": 0.02,  # merge time / encoder time
}
STARVED = 0.8  # a round whose CPU seconds per wall second are under 80% of the best round's is flagged
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
    flags = round_flags(result)
    flagged = [bool(f) for f in flags]
    speedups = _speedups(rows, base, "", flagged)
    speedups_cpu = _speedups(rows, base, "cpu_", flagged) if cpu_clock else {}
    shares = {m: p["compressor"]["median_s"] / p["encoder"]["median_s"]
              for m, p in rows.items() if "compressor" in p and "encoder" in p}
    return {"baseline": base, "rows": rows, "speedups": speedups, "speedups_cpu_time": speedups_cpu,
            "compressor_share": shares, "targets": _targets(result, speedups, shares, speedups_cpu),
            "round_flags": flags}


def round_flags(result: dict[str, Any]) -> list[list[str]]:
    """Why each timed round is suspect (an empty list: clean); one entry per timed round, in order."""
    rounds = [r for r in result.get("rounds", []) if not r["warmup"]]
    threshold = result["config"].get("load_threshold")
    cpu_clock = result["environment"]["device_type"] == "cpu"
    busy = [r["cpu_s"] / r["wall_s"] if r["wall_s"] > 0 else 0.0 for r in rounds]
    best = max(busy, default=0.0)
    out = []
    for r, b in zip(rounds, busy):
        f = []
        loads = [x[0] for x in (r["loadavg_start"], r["loadavg_end"]) if x]
        if threshold is not None and loads and max(loads) > threshold:
            f.append(f"load {max(loads):.1f} > {threshold:g}")
        if r.get("over_max_load"):
            f.append("started over --max-load")
        if cpu_clock and best > 0 and b < STARVED * best:
            f.append(f"CPU/wall {b:.2f} < {STARVED:.0%} of best {best:.2f}")
        out.append(f)
    return out


def paired(base: list[float], other: list[float], flagged: list[bool] = ()) -> dict[str, Any]:
    """Per-round ratios ``base[i] / other[i]``: median, range and count, over all rounds and unflagged ones."""
    ratios = [b / o for b, o in zip(base, other) if o > 0]
    if not ratios:
        raise ValueError("no per-round samples to pair")
    flagged = list(flagged) + [False] * (len(ratios) - len(flagged))  # results without round records: none flagged
    clean = [x for x, f in zip(ratios, flagged) if not f]

    def stats(xs: list[float]) -> dict[str, Any] | None:
        return {"median": statistics.median(xs), "low": min(xs), "high": max(xs), "n": len(xs)} if xs else None

    return {**stats(ratios), "per_round": ratios, "unflagged": stats(clean)}


def _speedups(rows, base: str, clock: str, flagged: list[bool] = ()) -> dict[str, dict[str, dict[str, float]]]:
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
            rounds = paired(b[samples], r[samples], flagged) if b.get(samples) and r.get(samples) else None
            out.setdefault(m, {})[part] = {
                "measured": measured, "predicted": pred, "efficiency": measured / pred,
                "low": rounds["low"] if rounds else measured, "high": rounds["high"] if rounds else measured,
                "per_round": rounds["per_round"] if rounds else [], "paired": rounds,
            }
    return out


def _paired_median(s: dict[str, Any]) -> float:
    return s["paired"]["median"] if s.get("paired") else s["measured"]


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
            if part in sp:  # the median of per-round paired ratios (the ratio of medians for old results)
                v, c = _paired_median(sp[part]), _paired_median(cpu[part]) if part in cpu else None
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
    md += _rounds_markdown(result, analysis)
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
        md += ["## Targets (issue #18)", "",
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


def _paired_cell(p: dict[str, Any] | None) -> str:
    return "-" if not p else f"{p['median']:.2f}x ({p['low']:.2f}-{p['high']:.2f}, n={p['n']})"


def _rounds_markdown(result: dict[str, Any], analysis: dict[str, Any]) -> list[str]:
    """The machine's load per round, and every speedup as the median and range of per-round ratios."""
    rounds = [r for r in result.get("rounds", []) if not r["warmup"]]
    flags = analysis.get("round_flags", [])
    md = []
    if rounds:
        thr = result["config"].get("load_threshold")
        above = f"load above {thr:g}, " if thr is not None else ""
        md += ["## Rounds: machine load", "",
               f"Load average (1 min) at each timed round's start and end, its wall and process CPU time. Flagged: "
               f"{above}CPU/wall under {STARVED:.0%} of the best round's, or started over --max-load.", "",
               _table(["round", "load start -> end", "waited", "wall", "CPU", "CPU/wall", "flags"],
                      [[str(i + 1), f"{_load1(r['loadavg_start'])} -> {_load1(r['loadavg_end'])}",
                        f"{r.get('waited_s', 0):.0f} s", f"{r['wall_s']:.1f} s", f"{r['cpu_s']:.1f} s",
                        f"{r['cpu_s'] / r['wall_s']:.2f}" if r["wall_s"] > 0 else "-",
                        "; ".join(f) if (f := (flags[i] if i < len(flags) else [])) else "-"]
                       for i, r in enumerate(rounds)]), ""]
    sp, sp_cpu, base = analysis["speedups"], analysis.get("speedups_cpu_time", {}), analysis["baseline"]
    body = []
    for m in sp:
        for part in SPEEDUP_PARTS:
            if (s := sp[m].get(part)) and s.get("paired"):
                c = sp_cpu.get(m, {}).get(part, {}).get("paired")
                body.append([LABELS[part], m, _paired_cell(s["paired"]), _paired_cell(s["paired"]["unflagged"]),
                             _paired_cell(c), _paired_cell(c["unflagged"] if c else None), f"{s['predicted']:.2f}x"])
    if body:
        md += [f"## Speedup against {base}: median and range of the per-round paired ratios", "",
               "Each round times both methods back to back, so its ratio cancels the load the round shares; "
               "CPU time is the second check (the work done, not the waiting).", "",
               _table(["part", "method", "wall, all rounds", "wall, unflagged", "CPU time, all", "CPU time, unflagged",
                       "FLOP-predicted"], body), ""]
    return md


def _load1(v) -> str:
    return "-" if not v else f"{v[0]:.2f}"


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
    rounds = [r for r in result.get("rounds", []) if not r["warmup"]]
    fig, axes = plt.subplots(1, 3 if rounds else 2, figsize=(21 if rounds else 15, 5.5),
                             gridspec_kw={"width_ratios": [3, 3, 2] if rounds else [1, 1]})
    ax1, ax2 = axes[0], axes[1]
    if rounds:
        _plot_rounds(axes[2], rounds, analysis.get("round_flags", []), result["config"].get("load_threshold"))
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
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), suffix=".png")
    finally:
        plt.close(fig)


def _plot_rounds(ax, rounds: list[dict[str, Any]], flags: list[list[str]], threshold: float | None) -> None:
    """Per timed round: the 1-min load average at start and end (flagged rounds red), CPU/wall on the right axis."""
    import numpy as np

    x = np.arange(1, len(rounds) + 1)
    start = [r["loadavg_start"][0] if r["loadavg_start"] else np.nan for r in rounds]
    end = [r["loadavg_end"][0] if r["loadavg_end"] else np.nan for r in rounds]
    colors = ["tab:red" if i < len(flags) and flags[i] else "tab:gray" for i in range(len(rounds))]
    ax.bar(x - 0.2, start, 0.4, color=colors, alpha=0.6, label="load at start")
    ax.bar(x + 0.2, end, 0.4, color=colors, label="load at end")
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", lw=0.8, ls="--", label=f"flag threshold {threshold:g}")
    ax.set_xlabel("timed round (red: flagged)")
    ax.set_ylabel("1-min load average")
    ax.set_xticks(x)
    ax.legend(fontsize=8, loc="upper left")
    twin = ax.twinx()
    twin.plot(x, [r["cpu_s"] / r["wall_s"] if r["wall_s"] > 0 else np.nan for r in rounds], "k.-")
    twin.set_ylabel("process CPU s per wall s (black)")
    twin.set_ylim(bottom=0)
    ax.set_title("machine load per round")


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
