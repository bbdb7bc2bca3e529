"""LLM presets (Qwen2 shapes as ``Qwen2Config`` built in code, random init) and method specs for ``laco bench``.

Vision presets live in ``laco.encoders.presets`` (one place for encoder shapes); this module adds the
language-model side. ``--methods`` follows the one method grammar, ``laco.compressors.spec``
("none", "laco@post", "laco@1/4", "avg_pool@7", "laco@1/4+1/2", ...).
"""

from __future__ import annotations

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
