"""A blind (text-only) baseline computed from data: answer every test question with its most frequent
training answer.

    from laco.eval.blind import blind_baseline
    result = blind_baseline("train.json", "test.jsonl")     # result.accuracy, result.per_task, result.coverage

A question is the text of a user turn (``<image>`` placeholders removed, whitespace collapsed); on the
test side it is the final turn exactly as the evaluator asks it (``format_question``: multiple-choice
options included), and the history is ignored. Training answers are grouped by the evaluator's
``normalize_answer``, so "Two" and "2" count as one answer; the prediction is the most frequent raw
spelling of the winning group. Ties go to the smaller normalised answer, so the result does not depend
on the order of the training file. A test question never seen in training gets the most frequent
answer of the whole training set. Every prediction is scored with the evaluator's ``score_prediction``,
so the baseline is on the same scale as a model's accuracy.

A model that reads the image should beat this number; one that does not is answering from the text.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from laco.data.llava import ROLE_MAP, normalize_record, read_records
from laco.eval.evaluator import IMAGE_PLACEHOLDER, EvalRecord, format_question, load_records
from laco.eval.metrics import normalize_answer, score_prediction

__all__ = ["BlindResult", "MajorityAnswers", "blind_baseline", "majority_answers", "question_key", "score_blind"]


def question_key(text: str) -> str:
    """The text a question is matched by: image placeholders removed, whitespace collapsed."""
    return " ".join(text.replace(IMAGE_PLACEHOLDER, " ").split())


def _majority(counts: Mapping[str, Counter]) -> str:
    """Most frequent normalised answer (ties: the smaller one), returned as its most frequent raw spelling."""
    best = min(counts, key=lambda norm: (-sum(counts[norm].values()), norm))
    spellings = counts[best]
    return min(spellings, key=lambda raw: (-spellings[raw], raw))


@dataclass(frozen=True)
class MajorityAnswers:
    """The blind guesser: a training question's majority answer, or the overall majority for unseen ones."""

    by_question: dict[str, str]
    fallback: str

    def predict(self, question: str) -> str:
        return self.by_question.get(question_key(question), self.fallback)


def majority_answers(train_records: Iterable[Any]) -> MajorityAnswers:
    """LLaVA-format records -> the majority answer of every (user turn, assistant turn) pair.

    Each record is validated with the data loader's ``normalize_record`` (a bad record raises its
    ``BadRecordError``, naming the record).
    """
    per_question: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    overall: dict[str, Counter] = defaultdict(Counter)
    for index, raw in enumerate(train_records):
        turns = normalize_record(raw, index)["conversations"]
        roles = [ROLE_MAP[t["from"]] for t in turns]
        for (role, turn), (next_role, reply) in zip(zip(roles, turns), zip(roles[1:], turns[1:])):
            if role == "user" and next_role == "assistant":
                answer = reply["value"].strip()
                norm = normalize_answer(answer)
                per_question[question_key(turn["value"])][norm][answer] += 1
                overall[norm][answer] += 1
    if not overall:
        raise ValueError("the training records hold no question-answer pair")
    return MajorityAnswers({q: _majority(c) for q, c in per_question.items()}, _majority(overall))


@dataclass(frozen=True)
class BlindResult:
    """Accuracy (%) of the majority-answer guesser, overall and per task; ``coverage``: % of test
    questions that occur in the training set."""

    accuracy: float
    per_task: dict[str, float]
    coverage: float
    num_questions: int
    predictions: dict[str, str] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "per_task": self.per_task, "coverage": self.coverage,
                "num_questions": self.num_questions}


def score_blind(guesser: MajorityAnswers, test_records: Sequence[EvalRecord]) -> BlindResult:
    """Score the guesser's answer to every test record with the evaluator's metric."""
    if not test_records:
        raise ValueError("no test records to score")
    scores: dict[str, list[float]] = defaultdict(list)
    predictions: dict[str, str] = {}
    seen = 0
    for record in test_records:
        question = format_question(record)
        seen += question_key(question) in guesser.by_question
        predictions[record.id] = guesser.predict(question)
        scores[record.task].append(score_prediction(predictions[record.id], record.scoring_view()))
    flat = [s for task in scores.values() for s in task]
    return BlindResult(
        accuracy=100.0 * sum(flat) / len(flat),
        per_task={task: 100.0 * sum(s) / len(s) for task, s in sorted(scores.items())},
        coverage=100.0 * seen / len(test_records),
        num_questions=len(test_records),
        predictions=predictions,
    )


def blind_baseline(train_file: str | os.PathLike, test_file: str | os.PathLike,
                   image_dir: str | os.PathLike | None = None) -> BlindResult:
    """The blind baseline of a LLaVA-format training file (.json/.jsonl) on an evaluation JSONL file.

    ``image_dir`` resolves the test file's images as in ``laco eval`` (default: the test file's folder);
    they are checked to exist (the same validation as the evaluator's), never opened.
    """
    return score_blind(majority_answers(read_records(Path(train_file))), load_records(test_file, image_dir))
