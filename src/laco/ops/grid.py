"""Token-grid operations on (B, N, C) tensors with an explicit (H, W) grid.

Every function takes the grid with the tokens: a flat sequence of N = H * W patch tokens carries
no shape of its own, and guessing it (e.g. ``isqrt(N)``) is where non-square inputs go wrong.

Channel layout of space-to-channel (the one documented order used everywhere in laco)
-------------------------------------------------------------------------------------
An r x r block of tokens at block position (i, j) becomes one token with r*r*C channels. The
channel index of input token (r*i + dy, r*j + dx), channel c, is::

    (dy * r + dx) * C + c            # "offset-major", LAYOUT = "offset_major"

This is the order of InternVL ``pixel_shuffle`` (ps_version v2), Hugging Face
Idefics3/SmolVLM and the Qwen2-VL patch merger, so their weights port without permutation.
``torch.nn.functional.pixel_unshuffle`` uses ``c * r*r + dy * r + dx`` ("channel_major");
timm's Swin ``PatchMerging`` uses ``(dx * r + dy) * C + c`` ("column_major"). ``convert_layout``
converts between the three.

Grids not divisible by r
------------------------
``pad_grid`` makes a grid divisible by r, by one of the policies in ``PAD_POLICIES``:

* ``"replicate"`` (default): repeat the last row/column. A border block then averages real
  tokens only, so the average-pool shortcut stays on the features' own scale (zero padding
  would shrink border tokens by up to 4x, an out-of-distribution input for the next layer).
  SigLIP-so400m-384's 27 x 27 grid becomes 28 x 28 -> 14 x 14 = 196 tokens at r = 2.
* ``"zero"``: pad with zeros (Swin's choice).
* ``"crop"``: drop the trailing rows/columns (27 x 27 -> 26 x 26 -> 169 tokens).
* ``"error"``: raise; for users who want exact grids only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Grid = tuple[int, int]
PadPolicy = Literal["replicate", "zero", "crop", "error"]
PAD_POLICIES: tuple[str, ...] = ("replicate", "zero", "crop", "error")
LAYOUTS: tuple[str, ...] = ("offset_major", "channel_major", "column_major")
LAYOUT = "offset_major"


def check_tokens(x: torch.Tensor, grid: Grid, *, dim: int | None = None, name: str = "x") -> None:
    """Raise a clear ValueError unless ``x`` is (B, H*W, C) for ``grid`` (and C == dim if given)."""
    if x.ndim != 3:
        raise ValueError(f"{name} must be (batch, tokens, channels); got shape {tuple(x.shape)}")
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    if x.shape[1] != h * w:
        raise ValueError(
            f"{name} has {x.shape[1]} tokens but grid {h}x{w} needs {h * w}; "
            "pass the patch grid of these tokens (prefix tokens such as CLS must be split off first)"
        )
    if dim is not None and x.shape[2] != dim:
        raise ValueError(f"{name} has width {x.shape[2]} but this module was built for width {dim}")


def check_ratio(ratio: int) -> int:
    if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio < 2:
        raise ValueError(f"ratio must be an integer >= 2 (r x r tokens merge into one), got {ratio!r}")
    return ratio


def padded_grid(grid: Grid, ratio: int, pad: PadPolicy = "replicate") -> Grid:
    """The grid after ``pad_grid``: a multiple of ``ratio`` on both sides."""
    h, w = grid
    if pad not in PAD_POLICIES:
        raise ValueError(f"unknown pad policy {pad!r}; choose one of {PAD_POLICIES}")
    if h % ratio == 0 and w % ratio == 0:
        return grid
    if pad == "error":
        raise ValueError(
            f"grid {h}x{w} is not divisible by ratio {ratio}; use pad='replicate', 'zero' or 'crop'"
        )
    if pad == "crop":
        if h < ratio or w < ratio:
            raise ValueError(f"grid {h}x{w} is smaller than ratio {ratio}; cannot crop")
        return (h // ratio * ratio, w // ratio * ratio)
    return (math.ceil(h / ratio) * ratio, math.ceil(w / ratio) * ratio)


def merged_grid(grid: Grid, ratio: int, pad: PadPolicy = "replicate") -> Grid:
    """Grid after an r x r merge (with padding/cropping applied first)."""
    h, w = padded_grid(grid, check_ratio(ratio), pad)
    return (h // ratio, w // ratio)


def pad_grid(x: torch.Tensor, grid: Grid, ratio: int, pad: PadPolicy = "replicate") -> tuple[torch.Tensor, Grid]:
    """Make the grid divisible by ``ratio``. (B, H*W, C) -> (B, H'*W', C), returns the new grid."""
    check_tokens(x, grid)
    new = padded_grid(grid, ratio, pad)
    if new == tuple(grid):
        return x, new
    (h, w), (nh, nw) = grid, new
    b, _, c = x.shape
    g = x.view(b, h, w, c)
    if pad == "crop":
        g = g[:, :nh, :nw]
    else:
        # F.pad pads trailing dims first: (C: 0,0), (W: 0, nw-w), (H: 0, nh-h). Replicate needs NCHW.
        g = g.permute(0, 3, 1, 2)  # (B, C, H, W)
        mode = "replicate" if pad == "replicate" else "constant"
        g = F.pad(g, (0, nw - w, 0, nh - h), mode=mode).permute(0, 2, 3, 1)  # (B, H', W', C)
    return g.reshape(b, nh * nw, c), new


def space_to_channel(
    x: torch.Tensor, grid: Grid, ratio: int = 2, pad: PadPolicy = "replicate"
) -> tuple[torch.Tensor, Grid]:
    """Merge each r x r block of tokens into one token, offset-major channel order.

    (B, H*W, C) -> (B, (H/r)*(W/r), r*r*C), channel index ``(dy*r + dx)*C + c``.
    Returns the merged tokens and the merged grid (H/r, W/r) (after ``pad``).
    """
    r = check_ratio(ratio)
    x, (h, w) = pad_grid(x, grid, r, pad)
    b, _, c = x.shape
    g = x.reshape(b, h // r, r, w // r, r, c)  # (B, H/r, dy, W/r, dx, C)
    g = g.permute(0, 1, 3, 2, 4, 5)  # (B, H/r, W/r, dy, dx, C)
    return g.reshape(b, (h // r) * (w // r), r * r * c), (h // r, w // r)


def channel_to_space(z: torch.Tensor, grid: Grid, ratio: int = 2) -> tuple[torch.Tensor, Grid]:
    """Exact inverse of ``space_to_channel`` (without padding). (B, h*w, r*r*C) -> (B, (h*r)*(w*r), C).

    ``grid`` is the merged grid (h, w); returns the tokens and the full grid (h*r, w*r).
    """
    r = check_ratio(ratio)
    check_tokens(z, grid)
    b, _, rrc = z.shape
    if rrc % (r * r):
        raise ValueError(f"width {rrc} is not a multiple of r*r = {r * r}")
    c = rrc // (r * r)
    h, w = grid
    g = z.reshape(b, h, w, r, r, c).permute(0, 1, 3, 2, 4, 5)  # (B, h, dy, w, dx, C)
    return g.reshape(b, h * r * w * r, c), (h * r, w * r)


def channel_average(z: torch.Tensor, ratio: int) -> torch.Tensor:
    """LaCo's channel averaging: mean of the r*r offset groups of merged tokens. (B, n, r*r*C) -> (B, n, C).

    On ``space_to_channel`` output this is r x r average pooling of the grid (see ``pool_tokens``).
    """
    b, n, rrc = z.shape
    return z.view(b, n, ratio * ratio, rrc // (ratio * ratio)).mean(dim=2)


def pool_tokens(x: torch.Tensor, grid: Grid, ratio: int = 2, pad: PadPolicy = "replicate") -> tuple[torch.Tensor, Grid]:
    """r x r average pooling of the token grid. (B, H*W, C) -> (B, (H/r)*(W/r), C).

    Computed as ``channel_average(space_to_channel(x))`` -- LaCo's parameter-free shortcut.
    Tests prove it equals ``F.avg_pool2d``.
    """
    z, new = space_to_channel(x, grid, ratio, pad)
    return channel_average(z, ratio), new


def _layout_perm(c: int, r: int, src: str, dst: str) -> torch.Tensor:
    """Index vector p with ``z_dst = z_src[..., p]`` for r*r*C channels."""
    for name in (src, dst):
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; choose one of {LAYOUTS}")

    def index(layout: str) -> torch.Tensor:
        # index[dy, dx, ch] = channel position of (dy, dx, ch) in `layout`
        dy = torch.arange(r).view(r, 1, 1)
        dx = torch.arange(r).view(1, r, 1)
        ch = torch.arange(c).view(1, 1, c)
        if layout == "offset_major":
            return (dy * r + dx) * c + ch
        if layout == "channel_major":
            return ch * r * r + dy * r + dx
        return (dx * r + dy) * c + ch  # column_major

    perm = torch.empty(r * r * c, dtype=torch.long)
    perm[index(dst).flatten()] = index(src).flatten()
    return perm


def convert_layout(z: torch.Tensor, ratio: int, src: str, dst: str) -> torch.Tensor:
    """Reorder the last axis (r*r*C channels) of merged tokens from layout ``src`` to ``dst``."""
    r = check_ratio(ratio)
    if z.shape[-1] % (r * r):
        raise ValueError(f"width {z.shape[-1]} is not a multiple of r*r = {r * r}")
    return z[..., _layout_perm(z.shape[-1] // (r * r), r, src, dst).to(z.device)]


def tokens_to_map(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) for convolution-based compressors."""
    check_tokens(x, grid)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


def map_to_tokens(m: torch.Tensor) -> tuple[torch.Tensor, Grid]:
    """(B, C, H, W) -> (B, H*W, C) and the grid."""
    b, c, h, w = m.shape
    return m.flatten(2).transpose(1, 2), (h, w)


def split_prefix(x: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split (B, P+N, C) into prefix tokens (CLS, registers) (B, P, C) and patch tokens (B, N, C)."""
    return x[:, :num_prefix], x[:, num_prefix:]


def join_prefix(prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``split_prefix``: (B, P, C) + (B, N', C) -> (B, P+N', C)."""
    return torch.cat([prefix, x], dim=1) if prefix.shape[1] else x
