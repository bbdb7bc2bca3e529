"""``laco convert``: a LLaVA / LLaVA-OneVision checkpoint -> a LaCo model with a zero-initialised PML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from laco.cli import app


def probe_recommendation(path: Path, src_dir: Path) -> tuple[int, int]:
    """(layer k, ratio r) recommended by a `laco probe` JSON that probed ``src_dir``."""
    from laco.safety import read_json_object

    data = read_json_object(path, "--from-probe result")
    rec = data.get("recommendation") or {}
    if not isinstance(rec, dict):
        raise ValueError(f"--from-probe: 'recommendation' is not an object: {path}")
    row = rec.get("row")
    if row is None or not rec.get("fits_budget", False):
        raise ValueError(f"{str(path)!r} has no recommendation within its FLOP budget; pick --layer/--ratio by hand")
    if Path(str(data.get("source", ""))).resolve() != src_dir.resolve():
        raise ValueError(f"{str(path)!r} probed {data.get('source')!r}, not {str(src_dir)!r}")
    fp_file = path.with_name(f"{path.stem}.fingerprint.json")
    if fp_file.is_file():  # written by laco probe: the weights must still be the probed ones
        from laco.safety import weights_identity

        saved = read_json_object(fp_file, "probe fingerprint").get("model") or {}
        if saved.get("sha256") and saved["sha256"] != weights_identity(src_dir)["sha256"]:
            raise ValueError(f"{src_dir} changed since it was probed (weights hash differs from {fp_file}); "
                             "probe it again")
    return int(row["layer"]), int(row["ratio"])


@app.command()
def convert(
    src_dir: Path = typer.Argument(..., help="Hugging Face LlavaForConditionalGeneration / "
                                             "LlavaOnevisionForConditionalGeneration checkpoint directory"),
    out_dir: Path = typer.Argument(..., help="where the LaCo model is written (must not exist unless --overwrite)"),
    layer: str = typer.Option("1/4", "--layer", "-l", help="merge after layer: int k, fraction '1/4', 'post', "
                                                           "or merges joined by '+' (1/4+1/2)"),
    ratio: int = typer.Option(2, "--ratio", "-r", min=1, help="merge r x r tokens into one"),
    method: str = typer.Option("laco", "--method", "-m", help="compressor (laco starts as exact average pooling)"),
    proj: Optional[str] = typer.Option(None, "--proj", help="PML projection: mlp (default) or linear"),
    pad: Optional[str] = typer.Option(None, "--pad", help="odd grids: replicate (default), zero, crop, error"),
    from_probe: Optional[Path] = typer.Option(None, "--from-probe", help="take --layer/--ratio from a `laco probe` "
                                                                         "JSON's recommendation for this checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT_DIR if it exists"),
    as_json: bool = typer.Option(False, "--json", help="print the conversion report as JSON"),
) -> None:
    """Turn a LLaVA(-OneVision) checkpoint into a LaCo model (zero-init PML: starts as in-encoder pooling).

    The tower, projector and LLM weights are carried over unchanged; the result loads with from_pretrained
    and goes into `laco train` stage 1 (PML + projector)."""
    from rich.console import Console

    from laco.compressors.spec import parse_layers
    from laco.model.convert import convert_checkpoint

    kwargs = {k: v for k, v in (("proj", proj), ("pad", pad)) if v is not None}
    layer_spec = parse_layers(layer)
    if from_probe is not None:
        layer_spec, ratio = probe_recommendation(from_probe, src_dir)
    report = convert_checkpoint(src_dir, out_dir, layer=layer_spec, ratio=ratio, method=method,
                                compressor_kwargs=kwargs, overwrite=overwrite)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    console = Console()
    console.print(f"converted {report.architecture} {report.source} -> {report.out_dir}")
    console.print(f"  {report.compression['method']} after layer(s) {report.merge_after_layers} of "
                  f"{report.encoder_layers_run} run, r = {report.compression['ratio']}")
    console.print(f"  image tokens per image: {report.tokens_per_image_before} -> {report.tokens_per_image_after}; "
                  f"encoder FLOP ratio {report.encoder_flop_ratio:.3f}")
    for note in report.notes:
        console.print(f"  [yellow]note:[/] {note}")
    console.print(f"next: train stage 1 (PML + projector) with `laco train` using model: {{pretrained: {out_dir}}}")
