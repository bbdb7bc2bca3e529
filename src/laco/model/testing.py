"""Tiny LaCo models for tests and demos (about 100k parameters, random init, no downloads).

* vision: SigLIP, 64 px, patch 8 -> 8x8 grid, 4 layers, width 32
* compression: laco after layer 1 of 4 ("1/4"), r = 2 -> 4x4 = 16 image tokens
* text: Qwen2, 2 layers, width 32, vocabulary ``TINY_VOCAB_SIZE`` (the tiny tokenizer's)
"""

from __future__ import annotations

from typing import Any

import torch

from laco.model.config import LaCoConfig
from laco.model.tokenizer import TINY_VOCAB_SIZE
#: special tokens of the tiny tokenizer, in id order (ids 0..3)
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
TINY_IMAGE_TOKEN_ID = TINY_SPECIAL_TOKENS.index("<image>")


def tiny_vision_config(**overrides: Any) -> dict[str, Any]:
    cfg = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=2, image_size=64, patch_size=8, vision_use_head=False)
    return {**cfg, **overrides}


def tiny_text_config(**overrides: Any) -> dict[str, Any]:
    cfg = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=TINY_VOCAB_SIZE, max_position_embeddings=512,
               bos_token_id=None, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return {**cfg, **overrides}


def tiny_laco_config(*, vision: dict | None = None, text: dict | None = None, **overrides: Any) -> LaCoConfig:
    """A tiny ``LaCoConfig``; ``vision`` / ``text`` override sub-config fields, ``overrides`` top-level ones."""
    kw: dict[str, Any] = dict(
        vision_config=tiny_vision_config(**(vision or {})),
        text_config=tiny_text_config(**(text or {})),
        compression={"method": "laco", "layer": "1/4", "ratio": 2},
        image_token_id=TINY_IMAGE_TOKEN_ID,
    )
    return LaCoConfig(**{**kw, **overrides})


def tiny_laco_model(seed: int = 0, **config_kwargs: Any):
    """A tiny ``LaCoForConditionalGeneration`` in eval mode, initialised from ``seed`` (global RNG untouched)."""
    from laco.model.modeling import LaCoForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LaCoForConditionalGeneration(tiny_laco_config(**config_kwargs))
    return model.eval()


def tiny_tokenizer():
    """The tiny byte-level BPE (vocabulary ``TINY_VOCAB_SIZE``) matching ``tiny_laco_config``."""
    from laco.model.tokenizer import tiny_tokenizer as _tiny

    return _tiny()


def tiny_laco_processor(config: LaCoConfig | None = None, **kwargs: Any):
    """A ``LaCoProcessor`` for ``config`` (default: ``tiny_laco_config()``) with the tiny tokenizer."""
    from laco.model.processing import LaCoProcessor

    return LaCoProcessor.from_model_config(config or tiny_laco_config(), tiny_tokenizer(), **kwargs)


#: tiny pinpoints: 1x1, 1x2, 2x1 tiles of 64 px
TINY_PINPOINTS = [[64, 64], [64, 128], [128, 64]]


def tiny_onevision(seed: int = 0, **config_kwargs: Any):
    """A tiny LLaVA-OneVision-layout model and its processor: AnyRes (``TINY_PINPOINTS``), ``image_newline``, and a
    ``<video>`` token added to the tiny tokenizer (id ``TINY_VOCAB_SIZE``). Returns ``(model, processor)``."""
    from laco.model.processing import LaCoProcessor

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<video>"]})
    kw = dict(text={"vocab_size": len(tok)}, video_token_id=tok.convert_tokens_to_ids("<video>"),
              image_grid_pinpoints=TINY_PINPOINTS, use_image_newline=True)
    model = tiny_laco_model(seed, **{**kw, **config_kwargs})
    return model, LaCoProcessor.from_model_config(model.config, tok)


def save_tiny_mllm(path, seed: int = 0, **config_kwargs: Any):
    """Save a tiny model and its processor to ``path`` (what ``laco generate`` / ``AutoProcessor`` load)."""
    model = tiny_laco_model(seed=seed, **config_kwargs)
    model.save_pretrained(path)
    tiny_laco_processor(model.config).save_pretrained(path)
    return model
