"""Decode anomaly (issue #18): why did laco@1/4 decode at 0.76x of laco@post when both cache the same tokens?

Times only ``decode`` (8 greedy tokens with the KV cache, Qwen2-0.5B shapes; tiny-siglip as the encoder: the
LLM sees the same merged token count for both methods, so the decode work is identical) for laco@post and
laco@1/4, interleaved, in four variants: torch threads 1 or 2 x ``malloc_trim`` before each case (bench's
peak-memory reset) on or off. Per case it records wall, process CPU time and minor page faults.
Run it twice, once with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep at barriers instead of spinning):

    python benchmarks/experiments/decode_anomaly.py --out benchmarks/results/decode-anomaly/default.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/experiments/decode_anomaly.py --out .../passive.json

RSS about 2.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch

from laco.bench.flops import Workload
from laco.bench.runner import BenchConfig, build_models, make_inputs, method_cases
from laco.bench.timers import loadavg, run_cases


def counted(case, faults: list[int]):
    fn = case.fn

    def run():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = fn()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return out

    case.fn = run
    return case


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--llm", default="qwen2-0.5b")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    cfg = BenchConfig(vision="tiny-siglip", llm=args.llm, methods="post,laco@1/4", parts=("decode",),
                      work=Workload(text_tokens=64, new_tokens=8))
    models = build_models(cfg)
    gen = torch.Generator().manual_seed(0)
    out = {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"), "variants": []}
    for threads in (2, 1):
        for trim in (True, False):
            torch.set_num_threads(threads)
            faults: dict[str, list[int]] = {}
            cases = []
            for name, model in models.items():
                for c in method_cases(name, model, make_inputs(model, cfg.work, torch.device("cpu"), torch.float32, gen),
                                      cfg.work, cfg.parts, None):
                    cases.append(counted(c, faults.setdefault(name, [])))
            t0, load0 = time.time(), loadavg()
            res, rounds = run_cases(cases, warmup=1, repeats=args.repeats, memory=trim, progress=False)
            by = {r.method: r for r in res}
            post, inside = by["laco@post"], by["laco@1/4"]
            ratios = [a / b for a, b in zip(post.times, inside.times)]
            v = {"threads": threads, "malloc_trim": trim, "load_start": load0, "load_end": loadavg(),
                 "seconds": time.time() - t0,
                 "wall": {m: r.times for m, r in by.items()}, "cpu": {m: r.cpu_times for m, r in by.items()},
                 "minor_faults_median": {m: statistics.median(f[1:]) for m, f in faults.items()},  # f[0]: warm-up
                 "paired_ratio": {"median": statistics.median(ratios), "low": min(ratios), "high": max(ratios)},
                 "cpu_per_wall": {m: statistics.median(c / w for c, w in zip(r.cpu_times, r.times)) for m, r in by.items()},
                 "rel_iqr": {m: r.to_dict()["time"]["rel_iqr"] for m, r in by.items()},
                 "median_s": {m: statistics.median(r.times) for m, r in by.items()}}
            out["variants"].append(v)
            print(json.dumps({k: v[k] for k in ("threads", "malloc_trim", "median_s", "paired_ratio", "cpu_per_wall",
                                                 "minor_faults_median", "rel_iqr", "load_end")}), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
