"""``laco.serve.bench``'s report on a synthetic result (the engine run itself: tests/test_vllm.py, slow)."""

from __future__ import annotations

import json

import pytest

from laco.serve.bench import ServeBenchConfig, speedups, to_markdown, write_serve_report


def _result(flops=True):
    cfg = ServeBenchConfig(methods="none,post,laco@1/4", output_lens=(1, 8), concurrency=(1,), requests=4)
    rps = {"none": (1.0, 0.5), "laco@post": (2.0, 0.8), "laco@1/4": (3.0, 1.0)}
    methods = {m: {"image_tokens": t, "prompt_text_tokens": 10, "engine_startup_s": 30.0,
                   "cells": [{"output_len": L, "concurrency": 1, "requests": 4, "wall_s": 4 / r,
                              "requests_per_s": r, "output_tokens_per_s": r * L, "ttft_median_s": 0.1,
                              "ttft_p90_s": 0.2, "latency_median_s": 0.3, "cpu_s_per_request": 2 / r,
                              "loadavg_before": 1.0, "loadavg_after": 1.5, "peak_rss_gb": 4.2}
                             for L, r in zip((1, 8), rps[m])]}
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
    assert rows[("laco@1/4", 8)]["speedup_cpu"] == pytest.approx(1.25)  # CPU s/req 2/0.8 against 2/1.0
    md = to_markdown(_result(flops=False))
    assert "| 1 | 1 | laco@1/4 | 196 | 3.000 | 3.00 | 0.10 s | 0.20 s | 1.50x | – | 0.7 | 1.50x | 1.0->1.5 |" in md
    assert "Peak RSS of the run: 4.2 GB" in md
    paths = write_serve_report(_result(), tmp_path, plot_png=True)
    assert json.loads(paths["json"].read_text())["speedups"][0]["method"] == "none"
    assert paths["png"].stat().st_size > 0


# -- `laco serve-bench` (the CLI wiring; no vLLM needed) ----------------------------------------------------
def _invoke(args):
    from typer.testing import CliRunner

    from laco.cli import app

    return CliRunner().invoke(app, ["serve-bench", *args])


@pytest.mark.parametrize("args, message", [
    (["--output-lens", "1,x"], "--output-lens takes a comma list of positive integers"),
    (["--concurrency", "0"], "--concurrency takes a comma list of positive integers"),
    (["--methods", "none,none"], "methods listed twice"),
    (["--dtype", "int8"], "dtype must be"),
])
def test_serve_bench_rejects_bad_arguments_before_starting_anything(args, message, monkeypatch):
    import laco.serve.bench as sb

    monkeypatch.setattr(sb, "run_serve_bench", lambda cfg: pytest.fail("ran despite a bad argument"))
    result = _invoke(args)
    assert result.exit_code != 0 and message in str(result.exception)


def test_serve_bench_without_vllm_names_the_install(monkeypatch, tmp_path):
    import importlib.util

    import laco.serve.bench as sb

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.setattr(sb, "run_serve_bench", lambda cfg: pytest.fail("ran without vLLM"))
    result = _invoke(["--out", str(tmp_path)])
    assert "needs vLLM" in str(result.exception) and "docs/serving.md" in str(result.exception)
    assert not any(tmp_path.iterdir())


def test_serve_bench_writes_device_vllm_folder_with_table_and_plot(monkeypatch, tmp_path):
    """The run's layout: OUT/<device>/vllm/<vision>_<llm>.{json,md,png}; the command recorded spelled out."""
    import laco.serve.bench as sb

    seen = {}

    def fake_run(cfg, on_method):
        seen["cfg"] = cfg
        partial = _result()
        del partial["methods"]["laco@1/4"]
        on_method({**partial, "pending": ["laco@1/4"]})  # after a method: the report so far is on disk
        seen["partial_md"] = (tmp_path / "cpu-test-2t" / "vllm" / "siglip-so400m-384_qwen2-0.5b.md").read_text()
        return _result()

    monkeypatch.setattr(sb, "require_vllm", lambda: None)
    monkeypatch.setattr(sb, "device_folder", lambda: "cpu-test-2t")
    monkeypatch.setattr(sb, "run_serve_bench", fake_run)
    result = _invoke(["--methods", "none,post,laco@1/4", "--output-lens", "1,8", "--concurrency", "1",
                      "--requests", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg.output_lens == (1, 8) and cfg.concurrency == (1,) and cfg.requests == 4 and cfg.enforce_eager
    folder = tmp_path / "cpu-test-2t" / "vllm"
    assert sorted(p.name for p in folder.iterdir()) == [f"siglip-so400m-384_qwen2-0.5b.{e}" for e in ("json", "md", "png")]
    saved = json.loads((folder / "siglip-so400m-384_qwen2-0.5b.json").read_text())
    assert saved["command"].startswith("laco serve-bench --vision siglip-so400m-384 --llm qwen2-0.5b "
                                       "--methods none,laco@post,laco@1/4 --ratio 2 --output-lens 1,8")
    md = (folder / "siglip-so400m-384_qwen2-0.5b.md").read_text()
    # rows grouped by cell, methods in run order; laco@1/4 serves 1.5x laco@post's requests/s at output 1
    body = [line for line in md.splitlines() if line.startswith("| 1 | 1 |")]
    assert [line.split(" | ")[2] for line in body] == ["none", "laco@post", "laco@1/4"]
    assert "| 1.50x | 2.00x |" in body[2]
    assert (folder / "siglip-so400m-384_qwen2-0.5b.png").read_bytes()[:4] == b"\x89PNG"
    assert "Partial result**: not run yet: laco@1/4" in seen["partial_md"] and "Partial" not in md


def test_serve_bench_from_json_rewrites_the_report(tmp_path):
    import laco.serve.bench as sb

    paths = sb.write_serve_report(_result(), tmp_path, plot_png=False)
    paths["markdown"].unlink()
    result = _invoke(["--from-json", str(paths["json"])])
    assert result.exit_code == 0, result.output
    assert "| 8 | 1 | laco@1/4 | 196 | 1.000 |" in paths["markdown"].read_text()
    assert (tmp_path / "siglip-so400m-384_qwen2-0.5b.png").is_file()
    (tmp_path / "other.json").write_text('{"config": {}}')
    bad = _invoke(["--from-json", str(tmp_path / "other.json")])
    assert bad.exit_code != 0 and "not a `laco serve-bench` result file" in str(bad.exception)
