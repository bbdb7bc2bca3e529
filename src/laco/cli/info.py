"""``laco info``: tokens, parameters and FLOPs of a compressed encoder, before running anything."""

from __future__ import annotations

from typing import Optional

import typer

from laco.cli import app


@app.command()
def info(
    encoder: str = typer.Option("siglip-so400m-384", "--encoder", "-e", help="vision preset (laco info --list)"),
    method: str = typer.Option("laco", "--method", "-m", help="compressor name, or 'none'"),
    layer: str = typer.Option("1/4", "--layer", "-l", help="int k, fraction '1/4', 'post', or several merges joined by '+' (1/4+1/2)"),
    ratio: int = typer.Option(2, "--ratio", "-r", help="merge r x r tokens into one"),
    image_size: Optional[str] = typer.Option(
        None, "--image-size", help="one side (a square input, default: the preset's) or WIDTHxHEIGHT of an image "
        "tiled with LLaVA-OneVision's AnyRes (base image + tiles at the preset's size, unpadded, newlines)"),
    frames: Optional[int] = typer.Option(
        None, "--frames", min=1, help="a video of N frames at the preset's size: LLM tokens and encoder FLOPs, "
        "OneVision (2x2 pooling after the projector) vs the compressed encoder (no pooling, and with pooling)"),
    max_tiles: int = typer.Option(9, "--max-tiles", help="AnyRes: anyres_max_N token budget, in tiles"),
    max_grid: int = typer.Option(6, "--max-grid", help="AnyRes: pinpoints up to N x N tiles (OneVision: 6)"),
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
    from laco.compressors.spec import parse_layers

    console = Console()
    if list_all:
        console.print("vision presets:", ", ".join(laco.list_vision_presets()))
        console.print("compressors:", ", ".join(laco.list_compressors()))
        return
    from laco.model import anyres

    with torch.device("meta"):  # shapes only: no memory, no init time
        model = laco.create_vision_encoder(encoder)
        enc = laco.compress_encoder(model, method, layer=parse_layers(layer), ratio=ratio, feature_layer=feature_layer)
        full = laco.compress_encoder(laco.create_vision_encoder(encoder), "none", feature_layer=feature_layer)
    tiled = image_size is not None and "x" in image_size.lower()
    try:
        hw = anyres.parse_image_size(image_size) if image_size is not None else None
    except ValueError as err:
        raise ValueError(f"--image-size: {err}") from None
    cost = laco.encoder_cost(enc, None if tiled else (hw[0] if hw else None))
    report = anyres_report(enc, full, hw, max_tiles, max_grid) if tiled else None
    video = video_report(enc, full, frames) if frames else None
    if as_json:
        print(json.dumps({"encoder": encoder, "method": method, "layer": layer, "ratio": ratio, **cost.to_dict(),
                          **({"anyres": report} if report else {}), **({"video": video} if video else {})}, indent=2))
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
    if report:
        console.print(
            f"AnyRes image {report['image_width']}x{report['image_height']} (WxH): {report['tiles'][0]}x"
            f"{report['tiles'][1]} tiles + base = {report['encoder_inputs']} encoder inputs of {report['tile_size']} px "
            f"(anyres_max_{max_tiles})"
        )
        for key, name in (("without", "without compression"), ("with", f"with {method}")):
            r = report[key]
            console.print(f"  {name:>24}: {r['tile_grid'][0]}x{r['tile_grid'][1]} tokens per tile, LLM tokens "
                          f"{r['tokens']} (base {r['base_tokens']} + grid {r['grid'][0]}x{r['grid'][1]} + "
                          f"{r['newlines']} newlines), encoder {r['encoder_gflops']:.1f} GFLOPs")
        console.print(f"  -> {report['with']['tokens'] / report['without']['tokens']:.3f} of the LLM tokens, "
                      f"{report['with']['encoder_gflops'] / report['without']['encoder_gflops']:.3f} of the encoder FLOPs")
    if video:
        console.print(f"video of {frames} frames at {video['frame_size']} px (one newline per video):")
        for key, name in (("onevision", "OneVision (no compression, 2x2 pooling)"),
                          ("with", f"with {method}, no pooling"), ("with_pooling", f"with {method} + 2x2 pooling")):
            r = video[key]
            console.print(f"  {name:>40}: {r['frame_grid'][0]}x{r['frame_grid'][1]} tokens per frame, LLM tokens "
                          f"{r['tokens']}, encoder {r['encoder_gflops']:.1f} GFLOPs")


def anyres_report(enc, full, image_hw: tuple[int, int], max_tiles: int, max_grid: int) -> dict:
    """Tiles, LLM tokens and encoder FLOPs of one AnyRes image, with ``enc`` and with the uncompressed ``full``."""
    import laco
    from laco.model import anyres

    size = enc.adapter.config.image_size
    out: dict = {"image_height": image_hw[0], "image_width": image_hw[1], "tile_size": size}
    for key, tower in (("without", full), ("with", enc)):
        lay = anyres.encoder_image_layout(tower, image_hw, max_tiles=max_tiles, max_grid=max_grid)
        grid = lay.tile_grid
        flops = laco.encoder_cost(tower, size).total_flops * lay.num_inputs
        out.update(tiles=list(lay.tiles), encoder_inputs=lay.num_inputs)
        out[key] = {"tile_grid": list(grid), "tokens": lay.num_tokens, "base_tokens": grid[0] * grid[1],
                    "grid": list(lay.final_grid), "newlines": lay.final_grid[0], "encoder_gflops": flops / 1e9}
    return out


def video_report(enc, full, num_frames: int) -> dict:
    """LLM tokens and encoder FLOPs of a video: OneVision (uncompressed, 2x2 pooling) vs ``enc`` without / with it."""
    import laco
    from laco.model import anyres

    size = enc.adapter.config.image_size
    out: dict = {"frames": num_frames, "frame_size": size}
    for key, tower, pool in (("onevision", full, True), ("with", enc, False), ("with_pooling", enc, True)):
        grid = tower.output_grid(tower.adapter.grid_for_image_size(size))
        out[key] = {"frame_grid": list(anyres.pooled_frame_grid(grid) if pool else grid), "pooling": pool,
                    "tokens": anyres.video_tokens(num_frames, grid, pool=pool, newline=True),
                    "encoder_gflops": laco.encoder_cost(tower, size).total_flops * num_frames / 1e9}
    return out
