"""``laco compare``: LaCo against external and in-encoder baselines on the embedded scenes, two scenarios.

Every method gives the LLM the same visual-token budget (r = 2: 8x8 -> 4x4 = 16 tokens), except
``none`` (64 tokens, the uncompressed reference)::

    none                  no compression
    ext_pixel_shuffle     pixel shuffle + MLP after the encoder       (layer "post")
    ext_laco              LaCo PML after the encoder (LaCo@1)         (layer "post")
    laco@1/4 ...          inside the encoder after k = L/4 layers: laco, pixel_shuffle (no shortcut),
                          avg_pool, ldpv2, tokenpacker, tome; and laco at 1/12 and 1/2

The MLLM is ``laco.LaCoForConditionalGeneration``: the embedded pretrained SigLIP-structured
encoder (``laco.experiments.pretrain``), an ``mlp2x_gelu`` projector and a small Qwen2 LLM built
in code, with a small byte-level BPE (``train_small_tokenizer``): the answers use a few dozen
words, and the real Qwen2 vocabulary (151k) would make the output softmax cost ~100x the rest of a
width-128 LLM. The LLM is first trained on the questions and answers as text (no image), so that
stage 1 has a language model to align to, as LLaVA's does.

Scenarios (the encoder is frozen throughout, as in LLaVA / LaCo stage 1):

* **readout**: the feasibility study's protocol on the same encoder: insert the compressor and train
  only it against the encoder's frozen, pretrained quadrant read-out (a pretrained, frozen consumer).
* **train**: pretrained encoder + new compressor and projector. Stage 1 trains compressor +
  projector (LLM frozen); stage 2 also trains the LLM.
* **retrofit**: start from the trained uncompressed MLLM (the train scenario's ``none`` model of the
  same seed), insert the compressor, train only the compressor, everything else frozen; accuracy is
  measured before and after.

Speed: because the encoder is frozen, the output of its first k layers never changes; it is
computed once per image (``cache_hidden_states``) and training runs layers k+1..L, the projector
and the LLM from there (``image_features_from_hidden``). ``tests/test_compare.py`` checks that this
gives the same loss as the model's own forward from pixels. Throughput is measured separately on
the real, uncached model.

Accuracy is greedy exact match, computed in one teacher-forced pass: greedy decoding produces the
reference answer (then ``<|im_end|>``) if and only if the argmax at every answer position is the
reference token, so no ``generate`` loop is needed.

Modules: ``presets`` (methods, scenarios, ``ComparePreset``, ``load_preset``), ``text`` (conversations,
tokenizer, tokenised splits), ``steps`` (model building, cached forward, training steps, evaluation,
throughput), ``pipeline`` (``prepare``, ``run_method``, ``run_readout``, ``run_compare``), ``results``
(aggregation, contrasts, ``merge_results``); the report (markdown, plots) is ``laco.experiments.report``.
"""

from laco.experiments.compare.pipeline import Context, prepare, run_compare, run_method, run_readout
from laco.experiments.compare.presets import (
    DEFAULT_METHODS, PRESETS, SCENARIOS, ComparePreset, LLMConfig, load_preset, parse_methods,
)
from laco.experiments.compare.results import CONTRASTS, aggregate, contrasts, merge_results
from laco.experiments.compare.steps import (
    build_model, cache_hidden_states, evaluate_cached, image_features_from_hidden, lm_logits_and_loss,
    measure_throughput, start_layer, summarize, train_steps,
)
from laco.experiments.compare.text import TokenizedSplit, build_tokenizer, conversations, tokenize_split

__all__ = [
    "CONTRASTS", "DEFAULT_METHODS", "PRESETS", "SCENARIOS", "ComparePreset", "Context", "LLMConfig", "TokenizedSplit",
    "aggregate", "build_model", "build_tokenizer", "cache_hidden_states", "contrasts", "conversations",
    "evaluate_cached", "image_features_from_hidden", "lm_logits_and_loss", "load_preset", "measure_throughput",
    "merge_results", "parse_methods", "prepare", "run_compare", "run_method", "run_readout", "start_layer",
    "summarize", "tokenize_split", "train_steps",
]
