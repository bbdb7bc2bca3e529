"""``laco probe``: rank merge depths and ratios of a pretrained encoder by feature fidelity vs FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laco.cli import app, comma_list


def parse_layer_list(spec: str) -> list | None:
    """'all' -> None (every depth); '0,2,1/4,post' -> [0, 2, '1/4', 'post']."""
    if spec.strip().lower() == "all":
        return None
    parts = comma_list(spec)
    if not parts:
        raise ValueError(f"--layers {spec!r} lists no layer; use 'all' or e.g. '0,2,1/4,post'")
    from laco.compressors.spec import parse_layer

    return [parse_layer(p) for p in parts]


def parse_ratio_list(spec: str) -> list[int]:
    try:
        ratios = comma_list(spec, int)
    except ValueError:
        raise ValueError(f"--ratios must be comma-separated integers like '2,3', got {spec!r}") from None
    if not ratios:
        raise ValueError(f"--ratios {spec!r} lists no ratio")
    return ratios


def write_fingerprint(out: Path, name: str, source: str, images: Path | None, command: str) -> None:
    """``NAME.fingerprint.json``: what was probed (the folder's weights hash), on which images, how; marks
    the folder as a laco probe output. ``laco convert --from-probe`` checks the weights hash."""
    import hashlib
    import json

    from laco.io import atomic_write_text
    from laco.safety import weights_identity, write_marker

    model = weights_identity(source) if Path(source).is_dir() else {"path": source}
    files = sorted(p for p in images.rglob("*") if p.is_file()) if images is not None else []
    h = hashlib.sha256("".join(f"{p.relative_to(images)}:{p.stat().st_size}\n" for p in files).encode()).hexdigest()
    fp = {"model": model, "images": {"path": str(images.resolve()) if images else None, "files_sha256": h},
          "command": command}
    atomic_write_text(out / f"{name}.fingerprint.json", json.dumps(fp, indent=2) + "\n")
    write_marker(out, "probe")


@app.command()
def probe(
    source: str = typer.Argument(..., help="'embedded' (the project's pretrained encoder), a vision preset, or a "
                                           "directory: HF vision encoder, LLaVA / LLaVA-OneVision checkpoint, LaCo model"),
    images: Optional[Path] = typer.Option(None, "--images", "-i", help="image folder; sub-folders = class labels "
                                                                        "(default for 'embedded': its real test scenes)"),
    layers: str = typer.Option("all", "--layers", "-l", help="'all' (every k in 0..L) or a list: 0,2,1/4,post"),
    ratios: str = typer.Option("2,3", "--ratios", "-r", help="merge ratios r (r x r tokens -> 1), comma-separated"),
    budget: float = typer.Option(0.6, "--budget", "-b", help="highest acceptable encoder FLOP ratio"),
    metric: str = typer.Option("auto", "--metric", help="ranking: auto (probe_acc with labels, else cosine), "
                                                        "cosine, rel_error, probe_acc"),
    max_images: int = typer.Option(512, "--max-images", "-n", min=1, help="images to use (a seeded subset)"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    out: Path = typer.Option(Path("probe_results"), "--out", "-o", help="folder for NAME.json / NAME.md / NAME.png"),
    name: str = typer.Option("probe", "--name", help="file stem of the outputs"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(2, "--threads", min=1, help="CPU threads for torch"),
) -> None:
    """Measure, before training, how much an in-encoder merge at each depth/ratio changes the final features."""
    import shlex

    import torch
    from rich.console import Console

    from laco.safety import OutputLock, check_device, check_finite, check_output_path
    from laco.data.images import load_image_folder
    from laco.eval.probe import ProbeConfig, probe_encoder
    from laco.model.sources import load_encoder_source

    check_finite("--budget", budget, low=0.0)
    check_device(device)
    check_output_path(out, "--out")
    console = Console()
    torch.set_num_threads(threads)
    config = ProbeConfig(layers=parse_layer_list(layers), ratios=parse_ratio_list(ratios), budget=budget,
                         metric=metric, batch_size=batch_size, seed=seed)
    if source == "embedded":
        from laco.experiments.pretrain import embedded_encoder_source

        src = embedded_encoder_source()
    else:
        src = load_encoder_source(source)
    config.feature_layer, config.final_norm = src.feature_layer, src.final_norm
    for note in src.notes:
        console.print(f"[yellow]note:[/] {note}")
    if images is not None:
        pixels, labels, classes = load_image_folder(images, src.image_size, src.image_mean, src.image_std,
                                                    max_images=max_images, seed=seed)
        what = f"{len(pixels)} images from {images}" + (f", {len(classes)} classes" if labels is not None else "")
    elif source == "embedded":
        from laco.data.embedded import real_scene_images
        from laco.experiments.pretrain import to_pixel_values

        imgs, quadrant_labels = real_scene_images(max_images, split="test")
        pixels, labels = to_pixel_values(imgs), torch.as_tensor(quadrant_labels)
        what = f"{len(pixels)} held-out embedded scenes (labels: item class per quadrant)"
    else:
        raise ValueError("--images DIR is required for this source (only 'embedded' brings its own images)")
    console.print(f"probing {src.name}: {what}")
    src.model.to(device)
    result = probe_encoder(src.model, pixels, labels, config, source=src.name)
    result.notes = [*src.notes, f"images: {what}"]
    result.command = "laco probe " + " ".join(shlex.quote(str(a)) for a in (
        source, *(("--images", images) if images is not None else ()), "--layers", layers, "--ratios", ratios,
        "--budget", budget, "--metric", metric, "--max-images", max_images, "--seed", seed, "--out", out, "--name", name))
    with OutputLock(out, "probe output folder"):  # one writer at a time
        paths = result.save(out, stem=name)
        write_fingerprint(out, name, source, images, result.command)
    print(result.to_markdown())
    console.print(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']}")
