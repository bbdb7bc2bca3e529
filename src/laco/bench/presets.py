"""LLM presets (Qwen2 shapes as ``Qwen2Config`` built in code, random init) and method specs for ``laco bench``.

Vision presets live in ``laco.encoders.presets`` (one place for encoder shapes); this module adds the
language-model side and the ``--methods`` grammar:

    "none"                   no compression (every visual token reaches the LLM)
    "post"                   = "laco@post": the LaCo PML after the encoder (external compression, LaCo@1)
    "<compressor>@<layer>"   any registered compressor at any layer spec: "laco@1/4", "pixel_shuffle@1/4",
                             "laco@7", "avg_pool@post", "laco@1/4+1/2" (two merges; "+" separates layers)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import Qwen2Config


def _qwen2(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied,
                max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                rms_norm_eps=1e-6)


# name -> Qwen2Config kwargs. Shapes from the published Qwen2 configs (0.5B/1.5B tie the embeddings).
LLM_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": _qwen2(896, 4864, 24, 14, 2, 151936, True),
    "qwen2-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2-7b": _qwen2(3584, 18944, 28, 28, 4, 152064, False),
    # tests and demos: 2 layers, width 32, small vocabulary
    "tiny-qwen2": _qwen2(32, 64, 2, 2, 1, 512, True),
}


def list_llm_presets() -> list[str]:
    return list(LLM_PRESETS)


def llm_config(name: str, **overrides) -> Qwen2Config:
    """A new ``Qwen2Config`` with a preset's shape (never shared: ``from_config`` writes into it)."""
    if name not in LLM_PRESETS:
        raise ValueError(f"unknown LLM preset {name!r}; known: {', '.join(LLM_PRESETS)}")
    return Qwen2Config(**{**LLM_PRESETS[name], **overrides})


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked configuration: ``compressor`` at ``layers`` (``compressor=None``: uncompressed)."""

    name: str  # as the user wrote it, normalised ("post" -> "laco@post")
    compressor: str | None
    layers: tuple[str, ...] = ()

    @property
    def layer(self) -> str | list[str] | None:
        """The layer spec ``compress_encoder`` takes: one spec or a list."""
        if not self.layers:
            return None
        return self.layers[0] if len(self.layers) == 1 else list(self.layers)

    @property
    def compression(self) -> dict[str, Any]:
        """The ``compression`` dict of ``LaCoConfig`` (ratio and kwargs are added by the caller)."""
        if self.compressor is None:
            return {"method": "none"}
        layer = self.layer
        layer = [_layer_value(s) for s in layer] if isinstance(layer, list) else _layer_value(layer)
        return {"method": self.compressor, "layer": layer}


def _layer_value(spec: str) -> int | str:
    return int(spec) if spec.isdigit() else spec


def parse_method(text: str) -> MethodSpec:
    """'none' | 'post' | '<compressor>@<layer>[+<layer>...]' -> MethodSpec (compressor names are checked)."""
    from laco.compressors import list_compressors

    s = text.strip()
    if s.lower() == "none":
        return MethodSpec("none", None)
    if s.lower() == "post":
        s = "laco@post"
    if "@" not in s:
        raise ValueError(f"method {text!r}: expected 'none', 'post' or '<compressor>@<layer>' such as 'laco@1/4'")
    comp, _, layer_text = s.partition("@")
    comp = comp.strip()
    if comp not in list_compressors():
        raise ValueError(f"method {text!r}: unknown compressor {comp!r}; known: {', '.join(list_compressors())}")
    layers = tuple(p.strip().lower() for p in layer_text.split("+"))
    if not all(layers):
        raise ValueError(f"method {text!r}: empty layer spec; use e.g. 'laco@1/4', 'laco@7' or 'laco@post'")
    return MethodSpec(f"{comp}@{'+'.join(layers)}", comp, layers)


def parse_methods(text: str) -> list[MethodSpec]:
    """Comma-separated methods; duplicates are an error (they would be timed twice under one name)."""
    specs = [parse_method(p) for p in text.split(",") if p.strip()]
    if not specs:
        raise ValueError("no methods given; e.g. --methods none,post,laco@1/4")
    names = [m.name for m in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"methods listed twice: {', '.join(dup)}")
    return specs
