"""Build the model and processor a run config's ``model`` section names (what ``laco train`` trains).

* ``pretrained: DIR``: a saved LaCo model with its processor (``AutoModelForImageTextToText`` /
  ``AutoProcessor`` after ``import laco``), e.g. the output of an earlier stage or ``laco convert``.
* ``vision: DIR, llm: DIR`` (+ ``compression``, ``projector_type``): pretrained parts on disk; the
  tokenizer is the LLM's (a ChatML template is set if it has none), the image processor the encoder's
  (its ``preprocessor_config.json``, size set to the model's; without one, the family's statistics),
  compressors and projector are new.
* ``tiny: {...}``: the tiny test model (``laco.model.testing``), for demos and tests.

New weights are initialised after ``set_seed(seed)``, so the same config builds the same model.
"""

from __future__ import annotations

from pathlib import Path

from laco.train.config import ModelSource


def build_from_source(source: ModelSource | None, seed: int = 0):
    """``(model, processor)`` for a run config's ``model`` section; see the module docstring."""
    from accelerate.utils import set_seed

    import laco.model  # noqa: F401  (registers the Auto classes)

    if source is None:
        raise ValueError("the run config has no 'model' section: laco train needs one of pretrained, vision+llm, tiny")
    source.validate()
    set_seed(seed)
    if source.pretrained is not None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(source.pretrained)
        for name in ("config.json", "processor_config.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"model.pretrained {str(path)!r} holds no {name} (a saved LaCo model and processor)")
        return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
    if source.tiny is not None:
        from laco.model.testing import tiny_laco_model, tiny_laco_processor

        model = tiny_laco_model(seed=seed, **source.tiny)
        return model, tiny_laco_processor(model.config)
    from transformers import AutoTokenizer

    from laco.model import LaCoForConditionalGeneration
    from laco.model.processing import LaCoProcessor
    from laco.model.tokenizer import CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(source.llm)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        raise ValueError(f"the tokenizer in {source.llm!r} has no pad token; set one in its tokenizer_config.json")
    kwargs = {} if source.projector_type is None else {"projector_type": source.projector_type}
    model = LaCoForConditionalGeneration.from_parts(source.vision, source.llm, compression=source.compression,
                                                    tokenizer=tokenizer, **kwargs)
    # the encoder's own image processor (statistics, resize / crop) where its folder has one; else the family's
    vision_processor = source.vision if (Path(source.vision) / "preprocessor_config.json").is_file() else None
    return model, LaCoProcessor.from_model_config(model.config, tokenizer, image_processor=vision_processor)
