"""Eval: metrics against hand-worked cases, the evaluator on a tiny model, resume, and bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from laco.eval import metrics as M
from laco.eval.evaluator import build_messages, evaluate, load_records

# ---------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Two cats.", "2 cats"),     # article, number word, trailing period
        ("an apple!", "apple"),
        ("1,000", "1000"),               # thousands comma is not punctuation
        ("3.50", "3.5"),                 # decimals kept, canonical
        ("2.0", "2"),
        ("  Red,  BLUE ", "red blue"),   # punctuation -> space, whitespace collapsed
        ("t-shirt", "t shirt"),
    ],
)
def test_normalize_answer(text, expected):
    assert M.normalize_answer(text) == expected


def test_exact_match():
    assert M.exact_match("A dog.", "dog") == 1.0
    assert M.exact_match("two", 2) == 1.0            # numeric gold answer, number word prediction
    assert M.exact_match("dogs", "dog") == 0.0
    assert M.exact_match("cat", ["dog", "Cat"]) == 1.0  # any acceptable answer


@pytest.mark.parametrize(
    "pred, expected",
    [("B", 1.0), ("(B)", 1.0), ("B. dog", 1.0), ("The answer is B", 1.0), ("dog", 1.0), ("a dog", 1.0),
     ("A", 0.0), ("cat", 0.0), ("C", 0.0), ("cat or dog", 0.0), ("", 0.0), ("Z", 0.0)],
)
def test_multiple_choice_letter_gold(pred, expected):
    assert M.multiple_choice(pred, "B", ["cat", "dog", "bird"]) == expected


def test_multiple_choice_text_gold_and_bad_gold():
    assert M.multiple_choice("C", "bird", ["cat", "dog", "bird"]) == 1.0
    assert M.multiple_choice("bird", "bird", ["cat", "dog", "bird"]) == 1.0
    with pytest.raises(ValueError, match="neither an option letter"):
        M.multiple_choice("A", "fish", ["cat", "dog", "bird"])
    with pytest.raises(ValueError, match="non-empty 'choices'"):
        M.multiple_choice("A", "A", [])


def test_levenshtein_hand_worked():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.levenshtein("flaw", "lawn") == 2
    assert M.levenshtein("same", "same") == 0


def test_anls_hand_worked():
    # "helo" vs "hello": distance 1, max length 5 -> NL 0.2 -> 0.8
    assert M.anls("helo", "hello") == pytest.approx(0.8)
    # case and spacing are normalised
    assert M.anls("  Hello   World ", "hello world") == 1.0
    # "abc" vs "xyz": NL = 1 >= 0.5 -> 0
    assert M.anls("abc", "xyz") == 0.0
    # exactly at the threshold counts as wrong: "ab" vs "cd"... NL = 1; "abcd" vs "abxy": NL 0.5 -> 0
    assert M.anls("abcd", "abxy") == 0.0
    # "abcd" vs "abcx": NL 0.25 -> 0.75; best over several answers
    assert M.anls("abcd", ["zzzz", "abcx"]) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "text, expected",
    [("-1,234.5 kg", -1234.5), ("two", 2.0), ("45%", 45.0), ("about 3e2 m", 300.0), ("none here", 0.0),
     ("no number", None), (7, 7.0)],
)
def test_parse_number(text, expected):
    assert M.parse_number(text) == expected


def test_numeric_match_relative_tolerance():
    assert M.numeric_match("about 104", 100) == 1.0       # 4 % off, inside 5 %
    assert M.numeric_match("106", "100") == 0.0           # 6 % off
    assert M.numeric_match("106", 100, rel_tol=0.1) == 1.0
    assert M.numeric_match("0", 0) == 1.0
    assert M.numeric_match("0.001", 0) == 0.0             # relative tolerance of zero is zero
    assert M.numeric_match("no idea", 5) == 0.0
    with pytest.raises(ValueError, match="contains no number"):
        M.numeric_match("5", "many")


def test_score_prediction_unknown_metric_names_record():
    with pytest.raises(ValueError, match=r"record 'q7': unknown metric 'bleu'"):
        M.score_prediction("x", {"id": "q7", "metric": "bleu", "answer": "x"})
    with pytest.raises(ValueError, match=r"record 'q8'.*neither an option letter"):
        M.score_prediction("x", {"id": "q8", "metric": "mc", "answer": "fish", "choices": ["cat", "dog"]})
