"""laco: layer-wise visual token compression for multimodal LLMs.

The core, importable without the training stack::

    import laco
    enc = laco.compress_encoder(siglip_vision_model, "laco", layer="1/4", ratio=2)
    out = enc(pixel_values)               # out.last_hidden_state: (B, N/4, C), out.grid
    laco.encoder_cost(enc).flop_ratio     # analytic FLOPs vs the uncompressed encoder
"""

from laco.compressors import (
    Compressor,
    PatchMergeLayer,
    create_compressor,
    list_compressors,
    register_compressor,
)
from laco.encoders import (
    CompressedVisionEncoder,
    compress_encoder,
    create_vision_encoder,
    list_vision_presets,
    resolve_layer,
)
from laco.flops import encoder_cost
from laco.model import LaCoConfig, LaCoForConditionalGeneration, LaCoProcessor  # registers the Auto classes
import laco.eval  # noqa: E402  (laco.eval.evaluate after a plain `import laco`; lmms-eval not imported)

__version__ = "0.1.0"

__all__ = [
    "CompressedVisionEncoder", "Compressor", "LaCoConfig", "LaCoForConditionalGeneration", "LaCoProcessor",
    "PatchMergeLayer", "compress_encoder", "create_compressor",
    "create_vision_encoder", "encoder_cost", "list_compressors", "list_vision_presets", "register_compressor",
    "resolve_layer",
]
