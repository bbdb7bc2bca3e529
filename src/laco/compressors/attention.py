"""Attention-based compressors: TokenPacker (region-to-point cross-attention) and ToMe (bipartite merging)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from laco.compressors.base import Compressor, linear_flops, register_compressor
from laco.ops import Grid, pool_tokens, space_to_channel


@register_compressor("tokenpacker")
class TokenPacker(Compressor):
    """TokenPacker (Li et al. 2024): each low-resolution point query attends to the r x r region it came from.

    queries  q = LN(W_q pool_r(x))                    (B, h*w, C)   -- pool_r == bilinear /r for r = 2
    keys/val k, v = LN(MLP(x)) regrouped per region   (B, h*w, r*r, C)
    out      MLP(MultiHeadAttn(q, k, v))              (B, h*w, C)

    As in the original (CircleRadon/TokenPacker): no residual from the query to the output, heads of
    width 128 (``num_heads = dim // 128``, at least 1), LayerNorm eps 1e-6, and every linear layer
    trunc-normal(0.02) with zero bias except the attention's joint q/k/v input projection, which keeps
    ``nn.MultiheadAttention``'s Xavier-uniform init. Differences that remain are listed in
    docs/method.md (single-level features, C -> C width, r x r average-pooled queries for r > 2).

    ``query_residual=True, num_heads=dim // 64, init="torch", norm_eps=1e-5`` is laco v0.1's variant,
    registered as ``tokenpacker_v1`` (the ``tokenpacker@1/4`` rows of results committed before v2).
    """

    def __init__(
        self,
        dim: int,
        ratio: int = 2,
        *,
        num_heads: int | None = None,
        query_residual: bool = False,
        init: Literal["trunc_normal", "torch"] = "trunc_normal",
        norm_eps: float = 1e-6,
        pad="replicate",
        residual: bool = False,
    ):
        super().__init__(dim, ratio, pad=pad, residual=residual)
        self.num_heads = num_heads or max(1, dim // 128)
        if dim % self.num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {self.num_heads}")
        if init not in ("trunc_normal", "torch"):
            raise ValueError(f"unknown init {init!r}; choose 'trunc_normal' (the original's) or 'torch'")
        self.query_residual = query_residual
        self.init = init
        self.q_proj = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim, eps=norm_eps))
        self.k_proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim, eps=norm_eps))
        self.v_proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim, eps=norm_eps))
        self.attn_in = nn.Linear(dim, 3 * dim)  # == nn.MultiheadAttention's in_proj (q, k, v stacked)
        self.attn_out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        if init == "trunc_normal":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's ``_init_weights``: trunc-normal(0.02) linears, zero biases; MHA's in-projection Xavier."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.attn_in.weight)  # nn.MultiheadAttention._reset_parameters

    def compress(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        b, c, rr, nh = x.shape[0], self.dim, self.ratio**2, self.num_heads
        q, new_grid = pool_tokens(x, grid, self.ratio, self.pad)
        q = self.q_proj(q)  # (B, n, C)
        n = q.shape[1]
        k = space_to_channel(self.k_proj(x), grid, self.ratio, self.pad)[0].view(b, n, rr, c)  # (B, n, r*r, C)
        v = space_to_channel(self.v_proj(x), grid, self.ratio, self.pad)[0].view(b, n, rr, c)
        wq, wk, wv = self.attn_in.weight.chunk(3)
        bq, bk, bv = self.attn_in.bias.chunk(3)
        # one query per region: fold regions into the batch -> (B*n, heads, len, C/heads)
        qh = F.linear(q, wq, bq).reshape(b * n, 1, nh, c // nh).transpose(1, 2)
        kh = F.linear(k, wk, bk).reshape(b * n, rr, nh, c // nh).transpose(1, 2)
        vh = F.linear(v, wv, bv).reshape(b * n, rr, nh, c // nh).transpose(1, 2)
        o = F.scaled_dot_product_attention(qh, kh, vh)  # (B*n, heads, 1, C/heads)
        o = self.attn_out(o.transpose(1, 2).reshape(b, n, c))
        return self.mlp(q + o if self.query_residual else o), new_grid

    def compress_flops(self, grid: Grid) -> int:
        n, m, c = grid[0] * grid[1], self.num_tokens(grid), self.dim
        kv = 2 * (2 * linear_flops(n, c, c)) + 2 * linear_flops(n, c, c)  # two MLPs + in-proj of k, v
        q = 2 * linear_flops(m, c, c)  # q_proj + in-proj of q
        attn = 2 * 2 * n * c  # scores and weighted sum over r*r keys per query
        return kv + q + attn + n * c + linear_flops(m, c, c) + 2 * linear_flops(m, c, c)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_heads={self.num_heads}, query_residual={self.query_residual}, init={self.init!r}"


@register_compressor("tokenpacker_v1")
def _tokenpacker_v1(dim: int, ratio: int = 2, **kwargs) -> TokenPacker:
    """laco v0.1's TokenPacker: ``mlp(q + attn)``, 64-wide heads, PyTorch default init, LayerNorm eps 1e-5."""
    v1 = dict(query_residual=True, num_heads=max(1, dim // 64), init="torch", norm_eps=1e-5)
    return TokenPacker(dim, ratio, **{**v1, **kwargs})


def _bipartite_merge(x: torch.Tensor, size: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One ToMe round: merge the ``r`` most similar (A -> B) pairs, A = even, B = odd tokens.

    ``x`` holds size-weighted sums (B, N, C); ``size`` token sizes (B, N, 1). Returns N - r tokens.
    """
    metric = F.normalize(x, dim=-1)  # cosine of sums == cosine of means (sizes are positive scalars)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (B, Na, Nb) cosine similarity
    best, best_idx = scores.max(dim=-1)  # (B, Na)
    order = best.argsort(dim=-1, descending=True)[..., None]  # (B, Na, 1)
    unm_idx, src_idx = order[:, r:], order[:, :r]
    dst_idx = best_idx[..., None].gather(1, src_idx)  # (B, r, 1)

    def merge(t: torch.Tensor) -> torch.Tensor:
        ta, tb = t[:, ::2], t[:, 1::2]
        w = t.shape[-1]
        unm = ta.gather(1, unm_idx.expand(-1, -1, w))
        src = ta.gather(1, src_idx.expand(-1, -1, w))
        tb = tb.scatter_reduce(1, dst_idx.expand(-1, -1, w), src, reduce="sum")
        return torch.cat([unm, tb], dim=1)

    return merge(x), merge(size)


@register_compressor("tome")
class ToMe(Compressor):
    """Token Merging (bipartite soft matching) down to the same token count as an r x r merge.

    ToMe merges at most half of the tokens per round, so a 4x reduction takes two rounds at this
    point of the encoder. Similarity is the cosine of the token features (the original uses the
    attention keys, which an SDPA layer does not expose); merged tokens are size-weighted means.
    No parameters, and no proportional attention (it needs attention logits that fused SDPA
    hides), so the layers after it run unchanged.

    The output is a set, not a grid: ``output_grid`` reports the nominal (h, w) whose product is
    the token count, and ``residual=True`` is refused.
    """

    grid_output = False

    def __init__(self, dim: int, ratio: int = 2, *, pad="replicate", residual: bool = False):
        super().__init__(dim, ratio, pad=pad, residual=residual)

    def compress(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        target = self.num_tokens(grid)
        size = torch.ones_like(x[..., :1])  # (B, N, 1); x holds size-weighted sums from here on
        while x.shape[1] > target:
            x, size = _bipartite_merge(x, size, min(x.shape[1] - target, x.shape[1] // 2))
        return x / size, self.output_grid(grid)

    def compress_flops(self, grid: Grid) -> int:
        n, f = grid[0] * grid[1], 0
        target = self.num_tokens(grid)
        while n > target:
            f += 2 * math.ceil(n / 2) * (n // 2) * self.dim  # A x B similarity matmul
            n -= min(n - target, n // 2)
        return f
