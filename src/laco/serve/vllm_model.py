"""The vLLM implementation of ``LaCoForConditionalGeneration`` (registered by ``laco.serve.register``).

    pixel_values (n_img, 3, S, S)              from the saved LaCoProcessor (the model's own preprocessing)
      -> vision_tower  laco.CompressedVisionEncoder, eager PyTorch, replicated   (n_img, P + h*w, C)
      -> feature select ("default" drops the P prefix tokens)                    (n_img, T, C)
      -> projector (laco's)                                                      (n_img, T, D)
      -> vLLM scatters them into the T placeholder tokens of each image
      -> language_model  vLLM's own implementation of text_config's architecture (Qwen2, Llama, ...):
         paged attention, continuous batching, prefix caching, CUDA graphs / torch.compile

T, the placeholder tokens per image, is ``LaCoConfig.num_image_tokens`` (from the compression config,
computed by the vision tower itself): a prompt's ``<image>`` is replaced by T image tokens.

Checkpoint layouts (both load): laco's on-disk layout ``vision_tower.* / projector.* / language_model.model.* /
language_model.lm_head.*`` (what ``save_pretrained`` writes; module names here match it) and the LLaVA layout
``model.vision_tower.* / model.projector.* (or model.multi_modal_projector.*) / model.language_model.* / lm_head.*``
(the in-memory names of ``LaCoForConditionalGeneration``).

Not supported (a clear error at load): AnyRes multi-crop, tensor or pipeline parallelism > 1, an image
token other than ``<image>`` (vLLM's chat front end inserts that string).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

from laco.model.config import LaCoConfig
from laco.model.modeling import build_vision_tower, image_features
from laco.model.processing import LaCoProcessor
from laco.model.projectors import create_projector

#: the placeholder string vLLM's chat front end writes for an image (LaCo's default image token)
IMAGE_PLACEHOLDER = "<image>"


class UnsupportedLaCoConfig(ValueError):
    """A LaCo checkpoint or engine setting this vLLM integration does not serve (yet)."""


def check_config(config: LaCoConfig, vllm_config: VllmConfig | None = None) -> None:
    """Raise ``UnsupportedLaCoConfig`` naming what is unsupported, before any weight is allocated."""
    anyres = getattr(config, "image_grid_pinpoints", None) or getattr(config, "use_image_newline", False)
    if anyres:
        raise UnsupportedLaCoConfig(
            f"this LaCo model uses LLaVA-OneVision's AnyRes layout (image_grid_pinpoints="
            f"{config.image_grid_pinpoints!r}, image_newline={config.use_image_newline}); the vLLM plugin serves one "
            f"{config.image_size}x{config.image_size} view per image only (AnyRes is not supported yet)"
        )
    if config.image_token != IMAGE_PLACEHOLDER:
        raise UnsupportedLaCoConfig(
            f"the model's image token is {config.image_token!r}; the vLLM plugin needs {IMAGE_PLACEHOLDER!r} "
            f"(the placeholder vLLM's chat front end inserts)"
        )
    if config.image_token_id is None:
        raise UnsupportedLaCoConfig("the model's config has no image_token_id")
    if vllm_config is not None:
        par = vllm_config.parallel_config
        if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
            raise UnsupportedLaCoConfig(
                f"tensor_parallel_size={par.tensor_parallel_size}, pipeline_parallel_size="
                f"{par.pipeline_parallel_size}: the LaCo vLLM plugin runs on one device only "
                f"(its vision tower is not tensor-parallel; parallel serving is not supported yet)"
            )


# -- processing: prompt -> placeholder tokens, images -> pixel_values ------------------------------
class LaCoProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> LaCoConfig:
        return self.ctx.get_hf_config(LaCoConfig)

    def get_hf_processor(self, **kwargs: object) -> LaCoProcessor:
        processor = self.ctx.get_hf_processor(LaCoProcessor, **kwargs)
        if getattr(processor, "image_grid_pinpoints", None) or getattr(processor, "image_newline", False):
            raise UnsupportedLaCoConfig(
                f"the saved processor uses AnyRes (image_grid_pinpoints={processor.image_grid_pinpoints}, "
                f"image_newline={processor.image_newline}); "
                f"the vLLM plugin serves one view per image only (AnyRes is not supported yet)"
            )
        if processor.num_image_tokens != self.num_image_tokens:
            raise UnsupportedLaCoConfig(
                f"the saved processor expands <image> to {processor.num_image_tokens} tokens but the model's "
                f"compression config gives {self.num_image_tokens}: processor and model do not belong together"
            )
        return processor

    @cached_property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image, from the compression config (never hard-coded)."""
        return self.get_hf_config().num_image_tokens

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # vLLM asks this at start-up (encoder budget): check the saved processor there, so that an
        # unsupported one fails at load rather than at the first request
        self.get_hf_processor()
        return {"image": self.num_image_tokens}  # every image is resized to one size: one token count


class LaCoDummyInputsBuilder(BaseDummyInputsBuilder[LaCoProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_config().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions):
        size = self.info.get_hf_config().image_size
        return {
            "image": self._get_dummy_images(
                width=size, height=size, num_images=mm_counts.get("image", 0), overrides=mm_options.get("image")
            )
        }


class LaCoMultiModalProcessor(BaseMultiModalProcessor[LaCoProcessingInfo]):
    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str:
        # LaCoProcessor checks that placeholders and images match: give it one <image> per image
        return self.dummy_inputs.get_dummy_text(mm_counts)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        token_id = self.info.get_hf_config().image_token_id
        return [PromptReplacement(modality="image", target=[token_id],
                                  replacement=[token_id] * self.info.num_image_tokens)]


# -- the model ------------------------------------------------------------------------------------
@MULTIMODAL_REGISTRY.register_processor(
    LaCoMultiModalProcessor, info=LaCoProcessingInfo, dummy_inputs=LaCoDummyInputsBuilder
)
class LaCoVLLMForConditionalGeneration(nn.Module, SupportsMultiModal):
    """LaCo in vLLM: laco's vision tower and projector (eager), vLLM's language model."""

    # the LLaVA layout -> the module names here (laco's on-disk layout is already these names)
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "projector.",
            "model.projector.": "projector.",
            "model.language_model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError(f"LaCo models take images only, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: LaCoConfig = vllm_config.model_config.hf_config
        check_config(config, vllm_config)
        self.config = config
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_id]
        )
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = build_vision_tower(config)
            self.projector = create_projector(
                config.projector_type, self.vision_tower.hidden_size, config.text_config.hidden_size
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config, prefix=maybe_prefix(prefix, "language_model")
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """``pixel_values`` (n_img, 3, S, S) -> (n_img, T, D), image after image in prompt order."""
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        return image_features(self.vision_tower, self.projector, self.config, pixel_values)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        # vLLM has already merged the image embeddings into inputs_embeds (embed_multimodal + embed_input_ids)
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
