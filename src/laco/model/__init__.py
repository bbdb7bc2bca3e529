"""The HF-native LaCo MLLM: config, model, projectors, processor, tokenizers, Auto registration.

Importing this package registers ``model_type="laco"`` with ``AutoConfig``, ``AutoModel`` (``LaCoModel``),
``AutoModelForImageTextToText`` and ``AutoProcessor`` (``import laco`` does it).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from laco.model.config import LaCoConfig
from laco.model.modeling import LaCoForConditionalGeneration, LaCoModel, LaCoPreTrainedModel
from laco.model.processing import LaCoProcessor
from laco.model.projectors import create_projector, list_projectors, register_projector

AutoConfig.register("laco", LaCoConfig, exist_ok=True)
AutoModel.register(LaCoConfig, LaCoModel, exist_ok=True)  # the base model, as for LLaVA
AutoModelForImageTextToText.register(LaCoConfig, LaCoForConditionalGeneration, exist_ok=True)
AutoProcessor.register(LaCoConfig, LaCoProcessor, exist_ok=True)

__all__ = [
    "LaCoConfig", "LaCoForConditionalGeneration", "LaCoModel", "LaCoPreTrainedModel", "LaCoProcessor",
    "create_projector", "list_projectors", "register_projector",
]
