"""Evaluation: answer metrics, the batched resumable evaluator, and an lmms-eval adapter (``laco.eval.lmms``).

    from laco.eval import evaluate
    summary = evaluate(model, processor, "data.jsonl", out_dir="runs/eval")   # summary["accuracy"], ["per_turn"]

``laco.eval.lmms`` imports lmms-eval and is not imported here (lmms-eval is an optional extra).
"""

from laco.eval.evaluator import EvalRecord, build_messages, evaluate, load_records, summarize
from laco.eval.metrics import (
    METRICS,
    anls,
    exact_match,
    list_metrics,
    multiple_choice,
    normalize_answer,
    numeric_match,
    score_prediction,
)

__all__ = [
    "METRICS", "EvalRecord", "anls", "build_messages", "evaluate", "exact_match", "list_metrics", "load_records",
    "multiple_choice", "normalize_answer", "numeric_match", "score_prediction", "summarize",
]
