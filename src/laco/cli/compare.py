"""``laco compare``: the main experiment (LaCo vs external and in-encoder baselines, train and retrofit)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laco.cli import app, comma_list


@app.command()
def compare(
    preset: str = typer.Option("quick", "--preset", "-p", help="smoke (seconds), quick (<= 10 min on 2 cores), full (>= 3 seeds)"),
    methods: Optional[str] = typer.Option(None, "--methods", "-m", help="comma list, e.g. 'none,laco@1/4,ldpv2(residual=true)@1/4' (default: the preset's)"),
    scenarios: Optional[str] = typer.Option(None, "--scenarios", help="comma list of readout, train, train_encoder, retrofit (default: the preset's)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma list of seeds (default: the preset's)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML/JSON file overriding any preset field"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="results folder (default: laco-results/compare/<preset>)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads per process (default: the preset's); 1 can be faster on a busy machine"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="processes running methods concurrently (default: the preset's); results do not depend on it"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="data + pretrained encoder cache (default: $LACO_CACHE or ~/.cache/laco)"),
    list_methods: bool = typer.Option(False, "--list", help="list the methods and exit"),
    merge: Optional[list[Path]] = typer.Option(None, "--merge", help="results folders of runs that differ only in "
                                               "their seeds (repeat the option): merge into --out, run nothing"),
    data: Optional[Path] = typer.Option(None, "--data", help="your own LLaVA-format training file (.json/.jsonl, "
                                        "single-image records); needs --eval; runs the MLLM scenarios only"),
    eval_file: Optional[Path] = typer.Option(None, "--eval", help="with --data: the evaluation JSONL (laco eval's format)"),
    image_folder: Optional[Path] = typer.Option(None, "--image-folder", help="with --data: the folder both files' image "
                                                "paths are relative to (default: each file's folder)"),
    vision: Optional[Path] = typer.Option(None, "--vision", help="with --data: a saved SigLIP/CLIP/DINOv2 vision model "
                                          "folder with its image processor (default: the embedded pretrained encoder)"),
    llm: Optional[Path] = typer.Option(None, "--llm", help="with --data: a saved causal LM + tokenizer folder (with a "
                                       "chat template; default: a small Qwen2 pretrained on the training text)"),
) -> None:
    """Compare LaCo with external and in-encoder compression on the embedded scenes (or your own data: --data,
    --eval); writes JSON, markdown, PNGs."""
    import shlex
    import sys

    from rich.console import Console

    from laco.experiments.compare import DEFAULT_METHODS, load_preset, merge_results, run_compare
    from laco.experiments.report import print_table, write_report
    from laco.safety import OutputLock, check_output_path, read_yaml, write_marker

    # rich falls back to 80 columns when stdout is not a terminal (CI logs, `| tee`): the 10-column
    # tables would be cut to "meth…", so give files and pipes a wide console
    console = Console() if sys.stdout.isatty() else Console(width=180)
    if list_methods:
        from laco.compressors.spec import METHOD_ALIASES, parse_method

        width = max(map(len, DEFAULT_METHODS))
        for name in DEFAULT_METHODS:
            spec = parse_method(name)
            opts = ", ".join(f"{k}={v}" for k, v in spec.kwargs)
            console.print(f"{name:{width}s}  {spec.compressor} @ {spec.layer or '-'}" + (f" ({opts})" if opts else ""),
                          markup=False)
        console.print("any '<compressor>@<layer>' or '<compressor>(key=value,...)@<layer>' works too; deprecated "
                      "aliases: " + ", ".join(f"{a} = {c}" for a, c in METHOD_ALIASES.items()), markup=False)
        return
    command = "laco " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if merge:
        if out is None:
            raise ValueError("--merge needs --out, the folder to write the merged results to")
        ignored = [f for f, v in (("--data", data), ("--eval", eval_file), ("--image-folder", image_folder),
                                  ("--vision", vision), ("--llm", llm)) if v is not None]
        if ignored:
            raise ValueError(f"--merge runs nothing: {', '.join(ignored)} would be ignored (the parts record their data)")
        results = merge_results(merge, command=command)
        with OutputLock(out, "compare output folder"):
            write_report(results, out)
            write_marker(out, "compare")
        print_table(results, console)
        console.print(f"merged {len(merge)} runs (seeds {results['config']['seeds']}): {out / 'results.md'}")
        return
    if out is not None:
        check_output_path(out, "--out")
    user = _user_source(data, eval_file, image_folder, vision, llm)
    if config is not None:  # a config file may name its preset
        fields = read_yaml(config, "compare config") or {}
        if isinstance(fields, dict) and "preset" in fields and preset == "quick":
            preset = str(fields["preset"])
    seed_list = None
    if seeds:
        try:
            seed_list = comma_list(seeds, int)
        except ValueError:
            raise ValueError(f"--seeds must be a comma list of integers, got {seeds!r}") from None
    p = load_preset(preset, config, methods=methods, scenarios=comma_list(scenarios), seeds=seed_list, threads=threads,
                    workers=workers, cache_dir=str(cache_dir) if cache_dir else None)
    if user is not None:
        if not scenarios:  # the preset's MLLM scenarios (readout needs the embedded encoder's head)
            import dataclasses

            from laco.experiments.compare.presets import MLLM_SCENARIOS

            p = dataclasses.replace(p, scenarios=[s for s in p.scenarios if s in MLLM_SCENARIOS] or ["train"])
        user.check_preset(p)
    out = out or Path("laco-results") / "compare" / p.name
    console.print(f"[bold]laco compare[/bold]: preset {p.name}, {len(p.methods)} methods x {p.scenarios} x seeds {p.seeds} -> {out}")
    check_output_path(out, "--out")
    # a second run into the same folder is refused; one that fails before writing anything leaves no folder
    with OutputLock(out, "compare output folder"):
        results = run_compare(p, out, command=command, user=user, log=console.print)
        write_marker(out, "compare")
    print_table(results, console)
    console.print(f"results: {out / 'results.md'} (+ results.json, acc_vs_flops.png, acc_vs_depth.png); "
                  f"total {results['timings_s']['total_s']:.0f} s")


def _user_source(data, eval_file, image_folder, vision, llm):
    """``--data`` and friends -> a checked ``UserSource`` (None without --data); a missing path or flag is an error."""
    from laco.experiments.compare.userdata import UserSource

    if data is None and eval_file is None:
        others = [f for f, v in (("--image-folder", image_folder), ("--vision", vision), ("--llm", llm)) if v is not None]
        if others:
            raise ValueError(f"{', '.join(others)} only apply to your own data: add --data TRAIN.json --eval TEST.jsonl")
        return None
    if data is None or eval_file is None:
        raise ValueError("--data and --eval go together: the LLaVA-format training file and the evaluation JSONL")
    return UserSource(data, eval_file, image_folder, vision, llm)
