"""LLaVA-OneVision's visual layout (AnyRes tiles, unpadding, ``image_newline``, video), on the compressed grid.

Pure functions shared by the model (which packs features) and the processor (which counts tokens), so
both follow one arithmetic: Hugging Face's ``LlavaOnevisionModel.pack_image_features`` /
``LlavaOnevisionProcessor._get_number_of_features``, step by step (same rounding, same order).

One image of size ``(H, W)`` with pinpoints (pixel resolutions ``[h, w]``, multiples of the tile size S):

1. the best-fit pinpoint ``(rows*S, cols*S)`` (most kept resolution, then least waste); the image is
   resized into it with its aspect ratio kept, centred and padded, and cut into ``rows x cols`` tiles;
2. the encoder sees the base image (the whole image at S x S) and every tile *on its own*; with LaCo
   each gives a compressed ``g x g`` grid (``g = 27`` uncompressed at SigLIP-384, 14 with r=2);
3. the tile grids are stitched into one ``rows*g x cols*g`` grid (row-major), and the rows / columns that
   only hold padding are cut: the image's aspect ratio is mapped onto the *compressed* grid, so with r=2
   a cut row is one compressed row, i.e. r patch rows (see ``unpad_bounds``);
4. ``anyres_max_N``: if the unpadded grid holds more than 1.1² x N tiles' worth of tokens, it is
   bilinearly down-scaled by that factor (the base image is never scaled);
5. a learned ``image_newline`` token closes every row; the base image's ``g*g`` tokens come first.

Tokens for the image: ``g*g + h*w + h`` with ``(h, w)`` the unpadded (and down-scaled) grid. An image in
a multi-image prompt (or with no pinpoints) is one base image: ``g*g`` (+1 newline). A video of T frames:
``T * p*p + 1`` with ``p = ceil(g/2)`` under OneVision's 2x2 bilinear frame pooling, or ``p = g`` when the
compression inside the encoder replaces that pooling (LaCo r=2 on SigLIP-384: ``g = 14 = ceil(27/2)``,
the same budget as OneVision's pooling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers.image_processing_utils import select_best_resolution

Size = tuple[int, int]  # (height, width)

#: OneVision's default: at most ~9 tiles' worth of tokens after unpadding
DEFAULT_VISION_ASPECT_RATIO = "anyres_max_9"


def parse_max_tiles(vision_aspect_ratio: str) -> int:
    """``"anyres_max_9"`` -> 9 (OneVision's token budget in tiles); anything else is a ValueError."""
    prefix = "anyres_max_"
    if not isinstance(vision_aspect_ratio, str) or not vision_aspect_ratio.startswith(prefix) \
            or not vision_aspect_ratio[len(prefix):].isdigit() or int(vision_aspect_ratio[len(prefix):]) < 1:
        raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_9' (N >= 1 tiles), got {vision_aspect_ratio!r}")
    return int(vision_aspect_ratio[len(prefix):])


def check_pinpoints(pinpoints: Sequence[Sequence[int]], tile_size: int) -> list[list[int]]:
    """Pinpoints as ``[[h, w], ...]`` ints, each a positive multiple of ``tile_size`` (ValueError otherwise)."""
    out = []
    for p in pinpoints:
        if len(p) != 2:
            raise ValueError(f"each image_grid_pinpoint must be [height, width], got {list(p)!r}")
        h, w = int(p[0]), int(p[1])
        if h < tile_size or w < tile_size or h % tile_size or w % tile_size:
            raise ValueError(f"image_grid_pinpoint {[h, w]} is not a positive multiple of the tile size {tile_size}")
        out.append([h, w])
    if not out:
        raise ValueError("image_grid_pinpoints is empty")
    return out


def default_pinpoints(tile_size: int, max_grid: int = 6) -> list[list[int]]:
    """LLaVA-OneVision's pinpoints: every (rows, cols) grid up to ``max_grid`` x ``max_grid`` tiles of ``tile_size``."""
    return [[r * tile_size, c * tile_size] for r in range(1, max_grid + 1) for c in range(1, max_grid + 1)]


def parse_image_size(spec: str) -> Size:
    """``"1152x768"`` (width x height, as image viewers write it) or ``"384"`` (square) -> (height, width)."""
    parts = str(spec).lower().replace(" ", "").split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"image size must be WIDTHxHEIGHT (e.g. 1152x768) or one side (e.g. 384), got {spec!r}")
    w, h = (int(parts[0]), int(parts[-1]))
    return h, w


def tile_grid(image_size: Size, pinpoints: Sequence[Sequence[int]], tile_size: int) -> Size:
    """(rows, cols) of tiles for an image of ``image_size`` (H, W): the best-fit pinpoint / tile size."""
    h, w = (int(v) for v in image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive (height, width), got {tuple(image_size)}")
    best_h, best_w = select_best_resolution((h, w), [list(p) for p in pinpoints])
    return best_h // tile_size, best_w // tile_size


def num_tiles(image_size: Size, pinpoints: Sequence[Sequence[int]], tile_size: int) -> int:
    """Encoder inputs for one AnyRes image: the base image plus rows*cols tiles."""
    rows, cols = tile_grid(image_size, pinpoints, tile_size)
    return 1 + rows * cols


def unpad_bounds(image_size: Size, grid: Size) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the part of a stitched ``grid`` (rows, cols) that holds the image.

    Hugging Face's ``unpad_image`` arithmetic on the grid: the padded side loses ``(cur - new) // 2`` from
    each end, with ``new = int(round(orig * scale, 7))``. Works on any grid, so on the compressed one too.
    """
    oh, ow = (int(v) for v in image_size)
    ch, cw = grid
    if ow / oh > cw / ch:  # wider than the canvas: padded top and bottom
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def downscaled_grid(grid: Size, tile_tokens: int, max_tiles: int) -> Size | None:
    """``anyres_max_N``: the bilinear target (h, w) when ``grid`` holds over 1.1² x N tiles of tokens, else None.

    ``tile_tokens``: tokens of one tile's grid (HF: ``height**2`` of the square tile grid).
    """
    h, w = grid
    ratio = math.sqrt(h * w / (max_tiles * tile_tokens))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return None


@dataclass(frozen=True)
class ImageLayout:
    """Where one image's tokens come from: tiles, the stitched grid, its unpadded / down-scaled part."""

    tiles: Size  # (rows, cols); (0, 0): the base image only
    tile_grid: Size  # (g, g): one tile's (compressed) token grid
    bounds: tuple[int, int, int, int]  # unpadded (top, bottom, left, right) on the stitched grid
    final_grid: Size  # (h, w) after unpadding and anyres_max down-scaling
    scaled: bool  # whether anyres_max down-scaling applies
    newline: bool

    @property
    def num_inputs(self) -> int:
        """Encoder inputs: the base image + the tiles."""
        return 1 + self.tiles[0] * self.tiles[1]

    @property
    def num_tokens(self) -> int:
        """LLM tokens: base grid, then (unpadded grid + one newline per row) or (one newline)."""
        base = self.tile_grid[0] * self.tile_grid[1]
        if self.tiles == (0, 0):
            return base + int(self.newline)
        h, w = self.final_grid
        return base + h * w + (h if self.newline else 0)


def image_layout(
    image_size: Size,
    *,
    tile_grid_size: Size,
    pinpoints: Sequence[Sequence[int]] | None,
    tile_size: int,
    max_tiles: int,
    newline: bool,
    tiled: bool = True,
) -> ImageLayout:
    """The layout of one image; ``tiled=False`` (no pinpoints, or an image of a multi-image prompt): base only."""
    g = tuple(int(v) for v in tile_grid_size)
    if not tiled or not pinpoints:
        return ImageLayout((0, 0), g, (0, 0, 0, 0), (0, 0), False, newline)
    rows, cols = tile_grid(image_size, pinpoints, tile_size)
    stitched = (rows * g[0], cols * g[1])
    top, bottom, left, right = unpad_bounds(image_size, stitched)
    unpadded = (bottom - top, right - left)
    target = downscaled_grid(unpadded, g[0] * g[1], max_tiles)
    return ImageLayout((rows, cols), g, (top, bottom, left, right), target or unpadded, target is not None, newline)


def encoder_image_layout(encoder, image_size: Size, *, max_tiles: int = 9, max_grid: int = 6,
                         newline: bool = True, tiled: bool = True) -> ImageLayout:
    """One image's layout for a (compressed) vision encoder with OneVision's default pinpoints.

    Tiles of the encoder's input size S, pinpoints up to ``max_grid`` x ``max_grid`` tiles, ``anyres_max_N``
    with N = ``max_tiles``, the tile grid the encoder outputs (compressed). What ``laco info --image-size``
    and ``laco bench --dry-run --image-size`` report (``encoder`` is a ``CompressedVisionEncoder``).
    """
    size = encoder.adapter.config.image_size
    grid = encoder.output_grid(encoder.adapter.grid_for_image_size(size))
    return image_layout(image_size, tile_grid_size=grid, pinpoints=default_pinpoints(size, max_grid), tile_size=size,
                        max_tiles=max_tiles, newline=newline, tiled=tiled)


def pack_image(features: torch.Tensor, layout: ImageLayout, newline: torch.Tensor | None) -> torch.Tensor:
    """One image's encoder outputs (1 + rows*cols, g*g, D), base first -> its LLM tokens (num_tokens, D).

    HF's ``pack_image_features``: tiles stitched row-major into (D, rows*g, cols*g), unpadded, down-scaled
    (bilinear, align_corners=False), a newline column appended, flattened row by row, base image first.
    """
    gh, gw = layout.tile_grid
    n, t, d = features.shape
    if n == 1 and layout.tiles == (0, 0) and not layout.newline:
        return features[0]  # a plain image: its tokens as the tower gives them, prefix tokens kept by strategy "full"
    if n != layout.num_inputs or t != gh * gw:
        raise ValueError(f"image features {tuple(features.shape)} do not match the layout: {layout.num_inputs} "
                         f"inputs of {gh}x{gw} tokens")
    if layout.newline and newline is None:
        raise ValueError("the layout has image_newline tokens but the model has no image_newline parameter")
    base = features[0]  # (g*g, D)
    if layout.tiles == (0, 0):
        return torch.cat((base, newline[None].to(base)), 0) if layout.newline else base
    rows, cols = layout.tiles
    x = features[1:].view(rows, cols, gh, gw, d).permute(4, 0, 2, 1, 3).reshape(d, rows * gh, cols * gw)
    top, bottom, left, right = layout.bounds
    x = x[:, top:bottom, left:right]
    if layout.scaled:
        x = F.interpolate(x[None], list(layout.final_grid), mode="bilinear")[0]
    if layout.newline:
        x = torch.cat((x, newline[:, None, None].expand(d, x.shape[1], 1).to(x)), dim=-1)
    return torch.cat((base, x.flatten(1, 2).transpose(0, 1)), 0)


# -- video ------------------------------------------------------------------------------------------
def pooled_frame_grid(grid: Size) -> Size:
    """OneVision's 2x2 bilinear frame pooling: (h, w) -> (ceil(h/2), ceil(w/2))."""
    return math.ceil(grid[0] / 2), math.ceil(grid[1] / 2)


def pool_frames(features: torch.Tensor, grid: Size) -> torch.Tensor:
    """(F, h*w, D) -> (F, ceil(h/2)*ceil(w/2), D): HF's ``apply_pooling`` (bilinear, after the projector)."""
    f, n, d = features.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"frame features have {n} tokens, not a {h}x{w} grid")
    x = features.view(f, h, w, d).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=list(pooled_frame_grid(grid)), mode="bilinear")
    return x.permute(0, 2, 3, 1).reshape(f, -1, d)


def video_tokens(num_frames: int, frame_grid: Size, *, pool: bool, newline: bool) -> int:
    """LLM tokens of a video: frames x tokens per (pooled) frame, + one newline for the whole video."""
    h, w = pooled_frame_grid(frame_grid) if pool else frame_grid
    return num_frames * h * w + int(newline)


def pack_video(frames: torch.Tensor, grid: Size, *, pool: bool, newline: torch.Tensor | None) -> torch.Tensor:
    """(F, h*w, D) projected frame features -> (video_tokens, D): optional pooling, frames in order, newline last."""
    x = pool_frames(frames, grid) if pool else frames
    x = x.reshape(-1, x.shape[-1])
    return torch.cat((x, newline[None].to(x)), 0) if newline is not None else x
