"""``laco bench``: time training and inference per method at real model shapes, against the FLOP model."""

from __future__ import annotations

from typing import Optional

import typer

from laco.cli import app, comma_list


@app.command()
def bench(
    vision: str = typer.Option("siglip-so400m-384", "--vision", help="vision preset (laco info --list)"),
    llm: str = typer.Option("qwen2-0.5b", "--llm", help="LLM preset: qwen2-0.5b, qwen2-1.5b, qwen2-7b, tiny-qwen2"),
    methods: str = typer.Option("none,laco@post,laco@1/4,laco@1/2", "--methods", "-m",
                                help="comma list: none, <compressor>@<layer> e.g. laco@1/4, laco@post (post = laco@post, deprecated)"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="speedups relative to it (default laco@post)"),
    ratio: int = typer.Option(2, "--ratio", "-r", min=1, help="merge r x r tokens into one"),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1),
    images_per_sample: int = typer.Option(1, "--images-per-sample", min=1),
    image_size: Optional[str] = typer.Option(
        None, "--image-size", help="with --dry-run: WIDTHxHEIGHT of every image, tiled with LLaVA-OneVision's AnyRes "
        "as `laco info --image-size` (base + tiles at the preset's size, unpadded, newlines)"),
    max_tiles: int = typer.Option(9, "--max-tiles", min=1, help="AnyRes: anyres_max_N token budget, in tiles"),
    max_grid: int = typer.Option(6, "--max-grid", min=1, help="AnyRes: pinpoints up to N x N tiles (OneVision: 6)"),
    text_tokens: int = typer.Option(64, "--text-tokens", min=1, help="text tokens per sample (prompt + answer)"),
    new_tokens: int = typer.Option(16, "--new-tokens", min=1, help="tokens generated per sample (decode, generate)"),
    parts: Optional[str] = typer.Option(None, "--parts",
                                        help="comma list of parts to time (default: all; see docs/benchmarks.md)"),
    train: bool = typer.Option(True, "--train/--no-train", help="include the training-step parts"),
    warmup: int = typer.Option(1, "--warmup", min=0, help="untimed rounds first"),
    repeats: int = typer.Option(3, "--repeats", "-n", min=1, help="timed rounds (methods interleaved in each)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:i]"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: torch's)"),
    max_load: Optional[float] = typer.Option(None, "--max-load",
                                             help="before each round wait until the 1-min load average is at most "
                                                  "this (rounds that still start above it are flagged)"),
    max_wait: float = typer.Option(600.0, "--max-wait", min=0, help="seconds to wait per round for --max-load"),
    load_threshold: Optional[float] = typer.Option(None, "--load-threshold",
                                                   help="flag rounds whose load average exceeds this "
                                                        "(default: --max-load, else 1.5 x CPUs)"),
    out: str = typer.Option("benchmarks/results", "--out", "-o", help="results root; a per-device folder is added"),
    profile: bool = typer.Option(False, "--profile", help="also write torch.profiler op tables of the encoder"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the FLOP model's predictions only; time nothing"),
    from_json: Optional[str] = typer.Option(None, "--from-json",
                                            help="re-write the markdown/PNG of a saved result JSON; time nothing"),
) -> None:
    """Time encoder, prefill, decoding, generation and training steps per method; compare with FLOP predictions."""
    import shlex

    from rich.console import Console
    from rich.table import Table

    from laco.bench.flops import Workload
    from laco.bench.report import LABELS, analyze, write_report
    from laco.bench.runner import PARTS, TRAIN_PARTS, BenchConfig, predict_all, run_benchmark
    from laco.bench.timers import device_slug
    from laco.safety import check_device, check_output_path, read_result_json

    if from_json is not None:
        from pathlib import Path

        path = Path(from_json)
        result = read_result_json(path, "bench", ("config", "predicted", "measured", "environment"))
        result.pop("analysis", None)  # recomputed from the raw samples
        for kind, p in write_report(result, path.parent).items():
            Console().print(f"{kind}: {p}")
        return
    hw = None
    if image_size is not None:
        from laco.model.anyres import parse_image_size

        try:
            hw = parse_image_size(image_size)
        except ValueError as err:
            raise ValueError(f"--image-size: {err}") from None
        if not dry_run:
            raise ValueError("--image-size (AnyRes) is predicted only: add --dry-run")
    if not dry_run:
        check_device(device)
        check_output_path(out, "--out")
    chosen = tuple(comma_list(parts)) if parts else PARTS
    if not train:
        chosen = tuple(p for p in chosen if p not in TRAIN_PARTS)
    cfg = BenchConfig(
        vision=vision, llm=llm, methods=methods, baseline=baseline, ratio=ratio,
        work=Workload(batch_size, images_per_sample, text_tokens, new_tokens, hw, max_tiles, max_grid), parts=chosen,
        warmup=warmup, repeats=repeats, device=device, dtype=dtype, threads=threads,
        max_load=max_load, max_wait_s=max_wait, load_threshold=load_threshold,
    )
    console = Console()
    if dry_run:
        pred = predict_all(cfg)
        anyres = "" if hw is None else (f", {images_per_sample} AnyRes image(s) of {hw[1]}x{hw[0]} (WxH) per sample"
                                        f"{', untiled (multi-image)' if images_per_sample > 1 else ''}")
        table = Table(title=f"predicted GFLOPs: {vision} + {llm}, batch {batch_size}{anyres}")
        table.add_column("part")
        for m in pred:
            table.add_column(m, justify="right")
        for key in ("encoder", "projector", "prefill", "encode_prefill", "decode", "train_stage1", "train_stage2"):
            table.add_row(LABELS.get(key, key), *[f"{pred[m][key] / 1e9:.1f}" for m in pred])
        if hw is not None:
            table.add_row("AnyRes tiles per image", *[f"{pred[m]['tiles'][0]}x{pred[m]['tiles'][1]} + base" for m in pred])
        table.add_row("encoder inputs per image", *[str(pred[m]["encoder_inputs"]) for m in pred])
        table.add_row("LLM tokens per image", *[str(pred[m]["image_tokens"]) for m in pred])
        console.print(table)
        return
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    # the effective command (every option spelled out), so the result can be reproduced exactly
    args = ["--vision", vision, "--llm", llm, "--methods", ",".join(s.name for s in cfg.specs),
            "--baseline", cfg.baseline, "--ratio", ratio, "--batch-size", batch_size,
            "--images-per-sample", images_per_sample, "--text-tokens", text_tokens, "--new-tokens", new_tokens,
            "--parts", ",".join(chosen), "--warmup", warmup, "--repeats", repeats, "--device", device,
            "--dtype", dtype, *(["--threads", threads] if threads else []), *(["--profile"] if profile else []),
            *(["--max-load", max_load, "--max-wait", max_wait] if max_load is not None else []),
            "--load-threshold", cfg.load_threshold]
    command = "laco bench " + " ".join(shlex.quote(str(a)) for a in args)
    result = run_benchmark(cfg, command=command, profile=profile).to_dict()
    folder = f"{out.rstrip('/')}/{device_slug(cfg.torch_device)}"
    paths = write_report(result, folder)
    analysis = analyze(result)
    table = Table(title=f"speedup vs {analysis['baseline']}: measured / predicted")
    table.add_column("part")
    methods_sp = list(analysis["speedups"])
    for m in methods_sp:
        table.add_column(m, justify="right")
    for part in LABELS:
        if any(part in analysis["speedups"][m] for m in methods_sp):
            table.add_row(LABELS[part], *[(f"{s['measured']:.2f}x / {s['predicted']:.2f}x"
                                           if (s := analysis["speedups"][m].get(part)) else "-") for m in methods_sp])
    console.print(table)
    for t in analysis["targets"]:
        console.print(f"[{'green' if t['met'] else 'red'}]{'met ' if t['met'] else 'MISS'}[/] {t['method']}: "
                      f"{t['target']} ({t['value']:.3g})")
    for kind, path in paths.items():
        console.print(f"{kind}: {path}")
