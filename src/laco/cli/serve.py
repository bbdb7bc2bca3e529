"""``laco serve-bench``: the serving benchmark inside vLLM (requests/s, output tokens/s, TTFT per method)."""

from __future__ import annotations

from typing import Optional

import typer

from laco.cli import app, comma_list


def parse_positive_ints(text: str, option: str) -> tuple[int, ...]:
    """'1,16,64' -> (1, 16, 64); anything else is an error naming the option."""
    try:
        values = tuple(comma_list(text, int) or ())
    except ValueError:
        raise ValueError(f"{option} takes a comma list of positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option} takes a comma list of positive integers, got {text!r}")
    return values


@app.command("serve-bench")
def serve_bench(
    vision: str = typer.Option("siglip-so400m-384", "--vision", help="vision preset (laco info --list)"),
    llm: str = typer.Option("qwen2-0.5b", "--llm", help="LLM preset: qwen2-0.5b, qwen2-1.5b, qwen2-7b"),
    methods: str = typer.Option("none,laco@post,laco@1/4", "--methods", "-m",
                                help="comma list: none, <compressor>@<layer> e.g. laco@1/4, laco@post (post = laco@post, deprecated)"),
    ratio: int = typer.Option(2, "--ratio", "-r", min=1, help="merge r x r tokens into one"),
    output_lens: str = typer.Option("1,16,64", "--output-lens", help="comma list: new tokens per request"),
    concurrency: str = typer.Option("1,4", "--concurrency", help="comma list: requests in flight at most"),
    requests: int = typer.Option(8, "--requests", "-n", min=1, help="requests per (output length, concurrency) cell"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16"),
    max_model_len: int = typer.Option(1024, "--max-model-len", min=64, help="vLLM's max_model_len"),
    enforce_eager: bool = typer.Option(True, "--enforce-eager/--compile",
                                       help="eager LLM (default) or vLLM's torch.compile / CUDA graphs"),
    out: str = typer.Option("benchmarks/results", "--out", "-o", help="results go to OUT/<device>/vllm/"),
    from_json: Optional[str] = typer.Option(None, "--from-json",
                                            help="re-write the markdown/PNG of a saved result JSON; run nothing"),
) -> None:
    """Serve the same requests through vLLM for each method; write JSON, markdown and a plot."""
    import shlex
    from pathlib import Path

    from laco.safety import check_output_path, read_result_json
    from laco.serve import bench

    if from_json is not None:
        path = Path(from_json)
        result = read_result_json(path, "serve-bench", ("config", "baseline", "methods"))
        for kind, p in bench.write_serve_report(result, path.parent).items():
            typer.echo(f"wrote {kind}: {p}")
        return
    cfg = bench.ServeBenchConfig(
        vision=vision, llm=llm, methods=methods, ratio=ratio,
        output_lens=parse_positive_ints(output_lens, "--output-lens"),
        concurrency=parse_positive_ints(concurrency, "--concurrency"), requests=requests, dtype=dtype,
        max_model_len=max_model_len, enforce_eager=enforce_eager)
    check_output_path(out, "--out")
    bench.require_vllm()
    folder = Path(out) / bench.device_folder() / "vllm"  # before the engines change torch's thread count
    args = ["--vision", vision, "--llm", llm, "--methods", ",".join(s.name for s in cfg.specs), "--ratio", ratio,
            "--output-lens", ",".join(map(str, cfg.output_lens)), "--concurrency",
            ",".join(map(str, cfg.concurrency)), "--requests", requests, "--dtype", cfg.dtype,
            "--max-model-len", max_model_len, "--enforce-eager" if enforce_eager else "--compile"]
    command = "laco serve-bench " + " ".join(shlex.quote(str(a)) for a in args)

    def write(result: dict) -> None:  # after each method too: a stopped run keeps what it measured
        for kind, p in bench.write_serve_report({**result, "command": command}, folder).items():
            typer.echo(f"wrote {kind}: {p}")

    write(bench.run_serve_bench(cfg, on_method=write))
