"""Serving LaCo models on vLLM.

``register()`` is laco's ``vllm.general_plugins`` entry point: vLLM calls it in every process it starts
(front end, engine core, workers) once laco is installed next to it, so that ``vllm.LLM(model=DIR)`` and
``vllm serve DIR`` load a folder saved by ``LaCoForConditionalGeneration.save_pretrained`` (or made by
``laco convert``) with no extra flags. It

* imports ``laco.model``, which registers ``model_type="laco"`` with ``AutoConfig`` / ``AutoProcessor``
  (vLLM reads the config and builds the processor through them), and
* registers the architecture ``LaCoForConditionalGeneration`` with vLLM's ``ModelRegistry``, lazily (the
  class in ``laco.serve.vllm_model`` is imported only when a LaCo model is loaded).

This module does not import vLLM (nor the model class) at import time. See ``docs/serving.md``.
"""

from __future__ import annotations

#: the ``architectures`` entry of a saved LaCo ``config.json``
ARCHITECTURE = "LaCoForConditionalGeneration"
#: vLLM's lazy ``"<module>:<class>"`` reference to the engine-side implementation
VLLM_MODEL_CLASS = "laco.serve.vllm_model:LaCoVLLMForConditionalGeneration"


def register() -> None:
    """Register LaCo with vLLM (idempotent: vLLM may call it several times per process)."""
    from vllm import ModelRegistry

    import laco.model  # noqa: F401  (AutoConfig / AutoProcessor registration of model_type "laco")

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, VLLM_MODEL_CLASS)
