"""``LaCoForConditionalGeneration``: vision tower (with LaCo compression inside) -> projector -> LLM, in LLaVA's
module layout (a base ``LaCoModel`` plus ``lm_head``, as ``LlavaOnevisionForConditionalGeneration``)::

    pixel_values (n_img, 3, H, W)
      -> model.vision_tower (laco.CompressedVisionEncoder)      (n_img, P + h*w, C)
      -> feature select ("default" drops the P prefix tokens)   (n_img, T, C),  T = num_image_tokens
      -> model.multi_modal_projector                            (n_img, T, D)
      -> scattered, in order, into the positions of ``image_token_id`` in ``input_ids``
      -> model.language_model (AutoModel: the LLM's decoder)    (B, L, D)
      -> lm_head                                                (B, L, V)

State-dict keys in memory: ``model.vision_tower.vision_model.*`` (the pretrained encoder),
``model.vision_tower.compressors.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``,
``model.image_newline``, ``lm_head.*``. On disk (``save_pretrained``) the keys keep laco 0.1's layout
(``vision_tower.*``, ``projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``, ``image_newline``):
``LEGACY_KEY_RENAMES`` is registered with transformers' conversion mapping, which renames them on load and back
on save, so folders of every laco version load and the vLLM plugin reads the same keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from laco.encoders import CompressedVisionEncoder
from laco.model import anyres
from laco.model.compat import CACHE_KEY, causal_lm_output, output_cache, slice_logits_to_keep
from laco.model.config import LaCoConfig, build_vision_tower, vision_tokens
from laco.model.projectors import create_projector

#: parameter-group names used by training for freezing / per-part learning rates
PARAMETER_GROUPS = ("compressor", "encoder", "projector", "llm")

#: the module tree's name, recorded in training runs (a checkpoint of accelerate's holds in-memory names, so a run
#: started with another tree cannot resume); "llava": ``model.{vision_tower,multi_modal_projector,language_model}``
#: + ``lm_head`` (before: ``vision_tower``, ``projector``, ``language_model`` = the causal LM)
MODULE_LAYOUT = "llava"

#: laco 0.1's state-dict keys (still the on-disk layout) -> the module tree's names. Registered for model_type
#: "laco" below: ``from_pretrained`` renames, ``save_pretrained`` writes the keys back (transformers reverts a
#: registered renaming on save). The causal LM's base must be ``.model`` (Qwen2, Llama, Mistral, Gemma, ...).
LEGACY_KEY_RENAMES = (
    (r"^language_model\.lm_head", "lm_head"),
    (r"^language_model\.model", "model.language_model"),
    (r"^vision_tower", "model.vision_tower"),
    (r"^projector", "model.multi_modal_projector"),
    (r"^image_newline", "model.image_newline"),
)
# at import, so that the remote-code bundle (a copy of this module) registers it too
register_checkpoint_conversion_mapping(
    "laco", [WeightRenaming(source_patterns=src, target_patterns=dst) for src, dst in LEGACY_KEY_RENAMES],
    overwrite=True,
)

#: parts of the base model the top model also exposes, read and write, under laco's names
_BASE_PARTS = {"vision_tower": "vision_tower", "projector": "multi_modal_projector", "image_newline": "image_newline"}


def image_features(
    vision_tower: CompressedVisionEncoder, projector: nn.Module, config: LaCoConfig,
    pixel_values: torch.Tensor | None = None, *, encoder_state: torch.Tensor | None = None, start_layer: int = 0,
) -> torch.Tensor:
    """(n_img, 3, H, W) -> (n_img, T, D): encoder + compression, feature select, projector.

    The one image path, shared by ``LaCoForConditionalGeneration`` and the vLLM model (``laco.serve``).
    Or from ``encoder_state`` instead of pixels: the uncompressed encoder's (n_img, P + H*W, C) state after
    ``start_layer`` layers at ``config.image_size`` (a cache of frozen layers that run before the first
    merge); the tower finishes the forward from there (``CompressedVisionEncoder.forward_from``).
    """
    if encoder_state is not None:
        grid = vision_tower.adapter.grid_for_image_size(config.image_size)
        out = vision_tower.forward_from(encoder_state, grid, start_layer)
    else:
        if pixel_values is None or pixel_values.ndim != 4:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(f"pixel_values must be (num_images, 3, H, W), got shape {shape}")
        param = next(vision_tower.vision_model.parameters())
        # another resolution than the encoder was built for: interpolate its position embeddings
        native = config.vision_config.image_size
        native = (native, native) if isinstance(native, int) else tuple(native)
        interpolate = tuple(pixel_values.shape[-2:]) != native
        out = vision_tower(pixel_values.to(dtype=param.dtype, device=param.device), interpolate_pos_encoding=interpolate)
    feats = out.last_hidden_state  # (n_img, P + h*w, C)
    if config.vision_feature_select_strategy == "default":
        feats = feats[:, out.num_prefix_tokens :]  # (n_img, h*w, C)
    return projector(feats)  # (n_img, T, D)




class LaCoPreTrainedModel(PreTrainedModel):
    config_class = LaCoConfig
    config: LaCoConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # The encoder and the LLM are PreTrainedModels and initialise themselves (dispatched by HF).
        # What is left: image_newline (as LlavaOnevisionModel: randn / sqrt(width)), lm_head (normal(0, the LLM's
        # initializer_range), as the LLM's own head), the projector (LLaVA-style normal(0, 0.02)) and the
        # compressors, which keep their own scheme (e.g. LaCo's zero-initialised last projection): a compressor
        # sub-module is reset with torch's default, then its owning compressor's ``reset_parameters`` re-applies
        # the compressor-specific part (HF may visit only some sub-modules, in any order).
        if isinstance(module, LaCoModel) and module.image_newline is not None:
            with torch.no_grad():
                module.image_newline.normal_(0.0, 1.0 / module.image_newline.numel() ** 0.5)
            return
        if isinstance(module, nn.Linear) and module is getattr(self, "lm_head", None):
            std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            return
        base = self.base_model  # the LaCoModel (self, or the top model's .model)
        if isinstance(module, nn.Linear) and _is_in(base, "multi_modal_projector", module):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            return
        owner = _owning_compressor(base, module)
        if owner is not None:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if owner is not module and hasattr(owner, "reset_parameters"):
                owner.reset_parameters()


def _is_in(model: nn.Module, prefix: str, module: nn.Module) -> bool:
    try:
        sub = model.get_submodule(prefix)
    except AttributeError:
        return False
    return any(m is module for m in sub.modules())


def _owning_compressor(model: nn.Module, module: nn.Module) -> nn.Module | None:
    tower = getattr(model, "vision_tower", None)
    if tower is None:
        return None
    for comp in tower.compressors.values():
        if any(m is module for m in comp.modules()):
            return comp
    return None


def _keep_present(model: nn.Module) -> None:
    """Keep only ``_no_split_modules`` classes the model holds: SiglipVisionModel also names SigLIP's text and
    pooling-head classes, and accelerate's FSDP auto-wrap refuses a class it cannot find."""
    present = {type(m).__name__ for m in model.modules()}
    model._no_split_modules = sorted(n for n in model._no_split_modules if n in present)


class LaCoModel(LaCoPreTrainedModel):
    """The base model: vision tower (LaCo compression inside), projector, the LLM's decoder and ``image_newline``;
    ``forward`` gives the decoder's last hidden states (as ``LlavaOnevisionModel``)."""

    def __init__(self, config: LaCoConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config)
        self.multi_modal_projector = create_projector(
            config.projector_type, self.vision_tower.hidden_size, config.text_config.hidden_size
        )
        self.language_model = AutoModel.from_config(config.text_config)
        # OneVision's learned row separator (LLM width); see laco.model.anyres
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size)) if config.use_image_newline else None
        _check_visual_layout(self.vision_tower, config)
        # the tower is a plain nn.Module, so HF would not collect its encoder's unsplittable layer classes
        # (device_map="auto", FSDP auto-wrap): name them here; the LLM's are collected by post_init
        self._no_split_modules = list(getattr(self.vision_tower.vision_model, "_no_split_modules", None) or [])
        self.post_init()
        _keep_present(self)

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per image: the compressed grid at ``config.image_size`` (+ prefix if strategy "full")."""
        return vision_tokens(self.vision_tower, self.config)

    # -- image features -------------------------------------------------------------------------
    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, *, encoder_state: torch.Tensor | None = None,
        start_layer: int = 0, **kwargs: Any,
    ) -> torch.Tensor:
        """(n_img, 3, H, W) -> (n_img, num_image_tokens, D): encoder + compression, feature select, projector.

        Or from a cached ``encoder_state`` (see ``image_features``).
        """
        return image_features(self.vision_tower, self.multi_modal_projector, self.config, pixel_values,
                              encoder_state=encoder_state, start_layer=start_layer)

    def tile_grid(self) -> tuple[int, int]:
        """The token grid one base image / tile / frame gives the LLM (compressed by the tower)."""
        return tuple(self.vision_tower.output_grid(self.vision_tower.adapter.grid_for_image_size(self.config.image_size)))

    def image_layouts(self, image_sizes, batch_num_images=None) -> list:
        """One ``anyres.ImageLayout`` per image: tiled when the model has pinpoints and the image is alone in its
        sample (HF's ``batch_num_images`` rule: images of a multi-image prompt are not tiled)."""
        sizes = [tuple(int(v) for v in s) for s in torch.as_tensor(image_sizes).reshape(-1, 2).tolist()]
        if batch_num_images is None:
            tiled = [True] * len(sizes)
        else:
            tiled = [int(n) == 1 for n in torch.as_tensor(batch_num_images).reshape(-1).tolist() for _ in range(int(n))]
        if len(tiled) != len(sizes):
            raise ValueError(f"batch_num_images sums to {len(tiled)} images but image_sizes has {len(sizes)}")
        grid = self.tile_grid()
        return [self.config.image_layout(s, tiled=t, tile_grid=grid) for s, t in zip(sizes, tiled)]

    def get_visual_tokens(self, pixel_values: torch.Tensor, image_sizes=None, batch_num_images=None) -> list[torch.Tensor]:
        """Images -> their LLM tokens, one (N_i, D) tensor per image, in OneVision's layout (``laco.model.anyres``).

        ``pixel_values``: (n_inputs, 3, S, S), the base image then the tiles of each image in turn, or HF's
        padded (n_images, max_inputs, 3, S, S). ``image_sizes`` (n_images, 2) original (H, W): needed with
        pinpoints; without them every input is one untiled image.
        """
        if image_sizes is None:
            if self.config.image_grid_pinpoints and pixel_values.ndim != 4:
                raise ValueError("pixel_values of AnyRes images need image_sizes (use LaCoProcessor)")
            n = pixel_values.shape[0]
            grid = self.tile_grid()
            layouts = [self.config.image_layout((1, 1), tiled=False, tile_grid=grid)] * n
        else:
            layouts = self.image_layouts(image_sizes, batch_num_images)
        counts = [lay.num_inputs for lay in layouts]
        if pixel_values.ndim == 5:  # HF: (n_images, max_inputs, 3, S, S), zero-padded on dim 1
            if pixel_values.shape[0] != len(layouts) or any(c > pixel_values.shape[1] for c in counts):
                raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not hold {counts} inputs per image")
            pixel_values = torch.cat([pv[:c] for pv, c in zip(pixel_values, counts)])
        if pixel_values.shape[0] != sum(counts):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} images/tiles but the image sizes call for "
                             f"{sum(counts)} ({counts} per image: base image + tiles)")
        feats = self.get_image_features(pixel_values)  # (n_inputs, g*g, D)
        return [anyres.pack_image(f, lay, self.image_newline) for f, lay in zip(feats.split(counts), layouts)]

    def get_video_tokens(self, pixel_values_videos) -> list[torch.Tensor]:
        """Videos -> their LLM tokens, one (video_tokens(T), D) tensor per video.

        ``pixel_values_videos``: (n_videos, T, 3, S, S) or a list of (T_i, 3, S, S). Each frame is encoded on
        its own (compressed inside the encoder), optionally pooled 2x2 after the projector (``video_pooling``),
        frames in order, then one ``image_newline``.
        """
        grid = self.tile_grid()
        return [anyres.pack_video(self.get_image_features(v), grid, pool=self.config.video_pooling,
                                  newline=self.image_newline) for v in pixel_values_videos]

    def merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features, token_id: int | None = None,
    ) -> torch.Tensor:
        """Write ``image_features`` ((n_img, T, D), or a list of (N_i, D)), in order, into the ``token_id``
        positions (default: ``image_token_id``; ``video_token_id`` for videos).

        The counts must match exactly (never truncated): a ValueError names both counts.
        """
        token_id = self.config.image_token_id if token_id is None else token_id
        what = "video" if token_id == self.config.video_token_id and token_id != self.config.image_token_id else "image"
        mask = input_ids == token_id  # (B, L)
        n_tokens = int(mask.sum())
        per_item = [f.shape[0] for f in image_features] if isinstance(image_features, (list, tuple)) else \
            [image_features.shape[1]] * image_features.shape[0]
        if n_tokens != sum(per_item):
            raise ValueError(
                f"{what} tokens and {what} features do not match: the input has {n_tokens} {what} tokens "
                f"(id {token_id}) but {len(per_item)} {what}(s) give {sum(per_item)} features ({per_item} each); "
                f"each placeholder must be expanded to its {what}'s token count (use LaCoProcessor)"
            )
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in image_features])
        feats = feats.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), feats)


    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        past_key_values=None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """The decoder's output (``last_hidden_state`` (B, L, D), cache) with the images' and videos' tokens in place.

        Images: ``pixel_values`` (+ ``image_sizes`` / ``batch_num_images`` under AnyRes), see ``get_visual_tokens``;
        videos: ``pixel_values_videos``, see ``get_video_tokens``.
        """
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        media = (("image", self.config.image_token_id, pixel_values,
                  lambda: self.get_visual_tokens(pixel_values, image_sizes, batch_num_images)),
                 ("video", self.config.video_token_id, pixel_values_videos,
                  lambda: self.get_video_tokens(pixel_values_videos)))
        for what, token_id, pixels, encode in media:
            if pixels is not None:
                if input_ids is None or token_id is None:
                    raise ValueError(f"{what} pixels need input_ids and the config's {what}_token_id to locate them")
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, encode(), token_id)
            elif input_ids is not None and _is_prefill(cache) and token_id is not None and bool((input_ids == token_id).any()):
                raise ValueError(f"the input has {int((input_ids == token_id).sum())} {what} tokens (id {token_id}) "
                                 f"but no {'pixel_values' if what == 'image' else 'pixel_values_videos'}")
        return self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE_KEY: cache},  # "cache" (transformers >= 5.24) or "past_key_values"
            **kwargs,
        )


class LaCoForConditionalGeneration(LaCoPreTrainedModel, GenerationMixin):
    """A LLaVA-style MLLM whose vision tower compresses tokens inside the encoder (LaCo): ``model`` (``LaCoModel``)
    + ``lm_head``. ``vision_tower``, ``projector`` and ``image_newline`` name the base model's parts."""

    def __init__(self, config: LaCoConfig):
        super().__init__(config)
        self.model = LaCoModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # tied to the decoder's input embeddings when the config ties them (named per LLM: embed_tokens, wte, ...)
        embed = f"model.language_model.{_input_embeddings_name(self.model)}.weight"
        self._tied_weights_keys = {"lm_head.weight": embed}
        self.post_init()
        _keep_present(self)

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module registers a module / parameter assigned to ``model.vision_tower`` on the top model itself,
        # bypassing the property: forward the base model's parts to it
        if name in _BASE_PARTS and "model" in self.__dict__.get("_modules", {}):
            setattr(self.model, _BASE_PARTS[name], value)
        else:
            super().__setattr__(name, value)

    @property
    def vision_tower(self) -> CompressedVisionEncoder:
        return self.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.multi_modal_projector

    @property
    def image_newline(self) -> nn.Parameter | None:
        return self.model.image_newline

    # -- bookkeeping --------------------------------------------------------------------------
    # get_input_embeddings / get_output_embeddings / get_decoder and their setters: PreTrainedModel's defaults
    # (the decoder is ``model.language_model``, the head ``lm_head``), as for LLaVA
    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per image: the compressed grid at ``config.image_size`` (+ prefix if strategy "full")."""
        return self.model.num_image_tokens

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per part: "compressor", "encoder", "projector" (+ image_newline), "llm" (decoder + lm_head;
        disjoint; together: all, a tied lm_head once)."""
        tower = self.model.vision_tower
        llm = list(dict.fromkeys([*self.model.language_model.parameters(), *self.lm_head.parameters()]))
        return {
            "compressor": list(tower.compressors.parameters()),
            "encoder": list(tower.vision_model.parameters()),
            "projector": [*self.model.multi_modal_projector.parameters(),
                          *([self.image_newline] if self.image_newline is not None else [])],
            "llm": llm,
        }

    # -- image features (the base model's) ------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """See ``LaCoModel.get_image_features``."""
        return self.model.get_image_features(pixel_values, **kwargs)

    def get_visual_tokens(self, pixel_values: torch.Tensor, image_sizes=None,
                          batch_num_images=None) -> list[torch.Tensor]:
        """See ``LaCoModel.get_visual_tokens``."""
        return self.model.get_visual_tokens(pixel_values, image_sizes, batch_num_images)

    def get_video_tokens(self, pixel_values_videos) -> list[torch.Tensor]:
        """See ``LaCoModel.get_video_tokens``."""
        return self.model.get_video_tokens(pixel_values_videos)

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features,
                             token_id: int | None = None) -> torch.Tensor:
        """See ``LaCoModel.merge_image_features``."""
        return self.model.merge_image_features(input_ids, inputs_embeds, image_features, token_id)

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values=None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward with images; ``loss`` (shifted CE) when ``labels`` are given.

        Inputs as ``LaCoModel.forward``. Image- and video-token positions are never predicted: their labels are set
        to -100 here. ``logits_to_keep``: logits of the last N positions only (0: all), as transformers' LMs.
        """
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_sizes=image_sizes,
            batch_num_images=batch_num_images, pixel_values_videos=pixel_values_videos,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            position_ids=position_ids, use_cache=use_cache, **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            if input_ids is not None:
                for token_id in {self.config.image_token_id, self.config.video_token_id} - {None}:
                    labels = labels.masked_fill(input_ids == token_id, -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      **kwargs)
        return causal_lm_output(
            loss=loss, logits=logits, cache=output_cache(out), hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        # pixel_values only in the prefill step: later steps read the image through the KV cache.
        # (GenerationMixin drops them already; this keeps the rule explicit and version-proof.)
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("pixel_values", "pixel_values_videos", "image_sizes", "batch_num_images"):
                inputs.pop(key, None)
        return inputs


    def save_pretrained(self, save_directory, *args: Any, remote_code: bool = False, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained`` plus a model card (README.md: parts, compression, tokens, FLOPs).

        ``remote_code=True``: also the model's code and ``auto_map`` (``laco.model.remote``), so that
        ``AutoModelForImageTextToText.from_pretrained(dir, trust_remote_code=True)`` works without laco.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from laco.io import atomic_write_text
            from laco.model.card import model_card

            atomic_write_text(Path(save_directory) / "README.md", model_card(self))
            if remote_code:
                from laco.model.remote import add_remote_code

                add_remote_code(save_directory)

    # -- building from parts --------------------------------------------------------------------
    @classmethod
    def from_parts(
        cls,
        vision_dir: str | Path,
        llm_dir: str | Path,
        *,
        compression: dict[str, Any] | None = None,
        projector_type: str = "mlp2x_gelu",
        tokenizer=None,
        image_token: str = "<image>",
        image_token_id: int | None = None,
        **config_kwargs: Any,
    ) -> "LaCoForConditionalGeneration":
        """A LaCo MLLM from a saved HF vision model dir and a saved causal-LM dir (new compressors + projector).

        The image token: ``image_token_id``, or taken from ``tokenizer`` (``image_token`` is added to it
        as a special token if missing, and the LLM's embeddings grow if the id is past its vocabulary).
        The matching processor, with the encoder's own image processor (size set to the model's):
        ``LaCoProcessor.from_model_config(model.config, tokenizer, image_processor=vision_dir)``.
        """
        for name, path in (("vision_dir", vision_dir), ("llm_dir", llm_dir)):
            if not Path(path).is_dir():
                raise FileNotFoundError(f"{name} {str(path)!r} is not a directory")
        vision_model = AutoModel.from_pretrained(vision_dir)
        llm = AutoModelForCausalLM.from_pretrained(llm_dir)
        if tokenizer is not None:
            if image_token not in tokenizer.get_vocab():
                tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
            token_id = tokenizer.convert_tokens_to_ids(image_token)
            if image_token_id is not None and image_token_id != token_id:
                raise ValueError(f"image_token_id {image_token_id} != tokenizer's id {token_id} for {image_token!r}")
            image_token_id = token_id
            if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
                llm.resize_token_embeddings(len(tokenizer))
        if image_token_id is None:
            raise ValueError("from_parts needs image_token_id or a tokenizer to take the image token from")
        config = LaCoConfig(
            vision_config=vision_model.config.to_dict(),
            text_config=llm.config.to_dict(),
            compression=compression,
            projector_type=projector_type,
            image_token=image_token,
            image_token_id=image_token_id,
            **config_kwargs,
        )
        with torch.device("meta"):  # skeleton only: the parts below replace every module
            model = cls(config)
        ref = next(llm.parameters())
        model.vision_tower = build_vision_tower(config, vision_model)
        model.set_decoder(llm.base_model)  # the causal LM split into decoder and head: the same tensors
        model.lm_head = llm.get_output_embeddings()
        model.projector = create_projector(projector_type, model.vision_tower.hidden_size, llm.config.hidden_size)
        model.projector.to(device=ref.device, dtype=ref.dtype)
        for m in model.projector.modules():
            model._init_weights(m)
        model.config.vision_config = vision_model.config
        model.config.text_config = llm.config
        return model


def _check_visual_layout(tower: CompressedVisionEncoder, config: LaCoConfig) -> None:
    """AnyRes, image_newline and video stitch token grids: the LLM must receive the whole grid, no prefix."""
    if not (config.image_grid_pinpoints or config.use_image_newline or config.video_token_id is not None):
        return
    if config.vision_feature_select_strategy == "full" and tower.num_prefix_tokens:
        raise ValueError(f"AnyRes / image_newline / video need the image tokens to be a grid, but strategy 'full' keeps "
                         f"{tower.num_prefix_tokens} prefix token(s) of {type(tower.vision_model).__name__}; use 'default'")


def _is_prefill(cache) -> bool:
    return cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0


def _input_embeddings_name(base: LaCoModel) -> str:
    """The decoder's input-embedding module name (``embed_tokens``, ``wte``, ...)."""
    emb = base.language_model.get_input_embeddings()
    return next(name for name, m in base.language_model.named_modules() if m is emb)
