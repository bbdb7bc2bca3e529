"""Image folders as pixel tensors (ImageFolder layout: sub-folder = class), decoded with ``laco.safety.open_image``
(the one image decoder)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image_folder(
    folder: str | Path, image_size: int, mean: Sequence[float], std: Sequence[float], *, max_images: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Images of ``folder`` as (N, 3, S, S) pixel values; labels from sub-folder names (ImageFolder layout).

    Images directly in ``folder`` are unlabelled; if every image sits in a sub-folder, each sub-folder is a
    class and labels (N,) are returned with the sorted class names. ``max_images`` draws a seeded subset.
    Images are resized (bicubic) to S x S, scaled to [0, 1] and normalised with ``mean`` / ``std``.
    """
    from PIL import Image

    from laco.safety import open_image

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
    labelled = all(p.parent != root for p in files)
    classes = sorted({p.relative_to(root).parts[0] for p in files}) if labelled else []
    if max_images is not None and len(files) > max_images:
        keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:max_images]
        files = [files[i] for i in sorted(keep.tolist())]
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = []
    for p in files:
        im = open_image(p).resize((image_size, image_size), Image.Resampling.BICUBIC)
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
        pixels.append((t.permute(2, 0, 1).float() / 255.0 - m) / s)
    labels = torch.tensor([classes.index(p.relative_to(root).parts[0]) for p in files]) if labelled else None
    return torch.stack(pixels), labels, classes
