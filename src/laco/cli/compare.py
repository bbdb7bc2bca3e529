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
) -> None:
    """Compare LaCo with external and in-encoder compression on the embedded scenes; writes JSON, markdown, PNGs."""
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
        results = merge_results(merge, command=command)
        with OutputLock(out, "compare output folder"):
            write_report(results, out)
            write_marker(out, "compare")
        print_table(results, console)
        console.print(f"merged {len(merge)} runs (seeds {results['config']['seeds']}): {out / 'results.md'}")
        return
    if out is not None:
        check_output_path(out, "--out")
    if config is not None:  # a config file may name its preset
        data = read_yaml(config, "compare config") or {}
        if isinstance(data, dict) and "preset" in data and preset == "quick":
            preset = str(data["preset"])
    seed_list = None
    if seeds:
        try:
            seed_list = comma_list(seeds, int)
        except ValueError:
            raise ValueError(f"--seeds must be a comma list of integers, got {seeds!r}") from None
    p = load_preset(preset, config, methods=methods, scenarios=comma_list(scenarios), seeds=seed_list, threads=threads,
                    workers=workers, cache_dir=str(cache_dir) if cache_dir else None)
    out = out or Path("laco-results") / "compare" / p.name
    console.print(f"[bold]laco compare[/bold]: preset {p.name}, {len(p.methods)} methods x {p.scenarios} x seeds {p.seeds} -> {out}")
    check_output_path(out, "--out")
    with OutputLock(out, "compare output folder"):  # a second run into the same folder is refused
        results = run_compare(p, out, command=command, log=console.print)
        write_marker(out, "compare")
    print_table(results, console)
    console.print(f"results: {out / 'results.md'} (+ results.json, acc_vs_flops.png, acc_vs_depth.png); "
                  f"total {results['timings_s']['total_s']:.0f} s")
