"""``laco.serve.bench``'s report on a synthetic result (the engine run itself: tests/test_vllm.py, slow)."""

from __future__ import annotations

import json

import pytest

from laco.serve.bench import ServeBenchConfig, speedups, to_markdown, write_serve_report


def _result(flops=True):
    cfg = ServeBenchConfig(methods="none,post,laco@1/4", output_lens=(1, 8), concurrency=(1,), requests=4)
    rps = {"none": (1.0, 0.5), "laco@post": (2.0, 0.8), "laco@1/4": (3.0, 1.0)}
    methods = {m: {"image_tokens": t, "prompt_text_tokens": 10, "loadavg_before": 1.0, "loadavg_after": 1.5,
                   "cells": [{"output_len": L, "concurrency": 1, "requests": 4, "wall_s": 4 / r,
                              "requests_per_s": r, "output_tokens_per_s": r * L, "ttft_median_s": 0.1,
                              "ttft_p90_s": 0.2, "latency_median_s": 0.3} for L, r in zip((1, 8), rps[m])]}
               for m, t in (("none", 729), ("laco@post", 196), ("laco@1/4", 196))}
    ratios = {"none": 3.0, "laco@post": 1.0, "laco@1/4": 0.5} if flops else None
    return {"config": cfg.to_dict(), "baseline": cfg.baseline, "methods": methods,
            "flop_ratio_encode_prefill": ratios, "command": "x", "time": "t"}


def test_config_defaults_and_errors():
    cfg = ServeBenchConfig()
    assert cfg.baseline == "laco@post" and [s.name for s in cfg.specs] == ["none", "laco@post", "laco@1/4"]
    with pytest.raises(ValueError, match="output_lens"):
        ServeBenchConfig(output_lens=(0,))
    with pytest.raises(ValueError, match="unknown compressor"):
        ServeBenchConfig(methods="nope@1/4")


def test_speedups_are_per_cell_against_the_baseline(tmp_path):
    rows = {(r["method"], r["output_len"]): r for r in speedups(_result())}
    assert rows[("laco@1/4", 1)]["speedup_requests"] == pytest.approx(1.5)
    assert rows[("laco@1/4", 8)]["speedup_requests"] == pytest.approx(1.25)  # the gain shrinks with output length
    assert rows[("none", 1)]["flop_speedup_encode_prefill"] == pytest.approx(1 / 3)
    md = to_markdown(_result(flops=False))
    assert "| laco@1/4 | 196 | 1 | 1 | 3.000 |" in md and "| 1.50x | – |" in md
    paths = write_serve_report(_result(), tmp_path, plot_png=True)
    assert json.loads(paths["json"].read_text())["speedups"][0]["method"] == "none"
    assert paths["png"].stat().st_size > 0
