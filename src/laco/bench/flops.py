"""The analytic side of ``laco bench``: FLOPs per measured part, for inference and for a training step.

Forward counts reuse the core (``laco.flops``: ``vit_layer_flops``, ``decoder_layer_flops``, each
compressor's ``flops``), with the same convention: 2 x multiply-accumulates of matmuls and
convolutions; norms, activations, softmax, residual adds and the optimizer step are not counted.

Each part's forward is split into ``linear`` (matmuls with a weight) and ``attn`` (activation x
activation matmuls: Q K^T and A V). A training step adds the backward, part by part, in forward order:

* weight gradient ``dW = linear``            if the part's parameters train;
* input gradient  ``dX = linear - input_linear`` if the part trains, ``+ input_linear`` if anything
  before it trains (``input_linear`` is the matmul that reads the part's input: its dX is wasted
  when nothing upstream needs it; pixels never need one);
* attention       ``2 x attn``               if gradient passes through the part at all.

So a frozen part behind a trainable one costs about 1x its forward in the backward, a trainable part
behind a trainable one 2x, and a frozen part with nothing trainable before it 0x. This matters for
LaCo: in stage 1 (train compressor + projector) an inside merge must back-propagate through the
encoder layers after it, which external compression ("post") never does.
Approximation: a compressor's whole forward counts as its ``input_linear`` (the PML's second, C x C
matmul is ~1/5 of its ~0.5% share of the encoder).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from torch import nn

from laco.encoders.compress import CompressedVisionEncoder
from laco.flops import decoder_layer_flops, vit_layer_flops
from laco.model import anyres
from laco.model.modeling import PARAMETER_GROUPS

#: which parameter groups train in each stage (names: the model's ``PARAMETER_GROUPS``); stage 2 trains all
STAGES: dict[str, frozenset[str]] = {
    "stage1": frozenset({"compressor", "projector"}),
    "stage2": frozenset(PARAMETER_GROUPS),
}


def attention_flops(tokens: int, context: int, dim: int) -> int:
    """Q K^T and A V for ``tokens`` queries over ``context`` keys (the core's convention)."""
    return 2 * 2 * tokens * context * dim


@dataclass(frozen=True)
class Part:
    """One part of the MLLM's forward for the whole batch."""

    name: str
    group: str  # parameter group: "encoder", "compressor", "projector", "llm"
    linear: int  # forward FLOPs of matmuls with a weight
    attn: int = 0  # forward FLOPs of activation x activation matmuls
    input_linear: int = 0  # part of `linear` that reads the part's input

    @property
    def forward(self) -> int:
        return self.linear + self.attn

    def backward(self, trainable: bool, grad_in: bool) -> int:
        """Backward FLOPs given whether this part trains and whether anything before it trains."""
        dw = self.linear if trainable else 0
        dx = (self.linear - self.input_linear if trainable or grad_in else 0) + (self.input_linear if grad_in else 0)
        dattn = 2 * self.attn if trainable or grad_in else 0
        return dw + dx + dattn

    def scaled(self, n: int, name: str | None = None) -> "Part":
        return Part(name or self.name, self.group, n * self.linear, n * self.attn, n * self.input_linear)


def encoder_parts(encoder: CompressedVisionEncoder, image_size: int | tuple[int, int] | None = None) -> list[Part]:
    """Per-image parts of a (compressed) encoder, in forward order; totals equal ``laco.encoder_cost``."""
    a = encoder.adapter
    grid = a.grid_for_image_size(image_size)
    prefix = encoder.num_prefix_tokens
    embed = 2 * grid[0] * grid[1] * a.dim * a.patch_size**2 * a.config.num_channels  # the patchify conv
    parts = [Part("encoder.embed", "encoder", embed, 0, input_linear=embed)]
    cur = grid
    for start, stop, k in encoder.segments():  # the forward's own loop, as data
        if stop > start:
            t = cur[0] * cur[1] + prefix  # tokens every layer of this run sees
            total = (stop - start) * vit_layer_flops(t, a.dim, a.mlp_dim, a.mlp_matrices)
            attn = (stop - start) * attention_flops(t, t, a.dim)
            parts.append(Part(f"encoder.layers[{start}:{stop}]", "encoder", total - attn, attn))
        if k is not None:
            comp = encoder.compressors[str(k)]
            f = comp.flops(cur)
            parts.append(Part(f"compressor.merge@{k}", "compressor", f, 0, input_linear=f))
            cur = comp.output_grid(cur)
    return parts


def projector_part(projector: nn.Module, tokens: int) -> Part:
    """A token-wise projector (Linear layers applied to every token): sum of its Linear matmuls."""
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"projector {type(projector).__name__} has no nn.Linear; its FLOPs cannot be counted here")
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in projector.modules()):
        raise TypeError(f"projector {type(projector).__name__} has convolutions; only token-wise MLPs are counted")
    flops = [2 * tokens * m.in_features * m.out_features for m in linears]
    return Part("projector", "projector", sum(flops), 0, input_linear=flops[0])


def llm_parts(config, tokens: int, logits_positions: int, context: int | None = None) -> list[Part]:
    """Decoder layers on ``tokens`` new tokens over ``context`` keys (default: prefill) and the LM head."""
    context = tokens if context is None else context
    d = config.hidden_size
    total = config.num_hidden_layers * decoder_layer_flops(
        tokens, d, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, context)
    attn = config.num_hidden_layers * attention_flops(tokens, context, d)
    head = 2 * logits_positions * d * config.vocab_size
    return [Part("llm.layers", "llm", total - attn, attn), Part("llm.lm_head", "llm", head, 0, input_linear=head)]


def training_flops(parts: Iterable[Part], stage: str) -> dict[str, int]:
    """Forward, backward and total FLOPs of one training step over ``parts`` (in forward order)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    trains = STAGES[stage]
    fwd = bwd = 0
    grad_in = False
    for p in parts:
        t = p.group in trains
        fwd += p.forward
        bwd += p.backward(t, grad_in)
        grad_in = grad_in or t
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


@dataclass
class Workload:
    """Shapes of one benchmark batch."""

    batch_size: int = 1
    images_per_sample: int = 1
    text_tokens: int = 64  # prompt (inference) / prompt + answer (training) tokens per sample
    new_tokens: int = 16  # generated tokens per sample
    # LLaVA-OneVision AnyRes: every image's (height, width), tiled as OneVision (base image + tiles of the
    # encoder's input size, unpadded, newlines; a sample with several images: each untiled); None: one S x S input
    image_size: tuple[int, int] | None = None
    max_tiles: int = 9  # AnyRes: anyres_max_N token budget, in tiles
    max_grid: int = 6  # AnyRes: pinpoints up to N x N tiles

    def __post_init__(self):
        for name in ("batch_size", "images_per_sample", "text_tokens", "new_tokens", "max_tiles", "max_grid"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.image_size is not None:
            if len(self.image_size) != 2 or not all(isinstance(v, int) and v >= 1 for v in self.image_size):
                raise ValueError(f"image_size must be (height, width) positive integers, got {self.image_size!r}")
            self.image_size = tuple(self.image_size)

    @property
    def num_images(self) -> int:
        return self.batch_size * self.images_per_sample

    def sequence_length(self, image_tokens: int) -> int:
        """LLM tokens per sample: every image's tokens plus the text."""
        return self.images_per_sample * image_tokens + self.text_tokens


def predict(encoder: CompressedVisionEncoder, projector: nn.Module, llm_config, work: Workload,
            image_size: int | tuple[int, int] | None = None, include_prefix: bool = False) -> dict:
    """Predicted FLOPs of every measured part of one method (whole batch).

    ``include_prefix``: whether prefix tokens (CLS) reach the LLM ("full" feature selection).
    Keys: encoder, compressor, projector, encode, prefill, encode_prefill, decode (``new_tokens`` steps),
    decode_per_token, generate, train_stage1, train_stage2 (each a total), plus ``parts`` (forward per part) and
    ``train_split`` (forward/backward per stage); per image: ``image_tokens`` (LLM), ``encoder_inputs``, ``tiles``.
    With ``work.image_size`` every image is laid out as LLaVA-OneVision's AnyRes (``anyres.encoder_image_layout``,
    as ``laco info --image-size``): the encoder and projector run on every input, the LLM on the packed tokens.
    """
    grid = encoder.adapter.grid_for_image_size(image_size)
    tower_tokens = encoder.num_output_tokens(grid, include_prefix=include_prefix)  # per encoder input
    inputs, image_tokens, tiles = 1, tower_tokens, (0, 0)  # encoder inputs, LLM tokens, AnyRes tiles per image
    if work.image_size is not None:  # AnyRes: the same layout as `laco info --image-size` and the model
        if include_prefix:
            raise ValueError("AnyRes (image_size) needs feature selection 'default': prefix tokens have no grid place")
        lay = anyres.encoder_image_layout(encoder, work.image_size, max_tiles=work.max_tiles, max_grid=work.max_grid,
                                          tiled=work.images_per_sample == 1)
        inputs, image_tokens, tiles = lay.num_inputs, lay.num_tokens, lay.tiles
    seq = work.sequence_length(image_tokens)
    b, n = work.batch_size, work.num_images
    enc = [p.scaled(n * inputs) for p in encoder_parts(encoder, image_size)]
    proj = projector_part(projector, n * inputs * tower_tokens)  # before unpadding / newlines, as OneVision
    prefill = [p.scaled(b) for p in llm_parts(llm_config, seq, logits_positions=1)]
    # decoding: the token at step i (0-based) attends to the prompt, i earlier new tokens and itself
    decode = [sum(p.forward for p in llm_parts(llm_config, 1, 1, context=seq + i + 1)) * b
              for i in range(work.new_tokens)]
    train_parts = enc + [proj] + [p.scaled(b) for p in llm_parts(llm_config, seq, logits_positions=seq)]
    stage = {s: training_flops(train_parts, s) for s in STAGES}
    f_enc = sum(p.forward for p in enc)
    f_comp = sum(p.forward for p in enc if p.group == "compressor")
    f_prefill = sum(p.forward for p in prefill)
    return {
        "image_tokens": image_tokens,
        "encoder_inputs": inputs,  # per image: the base image + its AnyRes tiles
        "tiles": list(tiles),  # AnyRes (rows, cols) per image; [0, 0]: untiled
        "sequence_length": seq,
        "encoder": f_enc,
        "compressor": f_comp,
        "projector": proj.forward,
        "encode": f_enc + proj.forward,
        "prefill": f_prefill,
        "encode_prefill": f_enc + proj.forward + f_prefill,
        "decode": sum(decode),  # new_tokens steps with the KV cache (the measured "decode" case)
        "decode_per_token": sum(decode) / len(decode),
        # generate(): the prefill yields the first token, then new_tokens - 1 decoding steps
        "generate": f_enc + proj.forward + f_prefill + sum(decode[:-1]),
        "train_stage1": stage["stage1"]["total"],
        "train_stage2": stage["stage2"]["total"],
        "train_split": stage,
        "parts": {p.name: p.forward for p in [*enc, proj, *prefill]},
        "parts_detail": [asdict(p) for p in [*enc, proj, *prefill]],
    }
