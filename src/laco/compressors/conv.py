"""Pooling and convolutional compressors: average pooling, LDPv2 (MobileVLM V2), C-Abstractor (Honeybee).

All are width-preserving (C -> C) adaptations of post-encoder projectors, so that they can also
sit inside the encoder; the mapping to the LLM width is left to the MLLM projector.
"""

from __future__ import annotations

import torch
from torch import nn

from laco.compressors.base import Compressor, linear_flops, register_compressor
from laco.ops import Grid, map_to_tokens, pool_tokens, tokens_to_map


@register_compressor("avg_pool")
class AvgPool(Compressor):
    """r x r average pooling of the token grid (Gemma3-style); no parameters."""

    def __init__(self, dim: int, ratio: int = 2, *, pad="replicate", residual: bool = False):
        if residual:
            raise ValueError("avg_pool is the shortcut itself; residual=True would only double it")
        super().__init__(dim, ratio, pad=pad)

    def compress(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        return pool_tokens(x, grid, self.ratio, self.pad)

    def compress_flops(self, grid: Grid) -> int:
        return grid[0] * grid[1] * self.dim


@register_compressor("ldpv2")
class LDPv2(Compressor):
    """MobileVLM V2's LDPv2: point-wise MLP, r x r average pooling, then a depth-wise 3x3 conv (PEG) with skip.

    (B, H*W, C) -> Linear(C, C) -> GELU -> Linear(C, C) -> avg-pool r -> x + DWConv3x3(x).
    The original pools to a fixed 12 x 12; pooling by r keeps the same 4x ratio at any resolution.
    """

    def __init__(self, dim: int, ratio: int = 2, *, pad="replicate", residual: bool = False):
        super().__init__(dim, ratio, pad=pad, residual=residual)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.peg = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def compress(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        y, new_grid = pool_tokens(self.mlp(x), grid, self.ratio, self.pad)  # (B, h*w, C)
        y = y + map_to_tokens(self.peg(tokens_to_map(y, new_grid)))[0]
        return y, new_grid

    def compress_flops(self, grid: Grid) -> int:
        n, m = grid[0] * grid[1], self.num_tokens(grid)
        return 2 * linear_flops(n, self.dim, self.dim) + n * self.dim + 2 * 9 * m * self.dim


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, H, W) map (eps 1e-5: timm's ``ConvNormAct`` turns ``LayerNorm2d``
    into ``LayerNormAct2d``, whose default eps is 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RegBlock(nn.Module):
    """The RegNet bottleneck Honeybee uses (timm ``RegStage`` block with ``act_layer=SiLU, norm_layer=LayerNorm2d``).

    SiLU(x + LN(1x1(SE(DW3x3(1x1(x)))))): 1x1 -> depth-wise 3x3 -> squeeze-excite -> 1x1, the skip, and the
    final activation after the sum, as in timm's ``Bottleneck`` (``linear_out=False``) and ResNet.
    """

    def __init__(self, dim: int, se_ratio: float = 0.25):
        super().__init__()
        se = max(1, round(dim * se_ratio))
        self.body = nn.Sequential(
            nn.Conv2d(dim, dim, 1, bias=False), LayerNorm2d(dim), nn.SiLU(),
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), LayerNorm2d(dim), nn.SiLU(),
        )
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, se, 1), nn.SiLU(), nn.Conv2d(se, dim, 1), nn.Sigmoid())
        self.out = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), LayerNorm2d(dim))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.act(x + self.out(y * self.se(y)))

    def flops(self, h: int, w: int) -> int:
        c, n = self.se[1].in_channels, h * w
        se = self.se[1].out_channels
        return 2 * (2 * n * c * c + 9 * n * c + 2 * c * se)


@register_compressor("c_abstractor")
class CAbstractor(Compressor):
    """Honeybee's C-Abstractor: RegBlocks, r x r average pooling, RegBlocks, MLP read-out (C -> C).

    Honeybee adds a learned positional embedding for a fixed grid; it is omitted here because the
    encoder has already added its own position embeddings and the grid varies with resolution.
    """

    def __init__(self, dim: int, ratio: int = 2, *, depth: int = 3, pad="replicate", residual: bool = False):
        super().__init__(dim, ratio, pad=pad, residual=residual)
        self.stage1 = nn.Sequential(*[RegBlock(dim) for _ in range(depth)])
        self.stage2 = nn.Sequential(*[RegBlock(dim) for _ in range(depth)])
        self.readout = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def compress(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        y = self.stage1(tokens_to_map(x, grid))  # (B, C, H, W)
        y, new_grid = pool_tokens(map_to_tokens(y)[0], grid, self.ratio, self.pad)  # (B, h*w, C)
        y = self.stage2(tokens_to_map(y, new_grid))
        return self.readout(map_to_tokens(y)[0]), new_grid

    def compress_flops(self, grid: Grid) -> int:
        (h, w), (oh, ow) = grid, self.output_grid(grid)
        f = sum(b.flops(h, w) for b in self.stage1) + sum(b.flops(oh, ow) for b in self.stage2)
        return f + h * w * self.dim + 2 * linear_flops(oh * ow, self.dim, self.dim)
