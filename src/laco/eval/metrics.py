"""Answer metrics for VQA-style evaluation: one score in [0, 1] per (prediction, record).

Four metrics, chosen per record by its ``"metric"`` field:

- ``exact``:   normalised exact match (lowercase, number words -> digits, punctuation and articles
               removed, whitespace collapsed; the VQAv2 answer processing, simplified).
- ``mc``:      multiple choice; the gold answer is an option letter ("B") or the option text, the
               prediction may be a letter ("B", "(B)", "B.", "Answer: B") or the option text.
- ``anls``:    Average Normalised Levenshtein Similarity (DocVQA): ``1 - NL`` when the normalised
               edit distance ``NL < 0.5``, else 0; the best over the acceptable answers.
- ``numeric``: the first number in the prediction within a relative tolerance of the answer
               (ChartQA's relaxed accuracy uses 5 %).

A gold answer may also be a list of acceptable answers: the score is the best over them.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "METRICS", "anls", "exact_match", "levenshtein", "list_metrics", "multiple_choice", "normalize_answer",
    "numeric_match", "parse_choice", "parse_number", "score_prediction",
]

_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18",
    "nineteen": "19", "twenty": "20", "none": "0",
}
_ARTICLES = {"a", "an", "the"}
# a period or comma inside a number ("3.5", "1,000") is part of the number, not punctuation
_NUMBER_PUNCT = re.compile(r"(?<=\d)[.,](?=\d)")
_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: Any) -> str:
    """'The Two cats.' -> '2 cats'; '1,000' -> '1000'; '3.50' -> '3.5' (numbers in canonical form)."""
    s = str(text).lower().strip()
    s = _NUMBER_PUNCT.sub(lambda m: "." if m.group(0) == "." else "", s)  # keep decimals, drop thousands commas
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)  # a period not between digits is punctuation
    s = s.translate(str.maketrans({c: " " for c in string.punctuation if c != "."}))
    words = [w for w in s.split() if w not in _ARTICLES]
    out: list[str] = []
    for w in words:
        w = _NUMBER_WORDS.get(w, w)
        if re.fullmatch(r"-?\d+\.\d+", w):  # '3.50' -> '3.5', '2.0' -> '2'
            w = f"{float(w):g}" if abs(float(w)) < 1e15 else w
        out.append(w)
    return " ".join(out)


def _as_answers(answer: Any) -> list[Any]:
    """A gold answer, or a list of acceptable ones -> a non-empty list."""
    answers = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    if not answers:
        raise ValueError("empty list of acceptable answers")
    return answers


def exact_match(prediction: str, answer: Any) -> float:
    """1.0 when the normalised prediction equals a normalised acceptable answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _as_answers(answer)))


# --- multiple choice ------------------------------------------------------------------------------

_LETTERS = string.ascii_uppercase
_LETTER_PATTERNS = [
    re.compile(r"^\s*\(?([A-Z])\)?\s*$"),                                # "B", "(B)"
    re.compile(r"^\s*\(?([A-Z])[\).:]"),                                 # "B.", "(B) cat", "B: cat"
    re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\b", re.IGNORECASE),  # "The answer is B"
]


def parse_choice(text: Any, choices: Sequence[str]) -> int | None:
    """The option index a text names, or None: a letter within range, else exactly one option's text.

    Letters are matched case-sensitively at the start (so the word "a" is not option A), except after
    "answer is" / "option" / "choice". Option text: an exact normalised match wins, else the single
    option whose normalised text occurs in the prediction as whole words.
    """
    s = str(text).strip()
    for pattern in _LETTER_PATTERNS:
        m = pattern.search(s)
        if m:
            idx = _LETTERS.index(m.group(1).upper())
            if idx < len(choices):
                return idx
    norm = normalize_answer(s)
    norm_choices = [normalize_answer(c) for c in choices]
    if norm in norm_choices:
        return norm_choices.index(norm)
    found = [i for i, c in enumerate(norm_choices) if c and re.search(rf"(^| ){re.escape(c)}( |$)", norm)]
    return found[0] if len(found) == 1 else None


def multiple_choice(prediction: str, answer: Any, choices: Sequence[str]) -> float:
    """1.0 when the prediction names the gold option (by letter or by text), else 0.0."""
    if not choices:
        raise ValueError("multiple-choice scoring needs a non-empty 'choices' list")
    if len(choices) > len(_LETTERS):
        raise ValueError(f"at most {len(_LETTERS)} choices are supported, got {len(choices)}")
    gold = parse_choice(answer, choices)
    if gold is None:
        raise ValueError(f"answer {answer!r} is neither an option letter A-{_LETTERS[len(choices) - 1]} "
                         f"nor the text of one of the choices {list(choices)}")
    return float(parse_choice(prediction, choices) == gold)


# --- ANLS -----------------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute, each cost 1); O(len(a) * len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answer: Any, threshold: float = 0.5) -> float:
    """DocVQA ANLS for one question: max over answers of ``1 - NL`` if ``NL < threshold`` else 0.

    ``NL = levenshtein(p, g) / max(len(p), len(g))`` on lowercased, whitespace-collapsed strings.
    """
    pred = " ".join(str(prediction).lower().split())
    best = 0.0
    for gold in _as_answers(answer):
        g = " ".join(str(gold).lower().split())
        if not pred and not g:
            return 1.0
        nl = levenshtein(pred, g) / max(len(pred), len(g))
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# --- numeric --------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.IGNORECASE)


def parse_number(text: Any) -> float | None:
    """The first number in a text: '-1,234.5 kg' -> -1234.5, 'two' -> 2.0, '45%' -> 45.0; None if none."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text)
    s = _NUMBER_PUNCT.sub(lambda m: "." if m.group(0) == "." else "", str(text).lower())
    m = _NUMBER_RE.search(s)
    if m:
        return float(m.group(0))
    for word in re.findall(r"[a-z]+", s):
        if word in _NUMBER_WORDS:
            return float(_NUMBER_WORDS[word])
    return None


def numeric_match(prediction: str, answer: Any, rel_tol: float = 0.05) -> float:
    """1.0 when the first number in the prediction is within ``rel_tol`` (relative) of an answer.

    A gold answer of 0 needs an exact 0 (relative tolerance of 0 is 0).
    """
    pred = parse_number(prediction)
    if pred is None:
        return 0.0
    for gold in _as_answers(answer):
        g = parse_number(gold)
        if g is None:
            raise ValueError(f"numeric answer {gold!r} contains no number")
        if math.isclose(pred, g, rel_tol=rel_tol, abs_tol=0.0) or pred == g:
            return 1.0
    return 0.0


# --- dispatch -------------------------------------------------------------------------------------

METRICS: dict[str, Callable[..., float]] = {
    "exact": exact_match,
    "mc": multiple_choice,
    "anls": anls,
    "numeric": numeric_match,
}


def list_metrics() -> list[str]:
    return sorted(METRICS)


def score_prediction(prediction: str, record: Mapping[str, Any]) -> float:
    """Score one prediction against an eval record (its ``metric``, ``answer`` and, for mc, ``choices``).

    Raises ValueError naming the record id for an unknown metric or an unusable answer.
    """
    metric = record.get("metric")
    rid = record.get("id", "?")
    if metric not in METRICS:
        raise ValueError(f"record {rid!r}: unknown metric {metric!r}; expected one of {list_metrics()}")
    try:
        if metric == "mc":
            return multiple_choice(prediction, record["answer"], record.get("choices") or [])
        return METRICS[metric](prediction, record["answer"])
    except ValueError as err:
        raise ValueError(f"record {rid!r}: {err}") from None
