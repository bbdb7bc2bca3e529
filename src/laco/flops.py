"""Analytic parameter and FLOP counts (nanoGPT-style: from shapes, no tracing).

Convention: FLOPs = 2 x multiply-accumulates of matmuls and convolutions (attention scores and
the attention-weighted sum included); norms, activations, softmax and residual adds are not
counted. All counts are for one image (one sample) of batch 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from laco.encoders.compress import CompressedVisionEncoder
from laco.ops import Grid


def vit_layer_flops(tokens: int, dim: int, mlp_dim: int, mlp_matrices: int = 2) -> int:
    """One pre-norm transformer block on ``tokens`` tokens: QKV + out proj, attention, MLP."""
    proj = 2 * tokens * dim * (4 * dim)  # q, k, v, o
    attn = 2 * 2 * tokens * tokens * dim  # Q K^T and A V
    mlp = 2 * tokens * dim * mlp_dim * mlp_matrices
    return proj + attn + mlp


def decoder_layer_flops(tokens: int, dim: int, mlp_dim: int, num_heads: int, num_kv_heads: int,
                        context: int | None = None) -> int:
    """One LLM decoder layer (GQA attention, SwiGLU MLP) for ``tokens`` new tokens over ``context`` keys.

    Prefill: ``context = tokens`` (causal attention counted at full square, as kernels compute it
    in blocks; halve it for an ideal causal kernel). Decoding one token: ``tokens = 1``.
    """
    context = tokens if context is None else context
    kv_dim = dim * num_kv_heads // num_heads
    proj = 2 * tokens * dim * (2 * dim + 2 * kv_dim)  # q, o full width; k, v at kv width
    attn = 2 * 2 * tokens * context * dim
    mlp = 2 * tokens * dim * mlp_dim * 3
    return proj + attn + mlp


def num_params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


@dataclass
class EncoderCost:
    """Per-part tokens, parameters and FLOPs of a (compressed) encoder for one image."""

    input_grid: Grid
    output_grid: Grid
    tokens_in: int
    tokens_out: int
    params: dict[str, int] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    baseline_flops: int = 0  # the same encoder, uncompressed, same layers run

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def flop_ratio(self) -> float:
        return self.total_flops / self.baseline_flops

    def to_dict(self) -> dict:
        return {**asdict(self), "total_flops": self.total_flops, "total_params": self.total_params,
                "flop_ratio": self.flop_ratio}


def encoder_cost(encoder: CompressedVisionEncoder, image_size: int | tuple[int, int] | None = None) -> EncoderCost:
    """Tokens, params and FLOPs per part: ``embed``, ``layers[a:b]`` runs, each ``merge@k``, ``final_norm``."""
    a = encoder.adapter
    grid = a.grid_for_image_size(image_size)
    prefix = encoder.num_prefix_tokens
    n_in = grid[0] * grid[1]
    layer = lambda n: vit_layer_flops(n + prefix, a.dim, a.mlp_dim, a.mlp_matrices)  # noqa: E731
    params = {"embed": a.embed_params()}
    flops = {"embed": 2 * n_in * a.dim * a.patch_size**2 * a.config.num_channels}
    cur = grid
    for start, stop, k in encoder.segments():  # the forward's own loop, as data
        if stop > start:
            name = f"layers[{start}:{stop}]"
            params[name] = sum(num_params(a.layers[i]) for i in range(start, stop))
            flops[name] = (stop - start) * layer(cur[0] * cur[1])
        if k is not None:
            comp = encoder.compressors[str(k)]
            params[f"merge@{k}"] = num_params(comp)
            flops[f"merge@{k}"] = comp.flops(cur)
            cur = comp.output_grid(cur)
    if encoder.apply_final_norm:
        params["final_norm"] = num_params(a.final_norm)
    baseline = flops["embed"] + encoder.num_layers * layer(n_in)
    return EncoderCost(grid, cur, n_in, cur[0] * cur[1], params, flops, baseline)
