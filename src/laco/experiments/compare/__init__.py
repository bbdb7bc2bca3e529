"""``laco compare``: LaCo against external and in-encoder baselines on the embedded scenes.

Every method gives the LLM the same visual-token budget (r = 2: 8x8 -> 4x4 = 16 tokens), except
``none`` (64 tokens, the uncompressed reference)::

    none                  no compression
    pixel_shuffle@post    pixel shuffle + MLP after the encoder
    laco@post             LaCo PML after the encoder (LaCo@1)
    laco@1/4 ...          inside the encoder after k = L/4 layers: laco, pixel_shuffle (no shortcut),
                          avg_pool, ldpv2, tokenpacker, tome; the fair variants (a pixel shuffle that
                          starts as pooling, LaCo from a random start, LDPv2 / TokenPacker with the
                          shortcut: ``presets.PS_AVG_INIT`` ...); and laco at 1/12 and 1/2

The MLLM is ``laco.LaCoForConditionalGeneration``: the embedded pretrained SigLIP-structured
encoder (``laco.experiments.pretrain``), an ``mlp2x_gelu`` projector and a small Qwen2 LLM built
in code, with a small byte-level BPE (``train_small_tokenizer``): the answers use a few dozen
words, and the real Qwen2 vocabulary (151k) would make the output softmax cost ~100x the rest of a
width-128 LLM. The LLM is first trained on the questions and answers as text (no image), so that
stage 1 has a language model to align to, as LLaVA's does.

A **seed is a replicate**: seed s pretrains its own encoder (``pretrain.seed = s``, cached) and text LLM
and draws its own data order; within a seed every method starts from the same projector weights
(``steps.derive_seed``: one random stream per role). Scenarios:

* **readout**: the feasibility study's protocol on the same encoder: insert the compressor and train
  only it against the encoder's frozen, pretrained quadrant read-out (a pretrained, frozen consumer).
  Not applicable to compressors whose output is not a grid (ToMe).
* **train**: encoder frozen. Stage 1 trains compressor + projector (LLM frozen); stage 2 also the LLM.
* **train_encoder**: the same stage 1, then stage 2 also trains the encoder's layers at a lower rate
  (LLaVA-OneVision's stage 2).
* **retrofit**: start from the trained uncompressed MLLM (the train scenario's ``none`` model of the
  same seed), insert the compressor, train only the compressor, everything else frozen; accuracy is
  measured before and after.

Every MLLM table also has the **blind baseline** (the most frequent training answer per question,
``laco.eval.blind``) and the **text-only LLM** (the seed's LLM without the image).

Speed: the frozen part of the encoder (its first k layers; the embeddings for ``train_encoder``) never
changes, so its output is computed once per image (``cache_hidden_states``) and training runs from
there (``image_features_from_hidden``). ``tests/test_compare.py`` checks that this gives the same loss
as the model's own forward from pixels. Throughput is ``laco bench``'s job, not this experiment's.

Accuracy is greedy exact match, computed in one teacher-forced pass: greedy decoding produces the
reference answer (then ``<|im_end|>``) if and only if the argmax at every answer position is the
reference token, so no ``generate`` loop is needed. ``eval_split: val`` evaluates on the val split
(for choosing a recipe); the reported numbers use test.

Modules: ``presets`` (methods, scenarios, ``ComparePreset``, ``load_preset``), ``text`` (conversations,
tokenizer, tokenised splits), ``steps`` (seeds, model building, cached forward, training steps,
evaluation), ``pipeline`` (``prepare_data``, ``prepare``, ``run_train``, ``run_retrofit``,
``run_readout``, ``run_seed``, ``run_compare``), ``parallel`` (the methods' jobs in forked single-thread
workers: ``workers: 2`` on 2 cores; same rows as one process), ``results`` (aggregation, baselines,
contrasts, ``merge_results``), ``userdata`` (``laco compare --data``: the MLLM scenarios on your own LLaVA data,
with a vision encoder / LLM from disk or the embedded ones; ``UserSource``, ``UserDataset``);
the report (markdown, plots) is ``laco.experiments.report``.
"""

from laco.experiments.compare.pipeline import (
    Context, Shared, prepare, prepare_data, run_compare, run_readout, run_retrofit, run_seed, run_train,
)
from laco.experiments.compare.presets import (
    DEFAULT_METHODS, PRESETS, SCENARIOS, ComparePreset, LLMConfig, load_preset, parse_methods,
)
from laco.experiments.compare.results import CONTRASTS, aggregate, baseline_rows, contrasts, merge_results
from laco.experiments.compare.steps import (
    build_model, cache_hidden_states, derive_seed, evaluate_cached, evaluate_text_only, image_features_from_hidden,
    lm_logits_and_loss, start_layer, summarize, train_steps,
)
from laco.experiments.compare.text import TokenizedSplit, build_tokenizer, conversations, tokenize_split

__all__ = [
    "CONTRASTS", "DEFAULT_METHODS", "PRESETS", "SCENARIOS", "ComparePreset", "Context", "LLMConfig", "Shared",
    "TokenizedSplit", "aggregate", "baseline_rows", "build_model", "build_tokenizer", "cache_hidden_states",
    "contrasts", "conversations", "derive_seed", "evaluate_cached", "evaluate_text_only", "image_features_from_hidden",
    "lm_logits_and_loss", "load_preset", "merge_results", "parse_methods", "prepare", "prepare_data", "run_compare",
    "run_readout", "run_retrofit", "run_seed", "run_train", "start_layer", "summarize", "tokenize_split", "train_steps",
]
