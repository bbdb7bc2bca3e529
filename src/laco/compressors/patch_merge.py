"""LaCo's Patch Merge Layer (PML) and its no-shortcut ablation, InternVL-style pixel shuffle.

    PML(x) = Proj(space_to_channel_r(x)) + channel_average_r(space_to_channel_r(x))
           = Proj(space_to_channel_r(x)) + avg_pool_r(x)

Choices where the paper is silent (see docs/method.md):

* Projection ``proj="mlp"`` (default): ``LayerNorm(r^2 C) -> Linear(r^2 C, C) -> GELU -> Linear(C, C)``,
  the same head as InternVL's ``mlp1`` (its pixel-shuffle connector) but ending at the encoder width.
  Keeping the projection identical between ``laco`` and ``pixel_shuffle`` makes the two differ by
  the shortcut alone, which is the comparison the paper's Table 1 rests on. ``proj="linear"`` is
  the minimal ``Linear(r^2 C, C)``.
* The norm sits inside the projection branch (pre-norm, as in a transformer block), and the
  shortcut is added after it, un-normalised: the next pretrained layer expects features on the
  residual-stream scale, which only the raw average preserves.
* ``zero_init`` (default: on when the shortcut is on) zeroes the projection's last layer, so a
  freshly inserted PML computes exactly r x r average pooling: a pretrained encoder keeps working
  before any training (retrofit), and training starts from that point.
* ``avg_pool_init`` (no shortcut, ``proj="linear"`` only) sets the projection itself to r x r average
  pooling, ``W = [I ... I] / r^2``: a pixel shuffle that *starts* where LaCo starts but has no
  shortcut. With a linear projection this is LaCo reparametrised (``W' = W + A``, A the averaging
  matrix): the same function at every step of a weight-decay-free Adam run (see docs/method.md). An
  MLP projection cannot start as pooling: its LayerNorm discards each token's mean and scale.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from laco.compressors.base import Compressor, linear_flops, register_compressor
from laco.ops import Grid, channel_average, check_tokens, space_to_channel


class PatchMergeLayer(Compressor):
    """LaCo PML: r x r space-to-channel, projection back to ``dim``, plus the avg-pool shortcut."""

    def __init__(
        self,
        dim: int,
        ratio: int = 2,
        *,
        proj: Literal["mlp", "linear"] = "mlp",
        residual: bool = True,
        zero_init: bool | None = None,
        avg_pool_init: bool = False,
        pad="replicate",
    ):
        super().__init__(dim, ratio, pad=pad, residual=residual)
        wide = ratio * ratio * dim
        if proj == "mlp":
            self.proj = nn.Sequential(nn.LayerNorm(wide), nn.Linear(wide, dim), nn.GELU(), nn.Linear(dim, dim))
        elif proj == "linear":
            self.proj = nn.Sequential(nn.Linear(wide, dim))
        else:
            raise ValueError(f"unknown projection {proj!r}; choose 'mlp' or 'linear'")
        self.proj_type = proj
        self.zero_init = residual if zero_init is None else zero_init
        if self.zero_init and not residual:
            raise ValueError("zero_init without the shortcut would output zeros; use residual=True")
        if avg_pool_init and (residual or proj != "linear"):
            raise ValueError(
                "avg_pool_init needs residual=False (with the shortcut, zero_init already starts as pooling) and "
                "proj='linear' (LayerNorm and GELU cannot compute an average exactly)"
            )
        self.avg_pool_init = avg_pool_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        last = self.proj[-1]
        if self.zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        elif self.avg_pool_init:
            # offset-major channels (dy*r + dx)*C + c: output c averages input channel c of every offset
            rr = self.ratio * self.ratio
            with torch.no_grad():
                last.weight.copy_(torch.eye(self.dim).repeat(1, rr) / rr)  # (C, r*r*C)
                last.bias.zero_()

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        # the paper's form: both branches read the one space-to-channel tensor, so padding and the
        # rearrangement run once (the base class would pool x a second time for the shortcut)
        check_tokens(x, grid, dim=self.dim)
        z, new_grid = space_to_channel(x, tuple(grid), self.ratio, self.pad)  # (B, h*w, r*r*C)
        y = self.proj(z)  # (B, h*w, C)
        if self.residual:
            y = y + channel_average(z, self.ratio)  # == r x r average pooling of x
        return y, new_grid

    def compress_flops(self, grid: Grid) -> int:
        n = self.num_tokens(grid)
        wide = self.ratio * self.ratio * self.dim
        f = linear_flops(n, wide, self.dim)
        return f + (linear_flops(n, self.dim, self.dim) if self.proj_type == "mlp" else 0)

    def extra_repr(self) -> str:
        init = ", avg_pool_init=True" if self.avg_pool_init else ""
        return super().extra_repr() + f", proj={self.proj_type!r}, zero_init={self.zero_init}" + init


@register_compressor("laco")
def _laco(dim: int, ratio: int = 2, **kwargs) -> PatchMergeLayer:
    """LaCo PML: pixel shuffle + projection + average-pool shortcut (zero-initialised projection)."""
    return PatchMergeLayer(dim, ratio, **kwargs)


@register_compressor("pixel_shuffle")
def _pixel_shuffle(dim: int, ratio: int = 2, *, residual: bool = False, **kwargs) -> PatchMergeLayer:
    """InternVL-style pixel shuffle + MLP, no shortcut (LaCo minus its residual).

    ``proj="linear", avg_pool_init=True``: the same, started as r x r average pooling (LaCo's start).
    """
    return PatchMergeLayer(dim, ratio, residual=residual, **kwargs)
