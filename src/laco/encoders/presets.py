"""Vision-encoder presets: real architectures' shapes as Hugging Face configs built in code (random init).

No weights are downloaded; ``create_vision_encoder(name)`` gives the architecture, and a user with
local pretrained weights loads them with the family's own ``from_pretrained``.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

_FAMILIES = {
    "siglip": (SiglipVisionConfig, SiglipVisionModel, {"vision_use_head": False}),
    "clip": (CLIPVisionConfig, CLIPVisionModel, {}),
    "dinov2": (Dinov2Config, Dinov2Model, {}),
    "dinov2_reg": (Dinov2WithRegistersConfig, Dinov2WithRegistersModel, {}),
}


def _vit(width: int, mlp: int, layers: int, heads: int, image: int, patch: int) -> dict[str, int]:
    return dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                image_size=image, patch_size=patch)


# name -> (family, config kwargs). Shapes from the models' published configs.
VISION_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "siglip-so400m-384": ("siglip", _vit(1152, 4304, 27, 16, 384, 14)),
    "siglip-base-224": ("siglip", _vit(768, 3072, 12, 12, 224, 16)),
    "clip-l-336": ("clip", _vit(1024, 4096, 24, 16, 336, 14)),
    # InternViT-300M-448 and AIMv2-L are 24 x 1024-wide ViTs at 448 px / patch 14; InternViT has a
    # CLS token, so it is modelled with the CLIP structure (same FLOPs per layer, same token grid).
    "internvit-300m-448": ("clip", _vit(1024, 4096, 24, 16, 448, 14)),
    "dinov2-reg-small": ("dinov2_reg", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                            image_size=224, patch_size=14, num_register_tokens=4)),
    # tiny configs for tests and demos
    "tiny-siglip": ("siglip", _vit(32, 64, 4, 2, 64, 8)),
    "tiny-clip": ("clip", _vit(32, 64, 4, 2, 64, 8)),
    "tiny-dinov2-reg": ("dinov2_reg", dict(hidden_size=32, mlp_ratio=2, num_hidden_layers=4, num_attention_heads=2,
                                           image_size=64, patch_size=8, num_register_tokens=2)),
}


def list_vision_presets() -> list[str]:
    return list(VISION_PRESETS)


def vision_config(name: str, **overrides):
    """The Hugging Face config of a preset (a new object every call: configs are not shared)."""
    if name not in VISION_PRESETS:
        raise ValueError(f"unknown vision preset {name!r}; known: {', '.join(VISION_PRESETS)}")
    family, kw = VISION_PRESETS[name]
    config_cls, _, defaults = _FAMILIES[family]
    return config_cls(**{**defaults, **kw, **overrides})


def create_vision_encoder(name: str, **overrides) -> nn.Module:
    """A randomly initialised vision encoder with a preset's shape."""
    config = vision_config(name, **overrides)
    family = VISION_PRESETS[name][0]
    return _FAMILIES[family][1](config)
