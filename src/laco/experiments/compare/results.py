"""``laco compare``'s results: aggregation over seeds, the paired contrasts, and merging per-seed runs."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from laco.compressors.spec import canonical_name
from laco.experiments.compare.presets import SCENARIOS

def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std (sample std; 0 for one seed) over seeds per (scenario, method), in run order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["method"]), []).append(r)
    table = []
    for (scenario, method), rs in groups.items():
        acc = [r["after"]["accuracy"] for r in rs]
        before = [r["before"]["accuracy"] for r in rs if "before" in r]
        tasks = sorted({t for r in rs for t in r["after"]["per_task"]})
        med = lambda k: statistics.median([r[k] for r in rs]) if all(r.get(k) is not None for r in rs) else None  # noqa: E731
        curves = [r["curve"] for r in rs if r.get("curve")]
        same_steps = curves and all([c[0] for c in cur] == [c[0] for c in curves[0]] for cur in curves)
        table.append({
            "scenario": scenario, "method": method, "seeds": len(rs),
            "acc_mean": round(statistics.mean(acc), 2), "acc_std": round(statistics.stdev(acc), 2) if len(acc) > 1 else 0.0,
            "acc_min": min(acc), "acc_max": max(acc),
            "before_mean": round(statistics.mean(before), 2) if before else None,
            "before_std": round(statistics.stdev(before), 2) if len(before) > 1 else (0.0 if before else None),
            "per_task": {t: round(statistics.mean([r["after"]["per_task"][t] for r in rs
                                                   if r["after"]["per_task"].get(t) is not None]), 2) for t in tasks},
            "merge_layer": rs[0]["merge_layer"], "num_layers": rs[0]["num_layers"],
            "visual_tokens": rs[0]["visual_tokens"], "encoder_gflops": rs[0]["encoder_gflops"],
            "encoder_flop_ratio": rs[0]["encoder_flop_ratio"], "trainable_params": rs[0]["trainable_params"],
            "train_samples_per_s": med("train_samples_per_s"), "infer_samples_per_s": med("infer_samples_per_s"),
            "curve": [[step, round(statistics.mean(c[i][1] for c in curves), 2)] for i, (step, _) in enumerate(curves[0])]
            if same_steps else None,  # mean over seeds of the stage-2 learning curve
        })
    return table


# the questions the experiment asks, as (A, B): is A better than B, seed for seed?
CONTRASTS = (
    ("laco@1/4", "pixel_shuffle@1/4"),  # does the shortcut matter inside the encoder?
    ("laco@1/4", "laco@post"),  # what does merging early cost, against LaCo after the encoder?
    ("laco@1/4", "pixel_shuffle@post"),  # ... against the usual post-encoder pixel shuffle?
    ("laco@post", "pixel_shuffle@post"),  # does the shortcut matter after the encoder?
)


def contrasts(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired accuracy differences A - B per scenario, over the seeds both ran (a seed shares data order
    and projector init across methods, so pairing removes that part of the seed noise)."""
    acc = {(r["scenario"], canonical_name(r["method"]), r["seed"]): r["after"]["accuracy"] for r in runs}
    spelled = {canonical_name(r["method"]): r["method"] for r in runs}  # older runs spell "ext_laco"
    out = []
    for scenario in SCENARIOS:
        for a, b in CONTRASTS:
            seeds = sorted(s for (sc, m, s) in acc if sc == scenario and m == a and (scenario, b, s) in acc)
            if not seeds:
                continue
            d = [round(acc[(scenario, a, s)] - acc[(scenario, b, s)], 2) for s in seeds]
            a_name, b_name = spelled[a], spelled[b]
            verdict = (f"{a_name} higher on every seed" if min(d) > 0 else f"{b_name} higher on every seed"
                       if max(d) < 0 else "mixed across seeds")
            out.append({"scenario": scenario, "a": a_name, "b": b_name, "seeds": seeds, "diffs": d,
                        "mean": round(statistics.mean(d), 2),
                        "std": round(statistics.stdev(d), 2) if len(d) > 1 else 0.0,
                        "verdict": verdict if len(d) > 1 else "one seed"})
    return out


# -- merging runs -----------------------------------------------------------------------------------
# fields that may differ between parts of one experiment: which seeds a part ran, how it ran them
_PER_PART_FIELDS = ("seeds", "threads", "cache_dir")


def merge_results(dirs: list[str | os.PathLike], *, command: str | None = None) -> dict[str, Any]:
    """One ``results.json`` from runs that differ only in their seeds (e.g. one process or machine per seed).

    Every seed is independent (its retrofit base is its own ``none`` model), so the parts concatenate;
    the table is re-aggregated over all seeds. Refuses parts whose preset, data, encoder or any other
    setting differ, and any (scenario, method, seed) that two parts both ran.
    """
    if len(dirs) < 2:
        raise ValueError(f"merging needs at least two results folders, got {len(dirs)}")
    parts = []
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"no results.json in {d}")
        parts.append((path, json.loads(path.read_text())))

    def same(results: dict[str, Any]) -> dict[str, Any]:
        cfg = {k: v for k, v in results["config"].items() if k not in _PER_PART_FIELDS}
        return {"preset": results["preset"], "config": cfg, "data_source": results["data_source"],
                "encoder": results["encoder"]}

    ref_path, ref = parts[0]
    for path, res in parts[1:]:
        a, b = same(ref), same(res)
        diff = sorted(k for k in a["config"].keys() | b["config"].keys() if a["config"].get(k) != b["config"].get(k))
        diff += [k for k in ("preset", "data_source", "encoder") if a[k] != b[k]]
        if diff:
            raise ValueError(f"cannot merge {path} into {ref_path}: they differ in {', '.join(diff)}")
    runs, seen = [], set()
    for path, res in parts:
        for r in res["runs"]:
            key = (r["scenario"], r["method"], r["seed"])
            if key in seen:
                raise ValueError(f"{path} repeats {key[0]} {key[1]} seed {key[2]}, already in another part")
            seen.add(key)
            runs.append(r)
    seeds = sorted({r["seed"] for r in runs})
    timings: dict[str, float] = {}
    for _, res in parts:  # serial-equivalent work: the parts' wall times summed
        for k, v in res["timings_s"].items():
            timings[k] = round(timings.get(k, 0.0) + v, 1)
    return {
        **ref, "config": {**ref["config"], "seeds": seeds}, "timings_s": timings, "command": command,
        "merged_from": [{"dir": str(Path(d)), "command": res.get("command"), "seeds": res["config"]["seeds"],
                         "timings_s": res["timings_s"], "environment": res["environment"]}
                        for d, (_, res) in zip(dirs, parts)],
        "runs": runs, "table": aggregate(runs), "contrasts": contrasts(runs),
    }
