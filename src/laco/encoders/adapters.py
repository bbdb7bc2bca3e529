"""Encoder adapters: one small class per vision-encoder family, so the layer loop has no family branches.

An adapter exposes, for a wrapped Hugging Face vision model (parameters shared, never copied):

* ``embed(pixel_values)``   -> (B, P + H*W, C): patch + position embeddings (and CLIP's pre-norm)
* ``num_prefix_tokens``     P: CLS / register tokens at the front, never merged
* ``patch_grid(pixel_values)`` -> (H, W)
* ``layers``                the transformer blocks (``nn.ModuleList``)
* ``final_norm``            the norm the model applies to its ``last_hidden_state`` (Identity if none)
* ``mlp_dim``, ``mlp_matrices`` for the FLOP model (SwiGLU has three matrices, GELU MLPs two)

Supported: ``SiglipVisionModel``, ``CLIPVisionModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``
(and, for each, the inner ``*VisionTransformer`` when a model nests it as ``.vision_model``).
"""

from __future__ import annotations

import torch
from torch import nn

from laco.ops import Grid

_ADAPTERS: dict[str, type["EncoderAdapter"]] = {}


def _register(*class_names: str):
    def wrap(cls):
        for name in class_names:
            _ADAPTERS[name] = cls
        return cls

    return wrap


class EncoderAdapter:
    """Family-independent view of a ViT. Subclasses set the attributes in ``__init__``."""

    num_prefix_tokens: int = 0

    def __init__(self, model: nn.Module):
        self.model = model  # the module owning embeddings / encoder / norms
        self.config = model.config
        self.dim: int = self.config.hidden_size
        self.patch_size: int = self.config.patch_size
        self.mlp_dim: int = getattr(self.config, "intermediate_size", 4 * self.dim)
        self.mlp_matrices: int = 2

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    @property
    def final_norm(self) -> nn.Module:
        return nn.Identity()

    def embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        return self.model.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)

    def patch_grid(self, pixel_values: torch.Tensor) -> Grid:
        # the patchify conv (stride = patch) drops a remainder: 384 px / 14 -> 27 patches, as in SigLIP-384
        h, w = pixel_values.shape[-2:]
        if h < self.patch_size or w < self.patch_size:
            raise ValueError(f"image size {h}x{w} is smaller than the patch size {self.patch_size}")
        return (h // self.patch_size, w // self.patch_size)

    def grid_for_image_size(self, image_size: int | tuple[int, int] | None = None) -> Grid:
        size = image_size or self.config.image_size
        h, w = (size, size) if isinstance(size, int) else size
        return self.patch_grid(torch.empty(0, 0, h, w, device="meta"))

    def embed_params(self) -> int:
        return sum(p.numel() for p in self.model.embeddings.parameters())

    #: whether the layers take an attention mask as their second positional argument (DINOv2's do not in 5.17)
    layer_takes_mask = True

    def call_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # vision towers use no attention mask; older transformers return tuples
        out = layer(x, None) if self.layer_takes_mask else layer(x)
        return out[0] if isinstance(out, tuple) else out


@_register("SiglipVisionModel", "SiglipVisionTransformer")
class SiglipAdapter(EncoderAdapter):
    """SigLIP: no CLS; ``last_hidden_state`` is ``post_layernorm(encoder output)``."""

    @property
    def final_norm(self) -> nn.Module:
        return self.model.post_layernorm


@_register("CLIPVisionModel", "CLIPVisionTransformer")
class CLIPAdapter(EncoderAdapter):
    """CLIP: CLS at index 0, ``pre_layrnorm`` after the embeddings; ``last_hidden_state`` is un-normed."""

    num_prefix_tokens = 1

    def embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        return self.model.pre_layrnorm(super().embed(pixel_values, interpolate_pos_encoding))

    def embed_params(self) -> int:
        return super().embed_params() + sum(p.numel() for p in self.model.pre_layrnorm.parameters())


@_register("Dinov2Model", "Dinov2WithRegistersModel")
class Dinov2Adapter(EncoderAdapter):
    """DINOv2: CLS (+ registers) in front; position embeddings interpolate to any image size."""

    layer_takes_mask = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.num_prefix_tokens = 1 + getattr(self.config, "num_register_tokens", 0)
        self.mlp_dim = int(self.config.hidden_size * self.config.mlp_ratio)
        self.mlp_matrices = 3 if self.config.use_swiglu_ffn else 2

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    @property
    def final_norm(self) -> nn.Module:
        return self.model.layernorm

    def embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        return self.model.embeddings(pixel_values)  # DINOv2 always interpolates


def list_encoder_families() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(model: nn.Module) -> EncoderAdapter:
    """The adapter for ``model`` (or its ``.vision_model``). Unknown classes get a clear error."""
    inner = getattr(model, "vision_model", model)
    for m in (inner, model):
        cls = _ADAPTERS.get(type(m).__name__)
        if cls is not None:
            return cls(m)
    raise TypeError(
        f"unsupported vision encoder {type(model).__name__}; supported: {', '.join(list_encoder_families())}"
    )
