"""Serving benchmark inside vLLM: the same request set through the engine for each method.

    python -m laco.serve.bench --methods none,post,laco@1/4 --output-lens 1,16,64 --concurrency 1,4 \\
        --requests 16 --out benchmarks/results      # -> <out>/<device>/vllm/<vision>_<llm>.{json,md,png}

For each method a model folder is written with config, tokenizer and processor only (the real Qwen2
tokenizer; no weights: vLLM's ``load_format="dummy"`` fills random ones), one ``AsyncLLM`` engine is
started on it, and for every (output length, concurrency) ``--requests`` chat requests, each with its own
random image (so no multimodal or prefix cache hit on the image), are submitted with at most
``concurrency`` in flight. Output length is exact (``ignore_eos``). Per cell: requests/s, output tokens/s,
time to first token (median, p90), and the FLOP model's encode+prefill ratio against the baseline
(``laco@post`` when present), for comparison.

Engine start-up is not timed. Methods run one after another (one engine in memory at a time), so on a
shared machine compare them with care: the report records the load average before and after each method.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from laco.io import atomic_write_text

QUESTION = "Describe the image."


@dataclass
class ServeBenchConfig:
    vision: str = "siglip-so400m-384"
    llm: str = "qwen2-0.5b"
    methods: str = "none,post,laco@1/4"
    ratio: int = 2
    output_lens: tuple[int, ...] = (1, 16, 64)
    concurrency: tuple[int, ...] = (1, 4)
    requests: int = 16
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    enforce_eager: bool = False
    seed: int = 0
    llm_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. a tiny LLM for tests
    vision_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from laco.bench.presets import parse_methods

        self.specs = parse_methods(self.methods)
        for name in ("output_lens", "concurrency"):
            values = tuple(int(v) for v in getattr(self, name))
            if not values or min(values) < 1:
                raise ValueError(f"{name} must be positive integers, got {values}")
            setattr(self, name, values)
        if self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        names = [s.name for s in self.specs]
        self.baseline = "laco@post" if "laco@post" in names else names[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [s.name for s in self.specs]
        return d


# -- model folders ------------------------------------------------------------------------------------
def write_model_dir(cfg: ServeBenchConfig, spec, path: Path) -> int:
    """config.json + tokenizer + processor of one method (no weights); returns its tokens per image."""
    from laco.bench.presets import llm_config
    from laco.encoders import vision_config
    from laco.model import LaCoConfig, LaCoProcessor
    from laco.model.tokenizer import load_qwen2_tokenizer

    tok = load_qwen2_tokenizer()
    text = llm_config(cfg.llm, **cfg.llm_overrides)
    if len(tok) > text.vocab_size:
        raise ValueError(f"the Qwen2 tokenizer ({len(tok)} tokens) does not fit LLM vocabulary {text.vocab_size}")
    config = LaCoConfig(
        vision_config={**vision_config(cfg.vision).to_dict(), **cfg.vision_overrides},
        text_config=text.to_dict(),
        compression={**spec.compression, "ratio": cfg.ratio},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        architectures=["LaCoForConditionalGeneration"],
    )
    config.save_pretrained(path)
    LaCoProcessor.from_model_config(config, tok).save_pretrained(path)
    return config.num_image_tokens


def flop_ratios(cfg: ServeBenchConfig, prompt_tokens: int, output_len: int) -> dict[str, float] | None:
    """FLOP model: encode+prefill FLOPs of each method / the baseline's (1 request, 1 image).

    None with ``llm_overrides`` / ``vision_overrides`` (the FLOP model knows the presets' shapes only).
    """
    if cfg.llm_overrides or cfg.vision_overrides:
        return None
    from laco.bench.flops import Workload
    from laco.bench.runner import BenchConfig, predict_all

    bench = BenchConfig(vision=cfg.vision, llm=cfg.llm, methods=",".join(s.name for s in cfg.specs),
                        ratio=cfg.ratio, work=Workload(text_tokens=prompt_tokens, new_tokens=output_len))
    pred = predict_all(bench)
    base = pred[cfg.baseline]["encode_prefill"]
    return {m: p["encode_prefill"] / base for m, p in pred.items()}


# -- the engine ---------------------------------------------------------------------------------------
def random_image(seed: int, size: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


async def _one(engine, request_id: str, prompt: dict, params) -> dict[str, float]:
    start = time.perf_counter()
    first, n = None, 0
    async for out in engine.generate(prompt, params, request_id):
        if first is None and out.outputs and out.outputs[0].token_ids:
            first = time.perf_counter()
        n = len(out.outputs[0].token_ids)
    return {"ttft": (first or time.perf_counter()) - start, "latency": time.perf_counter() - start, "tokens": n}


async def _cell(engine, prompt_text: str, image_size: int, output_len: int, concurrency: int, n: int,
                seed0: int, tag: str) -> dict[str, Any]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, min_tokens=output_len, ignore_eos=True)
    gate = asyncio.Semaphore(concurrency)

    async def run(i: int):
        prompt = {"prompt": prompt_text, "multi_modal_data": {"image": random_image(seed0 + i, image_size)}}
        async with gate:
            return await _one(engine, f"{tag}-{i}", prompt, params)

    start = time.perf_counter()
    rows = await asyncio.gather(*(run(i) for i in range(n)))
    wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    if tokens != n * output_len:
        raise RuntimeError(f"expected {n * output_len} output tokens, got {tokens}")
    return {
        "output_len": output_len, "concurrency": concurrency, "requests": n, "wall_s": wall,
        "requests_per_s": n / wall, "output_tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(ttft), "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "latency_median_s": statistics.median(r["latency"] for r in rows),
    }


async def _bench_method(model_dir: Path, cfg: ServeBenchConfig, prompt_text: str, image_size: int,
                        seed_base: int) -> list[dict[str, Any]]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(model=str(model_dir), load_format="dummy", dtype=cfg.dtype, seed=cfg.seed,
                           max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager,
                           limit_mm_per_prompt={"image": 1})
    engine = AsyncLLM.from_engine_args(args)
    try:
        await _cell(engine, prompt_text, image_size, 2, 1, 1, seed_base, "warmup")
        cells, seed = [], seed_base + 1
        for output_len in cfg.output_lens:
            for conc in cfg.concurrency:
                cells.append(await _cell(engine, prompt_text, image_size, output_len, conc, cfg.requests, seed,
                                         f"L{output_len}-c{conc}"))
                seed += cfg.requests
        return cells
    finally:
        engine.shutdown()


def run_serve_bench(cfg: ServeBenchConfig, workdir: str | Path | None = None, progress: bool = True) -> dict:
    """Benchmark every method; returns the result dict (see ``write_serve_report``)."""
    from laco.model import LaCoProcessor

    methods: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="laco-serve-bench-") as tmp:
        root = Path(workdir or tmp)
        for k, spec in enumerate(cfg.specs):
            model_dir = root / spec.name.replace("@", "_").replace("/", "-")
            tokens = write_model_dir(cfg, spec, model_dir)
            proc = LaCoProcessor.from_pretrained(model_dir)
            prompt_text = proc.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                add_generation_prompt=True)
            prompt_tokens = len(proc.tokenizer(prompt_text)["input_ids"]) - 1  # the <image> token
            size = proc.tile_size
            load = os.getloadavg()[0]
            if progress:
                print(f"serve-bench: {spec.name} ({tokens} tokens per image): starting the engine", flush=True)
            # the same images for every method: seeds depend on the cell, not on the method
            cells = asyncio.run(_bench_method(model_dir, cfg, prompt_text, size, seed_base=cfg.seed * 100_000))
            methods[spec.name] = {"image_tokens": tokens, "prompt_text_tokens": prompt_tokens, "cells": cells,
                                  "loadavg_before": load, "loadavg_after": os.getloadavg()[0]}
            if progress:
                for c in cells:
                    print(f"  L={c['output_len']:<4} c={c['concurrency']:<3} {c['requests_per_s']:.3f} req/s  "
                          f"{c['output_tokens_per_s']:.2f} tok/s  TTFT {c['ttft_median_s']:.2f}s", flush=True)
    text_tokens = next(iter(methods.values()))["prompt_text_tokens"]
    flops = {L: flop_ratios(cfg, text_tokens, L) for L in cfg.output_lens}
    return {"config": cfg.to_dict(), "baseline": cfg.baseline, "methods": methods,
            "flop_ratio_encode_prefill": flops[cfg.output_lens[0]],
            "command": None, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# -- report -------------------------------------------------------------------------------------------
def speedups(result: dict) -> list[dict[str, Any]]:
    """Per method and cell: requests/s relative to the baseline's in the same cell."""
    base = {(c["output_len"], c["concurrency"]): c for c in result["methods"][result["baseline"]]["cells"]}
    rows = []
    for name, m in result["methods"].items():
        for c in m["cells"]:
            b = base[(c["output_len"], c["concurrency"])]
            flops = result["flop_ratio_encode_prefill"]
            rows.append({"method": name, **c, "speedup_requests": c["requests_per_s"] / b["requests_per_s"],
                         "flop_speedup_encode_prefill": 1 / flops[name] if flops else None})
    return rows


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def to_markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# vLLM serving: {cfg['vision']} + {cfg['llm']} ({cfg['dtype']}, {cfg['requests']} requests per cell)",
             "", f"Baseline `{result['baseline']}`. Speedup = requests/s over the baseline's in the same cell; "
             "FLOP = the FLOP model's encode+prefill speedup.", "",
             "| method | tokens/image | output len | concurrency | req/s | output tok/s | TTFT median | TTFT p90 "
             "| speedup | FLOP |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in speedups(result):
        tokens = result["methods"][r["method"]]["image_tokens"]
        lines.append(f"| {r['method']} | {tokens} | {r['output_len']} | {r['concurrency']} | {r['requests_per_s']:.3f} "
                     f"| {r['output_tokens_per_s']:.2f} | {r['ttft_median_s']:.2f} s | {r['ttft_p90_s']:.2f} s "
                     f"| {r['speedup_requests']:.2f}x | {_x(r['flop_speedup_encode_prefill'])} |")
    loads = ", ".join(f"{m} {v['loadavg_before']:.1f}->{v['loadavg_after']:.1f}" for m, v in result["methods"].items())
    lines += ["", f"Load average (1 min) before -> after each method: {loads}."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concs = result["config"]["concurrency"]
    fig, axes = plt.subplots(1, len(concs), figsize=(5 * len(concs), 4), squeeze=False)
    for ax, conc in zip(axes[0], concs):
        for name, m in result["methods"].items():
            cells = sorted((c for c in m["cells"] if c["concurrency"] == conc), key=lambda c: c["output_len"])
            ax.plot([c["output_len"] for c in cells], [c["requests_per_s"] for c in cells], marker="o",
                    label=f"{name} ({m['image_tokens']} tok/img)")
        ax.set_xscale("log")
        ax.set_xlabel("output tokens per request")
        ax.set_ylabel("requests / s")
        ax.set_title(f"concurrency {conc}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"vLLM: {result['config']['vision']} + {result['config']['llm']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_serve_report(result: dict, out_dir: str | Path, plot_png: bool = True) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['config']['vision']}_{result['config']['llm']}"
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    atomic_write_text(paths["json"], json.dumps({**result, "speedups": speedups(result)}, indent=1))
    atomic_write_text(paths["markdown"], to_markdown(result) + "\n")
    if plot_png:
        paths["png"] = out / f"{stem}.png"
        plot(result, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m laco.serve.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--vision", default="siglip-so400m-384")
    p.add_argument("--llm", default="qwen2-0.5b")
    p.add_argument("--methods", default="none,post,laco@1/4")
    p.add_argument("--ratio", type=int, default=2)
    p.add_argument("--output-lens", default="1,16,64")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--out", default="benchmarks/results", help="results go to OUT/<device>/vllm/")
    a = p.parse_args(argv)
    cfg = ServeBenchConfig(vision=a.vision, llm=a.llm, methods=a.methods, ratio=a.ratio,
                           output_lens=tuple(int(x) for x in a.output_lens.split(",")),
                           concurrency=tuple(int(x) for x in a.concurrency.split(",")), requests=a.requests,
                           dtype=a.dtype, max_model_len=a.max_model_len, enforce_eager=a.enforce_eager)
    import torch

    from laco.bench.timers import device_slug

    result = run_serve_bench(cfg)
    result["command"] = "python -m laco.serve.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    for kind, path in write_serve_report(result, Path(a.out) / device_slug("cuda" if torch.cuda.is_available() else "cpu") / "vllm").items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
