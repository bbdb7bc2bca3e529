"""The compressor interface and registry.

Every compressor maps patch tokens of one grid to fewer tokens of the same width:

    forward(x: (B, H*W, C), grid=(H, W)) -> (y: (B, h*w, C), (h, w))

Width is preserved (C -> C) so the same module can sit between two pretrained encoder layers
("inside", LaCo) or after the encoder ("post", LaCo@1); mapping to the LLM width is the
projector's job. Prefix tokens (CLS, registers) never reach a compressor: the encoder wrapper
splits them off and re-joins them.

``residual=True`` adds the parameter-free shortcut ``pool_tokens(x, grid, r)`` (r x r average
pooling, which is exactly LaCo's "space-to-channel + channel averaging") to the output of any
compressor whose output is a grid -- the ablation the LaCo reviewers asked for.

FLOP convention (here and in ``laco.flops``): 2 x multiply-accumulates of matmuls and
convolutions; norms, activations and softmax are not counted; pooling counts one FLOP per
input element.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from laco.ops import Grid, PadPolicy, check_ratio, check_tokens, merged_grid, pool_tokens

_REGISTRY: dict[str, Callable[..., "Compressor"]] = {}


class Compressor(nn.Module):
    """Base class: subclasses implement ``compress`` and ``compress_flops``.

    A subclass whose own work already contains the shortcut's (the PML: the average is a view of
    its space-to-channel tensor) overrides ``forward`` instead of ``compress``.
    """

    #: whether output token i is cell i of the (h, w) grid in raster order. False for ToMe, whose output is an
    #: unordered set: the shortcut, a further merge and any read-out of grid positions (compare's ``readout``
    #: scenario averages quadrants) are undefined for it and must be refused or reported as not applicable.
    grid_output: bool = True

    def __init__(self, dim: int, ratio: int = 2, *, pad: PadPolicy = "replicate", residual: bool = False):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.ratio = check_ratio(ratio)
        merged_grid((ratio, ratio), ratio, pad)  # validates the pad policy early
        self.pad = pad
        if residual and not self.grid_output:
            raise ValueError(f"{type(self).__name__} does not output a grid; residual=True is undefined for it")
        self.residual = residual

    # -- shape bookkeeping -------------------------------------------------------------------
    def output_grid(self, grid: Grid) -> Grid:
        return merged_grid(grid, self.ratio, self.pad)

    def num_tokens(self, grid: Grid) -> int:
        h, w = self.output_grid(grid)
        return h * w

    # -- computation -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        check_tokens(x, grid, dim=self.dim)
        y, new_grid = self.compress(x, tuple(grid))
        if self.residual:
            y = y + pool_tokens(x, grid, self.ratio, self.pad)[0]
        return y, new_grid

    def compress(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        raise NotImplementedError

    def flops(self, grid: Grid) -> int:
        """Analytic FLOPs of one forward for one image with patch grid ``grid``."""
        shortcut = grid[0] * grid[1] * self.dim if self.residual else 0
        return self.compress_flops(tuple(grid)) + shortcut

    def compress_flops(self, grid: Grid) -> int:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ratio={self.ratio}, pad={self.pad!r}, residual={self.residual}"


def register_compressor(name: str) -> Callable:
    """Class decorator: ``@register_compressor("laco")`` makes it available to ``create_compressor``."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"compressor {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_compressors() -> list[str]:
    return sorted(_REGISTRY)


def create_compressor(name: str, dim: int, ratio: int = 2, **kwargs) -> Compressor:
    """Build a registered compressor: ``create_compressor("laco", 1152, ratio=2, proj="linear")``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; known: {', '.join(list_compressors())}")
    return _REGISTRY[name](dim, ratio, **kwargs)


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out
