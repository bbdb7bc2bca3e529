"""``laco compare``'s results: aggregation over seeds, the paired contrasts, and merging per-seed runs."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from laco.compressors.spec import canonical_name
from laco.experiments.compare.presets import (
    LACO_RANDOM_START, LDPV2_RES, PS_AVG_INIT, SCENARIOS, TOKENPACKER_RES,
)

#: rows that are not a method: the text-only LLM's accuracy per seed (the blind baseline is computed from data)
BASELINE = "baseline"


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return round(statistics.mean(xs), 2), round(statistics.stdev(xs), 2) if len(xs) > 1 else 0.0


def _per_task(rs: list[dict[str, Any]]) -> dict[str, float]:
    tasks = sorted({t for r in rs for t in r["after"]["per_task"]})
    return {t: round(statistics.mean([r["after"]["per_task"][t] for r in rs
                                      if r["after"]["per_task"].get(t) is not None]), 2) for t in tasks}


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std (sample std; 0 for one seed) over seeds per (scenario, method), in run order.

    A method whose score is not applicable (``after.accuracy`` None: ToMe's unordered set in ``readout``)
    keeps its row with ``acc_mean`` None and the reason in ``not_applicable``."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        if r["scenario"] != BASELINE:
            groups.setdefault((r["scenario"], r["method"]), []).append(r)
    table = []
    for (scenario, method), rs in groups.items():
        acc = [r["after"]["accuracy"] for r in rs if r["after"]["accuracy"] is not None]
        before = [r["before"]["accuracy"] for r in rs if (r.get("before") or {}).get("accuracy") is not None]
        curves = [r["curve"] for r in rs if r.get("curve")]
        same_steps = curves and all([c[0] for c in cur] == [c[0] for c in curves[0]] for cur in curves)
        mean, std = _mean_std(acc) if acc else (None, None)
        b_mean, b_std = _mean_std(before) if before else (None, None)
        table.append({
            "scenario": scenario, "method": method, "seeds": len(rs),
            "acc_mean": mean, "acc_std": std, "acc_min": min(acc, default=None), "acc_max": max(acc, default=None),
            "before_mean": b_mean, "before_std": b_std, "per_task": _per_task(rs),
            "not_applicable": rs[0]["after"].get("not_applicable"),
            "merge_layer": rs[0]["merge_layer"], "num_layers": rs[0]["num_layers"],
            "visual_tokens": rs[0]["visual_tokens"], "encoder_gflops": rs[0]["encoder_gflops"],
            "encoder_flop_ratio": rs[0]["encoder_flop_ratio"], "trainable_params": rs[0]["trainable_params"],
            "curve": [[step, round(statistics.mean(c[i][1] for c in curves), 2)] for i, (step, _) in enumerate(curves[0])]
            if same_steps else None,  # mean over seeds of the stage-2 learning curve
        })
    return table


def baseline_rows(runs: list[dict[str, Any]], blind: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The reference rows of every MLLM table: the blind baseline (the most frequent training answer per
    question, computed from the data) and the text-only LLM (mean ± std over seeds)."""
    rows = []
    if blind:
        rows.append({"name": "blind (majority answer)", "seeds": None, "acc_mean": round(blind["accuracy"], 2), "acc_std": 0.0,
                     "per_task": blind["per_task"]})
    text = [r for r in runs if r["scenario"] == BASELINE]
    if text:
        mean, std = _mean_std([r["after"]["accuracy"] for r in text])
        rows.append({"name": "text-only LLM (no image)", "seeds": len(text), "acc_mean": mean, "acc_std": std,
                     "per_task": _per_task(text)})
    return rows


# the questions the experiment asks, as (A, B): is A better than B, seed for seed?
CONTRASTS = (
    ("laco@1/4", "pixel_shuffle@1/4"),  # LaCo vs pixel shuffle inside the encoder (shortcut + start)
    ("laco@1/4", PS_AVG_INIT),  # ... against a pixel shuffle that starts as pooling (the shortcut alone)
    (LACO_RANDOM_START, "pixel_shuffle@1/4"),  # the shortcut from a random start (the start held equal)
    (LDPV2_RES, "ldpv2@1/4"),  # does the shortcut help other in-encoder compressors?
    (TOKENPACKER_RES, "tokenpacker@1/4"),
    ("laco@1/4", "laco@post"),  # what does merging early cost, against LaCo after the encoder?
    ("laco@1/4", "pixel_shuffle@post"),  # ... against the usual post-encoder pixel shuffle?
    ("laco@post", "pixel_shuffle@post"),  # does the shortcut matter after the encoder?
)


def contrasts(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired accuracy differences A - B per scenario, over the seeds both ran (a seed is one replicate: its
    encoder, LLM, data order and projector init are shared by every method, so pairing removes them). The
    verdict names a winner only when at least two seeds ran and every seed agrees."""
    acc = {(r["scenario"], canonical_name(r["method"]), r["seed"]): r["after"]["accuracy"] for r in runs
           if r["scenario"] != BASELINE and r["after"]["accuracy"] is not None}
    spelled = {canonical_name(r["method"]): r["method"] for r in runs if r["scenario"] != BASELINE}  # "ext_laco" (old)
    out = []
    for scenario in SCENARIOS:
        for a, b in CONTRASTS:
            seeds = sorted(s for (sc, m, s) in acc if sc == scenario and m == a and (scenario, b, s) in acc)
            if not seeds:
                continue
            d = [round(acc[(scenario, a, s)] - acc[(scenario, b, s)], 2) for s in seeds]
            a_name, b_name = spelled[a], spelled[b]
            verdict = (f"{a_name} higher on every seed" if min(d) > 0 else f"{b_name} higher on every seed"
                       if max(d) < 0 else "mixed across seeds")  # a tie on any seed is not agreement
            mean, std = _mean_std(d)
            out.append({"scenario": scenario, "a": a_name, "b": b_name, "seeds": seeds, "diffs": d,
                        "mean": mean, "std": std, "verdict": verdict if len(d) > 1 else "one seed"})
    return out


# -- merging runs -----------------------------------------------------------------------------------
# fields that may differ between parts of one experiment: which seeds a part ran, how it ran them
_PER_PART_FIELDS = ("seeds", "threads", "workers", "cache_dir")  # may differ: results do not depend on them


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
        # since v2 every seed pretrains its own encoder: the parts must share its config, not its weights
        cfg = {k: v for k, v in results["config"].items() if k not in _PER_PART_FIELDS}
        enc = results["encoder"]
        return {"preset": results["preset"], "config": cfg, "data_source": results["data_source"],
                "encoder": enc["config"] if "per_seed" in enc else enc, "data": results.get("data")}

    ref_path, ref = parts[0]
    for path, res in parts[1:]:
        a, b = same(ref), same(res)
        diff = sorted(k for k in a["config"].keys() | b["config"].keys() if a["config"].get(k) != b["config"].get(k))
        diff += [k for k in ("preset", "data_source", "encoder", "data") if a[k] != b[k]]
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
    per_seed = {k: v for _, res in parts for k, v in res["encoder"].get("per_seed", {}).items()}
    timings: dict[str, float] = {}
    for _, res in parts:  # serial-equivalent work: the parts' wall times summed
        for k, v in res["timings_s"].items():
            timings[k] = round(timings.get(k, 0.0) + v, 1)
    return {
        **ref, "config": {**ref["config"], "seeds": seeds}, "timings_s": timings, "command": command,
        "encoder": {**ref["encoder"], **({"per_seed": per_seed} if per_seed else {})},
        "merged_from": [{"dir": str(Path(d)), "command": res.get("command"), "seeds": res["config"]["seeds"],
                         "timings_s": res["timings_s"], "environment": res["environment"]}
                        for d, (_, res) in zip(dirs, parts)],
        "runs": runs, "table": aggregate(runs), "baselines": baseline_rows(runs, ref.get("blind")),
        "contrasts": contrasts(runs),
    }
