"""laco: layer-wise visual token compression for multimodal LLMs.

The core, importable without the training stack::

    import laco
    enc = laco.compress_encoder(siglip_vision_model, "laco", layer="1/4", ratio=2)
    out = enc(pixel_values)               # out.last_hidden_state: (B, N/4, C), out.grid
    laco.encoder_cost(enc).flop_ratio     # analytic FLOPs vs the uncompressed encoder

``import laco`` itself imports nothing heavy (not even torch): each name below is imported from its
submodule on first use (PEP 562), so ``laco --help`` and ``laco --version`` start instantly. Using a
model name (``laco.LaCoConfig``, ...) or ``import laco.model`` registers the Auto classes.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from laco._version import __version__

#: public name -> the submodule that defines it
_LAZY = {
    "Compressor": "laco.compressors",
    "PatchMergeLayer": "laco.compressors",
    "create_compressor": "laco.compressors",
    "list_compressors": "laco.compressors",
    "register_compressor": "laco.compressors",
    "CompressedVisionEncoder": "laco.encoders",
    "compress_encoder": "laco.encoders",
    "create_vision_encoder": "laco.encoders",
    "list_vision_presets": "laco.encoders",
    "resolve_layer": "laco.encoders",
    "encoder_cost": "laco.flops",
    "LaCoConfig": "laco.model",
    "LaCoForConditionalGeneration": "laco.model",
    "LaCoProcessor": "laco.model",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    if importlib.util.find_spec(f"laco.{name}") is not None:  # a submodule: laco.eval.evaluate after `import laco`
        return importlib.import_module(f"laco.{name}")
    raise AttributeError(f"module 'laco' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from laco.compressors import (
        Compressor, PatchMergeLayer, create_compressor, list_compressors, register_compressor,
    )
    from laco.encoders import (
        CompressedVisionEncoder, compress_encoder, create_vision_encoder, list_vision_presets, resolve_layer,
    )
    from laco.flops import encoder_cost
    from laco.model import LaCoConfig, LaCoForConditionalGeneration, LaCoProcessor
