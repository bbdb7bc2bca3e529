"""``LaCoConfig``: the configuration of a LaCo MLLM (vision encoder + compression + projector + LLM).

Saved as one ``config.json`` with ``model_type: "laco"``; after ``import laco``, ``AutoConfig`` loads it.

``compression`` is a plain dict (JSON-serialisable), normalised to all four keys::

    {"method": "laco",     # any name in laco.list_compressors(), or "none"
     "layer": "1/4",       # int k, fraction (0.25 / "1/4"), "post", or a list of these
     "ratio": 2,           # merge r x r tokens into one
     "kwargs": {}}         # extra compressor arguments, e.g. {"pad": "replicate", "proj": "mlp"}
"""

from __future__ import annotations

from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from laco.model.compat import HAS_SUB_CONFIG_SPEC, build_sub_configs, sub_config_specs

DEFAULT_COMPRESSION: dict[str, Any] = {"method": "laco", "layer": "1/4", "ratio": 2, "kwargs": {}}
#: sub-config key -> (default model_type, init kwargs); MLLMs use the patch tokens, not SigLIP's pooling head
SUB_CONFIG_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vision_config": ("siglip_vision_model", {"vision_use_head": False}),
    "text_config": ("qwen2", {}),
}


def normalize_compression(compression: dict[str, Any] | None) -> dict[str, Any]:
    """Fill defaults and validate a compression dict; unknown keys or methods are a ValueError."""
    if compression is None:
        compression = {}
    if not isinstance(compression, dict):
        raise TypeError(f"compression must be a dict like {DEFAULT_COMPRESSION}, got {type(compression).__name__}")
    unknown = set(compression) - set(DEFAULT_COMPRESSION)
    if unknown:
        raise ValueError(f"unknown compression keys {sorted(unknown)}; expected a subset of {list(DEFAULT_COMPRESSION)}")
    out = {**DEFAULT_COMPRESSION, **compression}
    out["kwargs"] = dict(out["kwargs"] or {})
    method = out["method"]
    if method is None:
        out["method"] = method = "none"
    from laco.compressors import list_compressors
    from laco.compressors.spec import parse_layers

    if method != "none" and method not in list_compressors():
        raise ValueError(f"unknown compression method {method!r}; known: none, {', '.join(list_compressors())}")
    if isinstance(out["layer"], tuple):
        out["layer"] = list(out["layer"])
    parse_layers(out["layer"])  # the one layer grammar: a bad spec fails here, naming it
    if isinstance(out["ratio"], bool) or not isinstance(out["ratio"], int):
        raise TypeError(f"compression ratio must be an int, got {out['ratio']!r}")
    return out


@strict
class LaCoConfig(PreTrainedConfig):
    r"""Configuration of ``LaCoForConditionalGeneration``.

    Args:
        vision_config: a SigLIP / CLIP / DINOv2(+registers) vision config (object or dict with ``model_type``).
            Default: a SigLIP vision config. SigLIP's MAP head is switched off (``vision_use_head=False``).
        text_config: any causal-LM config (object or dict with ``model_type``). Default: Qwen2.
        compression: see the module docstring.
        projector_type: a name in ``laco.model.projectors`` (``"mlp2x_gelu"``, ``"linear"``, ``"identity"``, ...).
        vision_feature_layer: which encoder layer feeds the projector (-1 last, -2 penultimate, ...).
        vision_feature_select_strategy: ``"default"`` drops prefix tokens (CLS, registers), ``"full"`` keeps them.
        image_token / image_token_id: the placeholder token repeated ``num_image_tokens`` times per image.
        image_size: input resolution (the tile size under AnyRes); default: ``vision_config.image_size``.
        image_grid_pinpoints: LLaVA-OneVision AnyRes resolutions ``[[h, w], ...]`` (multiples of ``image_size``);
            None: every image is one base image. See ``laco.model.anyres`` for the layout.
        vision_aspect_ratio: ``"anyres_max_N"``: unpadded AnyRes grids over about N tiles of tokens are down-scaled.
        use_image_newline: the model holds a learned ``image_newline`` token (LLM width) closing every row of
            an AnyRes grid, every untiled image and every video (OneVision's layout).
        video_token / video_token_id: the placeholder repeated ``video_tokens(num_frames)`` times per video.
        video_pooling: OneVision's 2x2 bilinear pooling of each frame's projected features; default: on only
            without compression (method "none"), since the encoder's own merge replaces it.
    """

    model_type = "laco"
    if HAS_SUB_CONFIG_SPEC:  # transformers >= 5.24 builds the sub-configs from these specs
        sub_configs_defaults = sub_config_specs(SUB_CONFIG_DEFAULTS)
    else:  # older: __post_init__ builds them (build_sub_configs)
        sub_configs = {key: AutoConfig for key in SUB_CONFIG_DEFAULTS}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    compression: dict | None = None
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -1
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    image_token: str = "<image>"
    image_token_id: int | None = None
    image_size: int | None = None
    image_grid_pinpoints: list | None = None
    vision_aspect_ratio: str = "anyres_max_9"
    use_image_newline: bool = False
    video_token: str = "<video>"
    video_token_id: int | None = None
    video_pooling: bool | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        build_sub_configs(self, SUB_CONFIG_DEFAULTS)  # transformers < 5.24 (a no-op after)
        super().__post_init__(**kwargs)
        self.compression = normalize_compression(self.compression)
        if getattr(self.vision_config, "model_type", None) == "siglip_vision_model":
            self.vision_config.vision_use_head = False  # MLLMs use patch tokens; the pooling head is dead weight
        if self.image_size is None:
            self.image_size = self.vision_config.image_size
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}"
            )
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        from laco.model import anyres

        anyres.parse_max_tiles(self.vision_aspect_ratio)
        if self.image_grid_pinpoints is not None:
            self.image_grid_pinpoints = anyres.check_pinpoints(self.image_grid_pinpoints, self.image_size)
        if self.video_pooling is None:
            self.video_pooling = self.compression["method"] == "none"
        for name in ("image_token_id", "video_token_id"):
            tid = getattr(self, name)
            if tid is not None and not 0 <= tid < self.text_config.vocab_size:
                raise ValueError(f"{name} {tid} is outside the LLM vocabulary (size {self.text_config.vocab_size})")

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per image (per tile): the compressed grid, plus prefix tokens for strategy "full".

        Computed by building the vision tower on the meta device (no memory, no weights), so it always
        follows the compression config and the encoder family.
        """
        import torch

        with torch.device("meta"):
            tower = build_vision_tower(self)
        return vision_tokens(tower, self)

    @property
    def tile_grid(self) -> tuple[int, int]:
        """The (compressed) token grid of one base image / tile / frame, as the LLM receives it."""
        import torch

        with torch.device("meta"):
            tower = build_vision_tower(self)
        return tuple(tower.output_grid(tower.adapter.grid_for_image_size(self.image_size)))

    def image_layout(self, image_size: tuple[int, int], tiled: bool = True, tile_grid: tuple[int, int] | None = None):
        """``laco.model.anyres.ImageLayout`` of one image of ``image_size`` (H, W); ``tiled=False``: base only.

        ``tile_grid``: the tower's per-tile grid when the caller has it (default: computed from the config).
        """
        from laco.model import anyres

        return anyres.image_layout(image_size, tile_grid_size=tile_grid or self.tile_grid, pinpoints=self.image_grid_pinpoints,
                                   tile_size=self.image_size, max_tiles=anyres.parse_max_tiles(self.vision_aspect_ratio),
                                   newline=self.use_image_newline, tiled=tiled)

    def video_tokens(self, num_frames: int) -> int:
        """LLM tokens of a video of ``num_frames`` frames (see ``laco.model.anyres``)."""
        from laco.model import anyres

        return anyres.video_tokens(num_frames, self.tile_grid, pool=self.video_pooling, newline=self.use_image_newline)


def vision_tokens(tower, config: LaCoConfig) -> int:
    """Tokens one image contributes: compressed patch grid (+ prefix tokens if the strategy keeps them)."""
    size = config.image_size
    grid = tower.adapter.grid_for_image_size(size)
    keep_prefix = config.vision_feature_select_strategy == "full"
    return tower.num_output_tokens(grid, include_prefix=keep_prefix)


def build_vision_tower(config: LaCoConfig, vision_model=None):
    """The compressed vision tower of ``config``; ``vision_model`` (pretrained) or a fresh one from the config."""
    from transformers import AutoModel

    from laco.encoders import compress_encoder

    if vision_model is None:
        vision_model = AutoModel.from_config(config.vision_config)
    comp = config.compression
    return compress_encoder(
        vision_model,
        comp["method"],
        layer=comp["layer"],
        ratio=comp["ratio"],
        feature_layer=config.vision_feature_layer,
        **comp["kwargs"],
    )
