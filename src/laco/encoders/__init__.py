"""Vision encoders: family adapters, presets, and ``compress_encoder`` (the one owner of the layer loop)."""

from laco.encoders.adapters import EncoderAdapter, get_adapter, list_encoder_families
from laco.encoders.compress import CompressedEncoderOutput, CompressedVisionEncoder, compress_encoder, resolve_layer
from laco.encoders.presets import VISION_PRESETS, create_vision_encoder, list_vision_presets, vision_config

__all__ = [
    "CompressedEncoderOutput", "CompressedVisionEncoder", "EncoderAdapter", "VISION_PRESETS", "compress_encoder",
    "create_vision_encoder", "get_adapter", "list_encoder_families", "list_vision_presets", "resolve_layer",
    "vision_config",
]
