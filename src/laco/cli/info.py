"""``laco info``: tokens, parameters and FLOPs of a compressed encoder, before running anything."""

from __future__ import annotations

from typing import Optional

import typer

from laco.cli import app


def parse_layers(spec: str) -> object:
    """'1/4' -> '1/4'; '3' -> 3; 'post' -> 'post'; '1/4,1/2' -> ['1/4', '1/2']."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    conv = [int(p) if p.isdigit() else p for p in parts]
    return conv[0] if len(conv) == 1 else conv


@app.command()
def info(
    encoder: str = typer.Option("siglip-so400m-384", "--encoder", "-e", help="vision preset (laco info --list)"),
    method: str = typer.Option("laco", "--method", "-m", help="compressor name, or 'none'"),
    layer: str = typer.Option("1/4", "--layer", "-l", help="int k, fraction '1/4', 'post', or a comma list"),
    ratio: int = typer.Option(2, "--ratio", "-r", help="merge r x r tokens into one"),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help="default: the preset's"),
    feature_layer: int = typer.Option(-1, "--feature-layer", help="-1 last layer, -2 penultimate, ..."),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    list_all: bool = typer.Option(False, "--list", help="list presets and compressors and exit"),
) -> None:
    """Print tokens, parameters and analytic FLOPs per part against the uncompressed encoder."""
    import json

    import torch
    from rich.console import Console
    from rich.table import Table

    import laco

    console = Console()
    if list_all:
        console.print("vision presets:", ", ".join(laco.list_vision_presets()))
        console.print("compressors:", ", ".join(laco.list_compressors()))
        return
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = laco.create_vision_encoder(encoder)
        enc = laco.compress_encoder(model, method, layer=parse_layers(layer), ratio=ratio, feature_layer=feature_layer)
    cost = laco.encoder_cost(enc, image_size)
    if as_json:
        print(json.dumps({"encoder": encoder, "method": method, "layer": layer, "ratio": ratio, **cost.to_dict()}, indent=2))
        return
    table = Table(title=f"{encoder} + {method} @ layer {layer}, r={ratio}  ({enc.num_layers} layers run)")
    for col in ("part", "params (M)", "GFLOPs"):
        table.add_column(col, justify="right" if col != "part" else "left")
    parts = list(dict.fromkeys([*cost.flops, *cost.params]))
    for part in parts:
        table.add_row(part, f"{cost.params.get(part, 0) / 1e6:.2f}", f"{cost.flops.get(part, 0) / 1e9:.2f}")
    table.add_row("total", f"{cost.total_params / 1e6:.2f}", f"{cost.total_flops / 1e9:.2f}", style="bold")
    console.print(table)
    console.print(
        f"visual tokens: {cost.tokens_in} ({cost.input_grid[0]}x{cost.input_grid[1]}) -> {cost.tokens_out} "
        f"({cost.output_grid[0]}x{cost.output_grid[1]}), + {enc.num_prefix_tokens} prefix"
    )
    console.print(
        f"encoder FLOPs: {cost.total_flops / 1e9:.1f} G vs {cost.baseline_flops / 1e9:.1f} G uncompressed "
        f"-> FLOP ratio {cost.flop_ratio:.3f} ({1 / cost.flop_ratio:.2f}x fewer)"
    )
