"""The blind (text-only) baseline: majority training answer per question, scored like the evaluator."""

import json
import random

import pytest
from PIL import Image

from laco.data.llava import BadRecordError
from laco.eval import load_records
from laco.eval.blind import blind_baseline, majority_answers, question_key, score_blind
from laco.eval.evaluator import MC_INSTRUCTION


def conv(*turns):
    """('q', 'a', 'q2', 'a2') -> LLaVA conversations; the first user turn carries the image placeholder."""
    out = []
    for i, text in enumerate(turns):
        role = "human" if i % 2 == 0 else "gpt"
        out.append({"from": role, "value": ("<image>\n" + text) if i == 0 else text})
    return out


MC_QUESTION = f"Which is it?\nA. cat\nB. dog\n{MC_INSTRUCTION}"
TRAIN = [
    # "How many?": normalised "2" (Two, Two, 2 and Two in m0) beats "3" (three, three); its spelling: "Two"
    *({"id": f"c{i}", "image": "x.png", "conversations": conv("How many?", a)}
      for i, a in enumerate(["Two", "three", "Two", "2", "three"])),
    # a tie between "cat" and "dog": the smaller normalised answer, whatever the file order
    {"id": "t0", "image": "x.png", "conversations": conv("What animal?", "dog")},
    {"id": "t1", "image": "x.png", "conversations": conv("What animal?", "cat")},
    # second turns count as questions of their own
    {"id": "m0", "image": "x.png", "conversations": conv("How many?", "Two", "What colour is the dot?", "red")},
    {"id": "mc", "image": "x.png", "conversations": conv(MC_QUESTION, "B")},
]
TEST = [
    {"id": "q1", "image": "img.png", "question": "How many?", "answer": "2", "metric": "exact", "task": "count"},
    {"id": "q2", "question": "How  many?", "answer": "3", "metric": "exact", "task": "count"},
    {"id": "q3", "question": "What animal?", "answer": "cat", "metric": "exact", "task": "animal"},
    {"id": "q4", "question": "What colour is the dot?", "answer": "red", "metric": "exact", "task": "dot",
     "history": [["How many?", "2"]]},
    {"id": "q5", "question": "Which is it?", "choices": ["cat", "dog"], "answer": "B", "metric": "mc", "task": "mc"},
    # never asked in training: the overall majority answer ("2", spelt "Two") against gold "two"
    {"id": "q6", "question": "Is it new?", "answer": "two", "metric": "exact", "task": "unseen"},
]


@pytest.fixture
def files(tmp_path):
    train, test = tmp_path / "train.json", tmp_path / "test.jsonl"
    train.write_text(json.dumps(TRAIN))
    test.write_text("".join(json.dumps(r) + "\n" for r in TEST))
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    return train, test


def test_blind_baseline_from_files(files):
    result = blind_baseline(*files)
    # q1 right (Two == 2), q2 wrong (3), q3 right (tie -> cat), q4 right, q5 right (B), q6 right (fallback Two)
    assert result.predictions == {"q1": "Two", "q2": "Two", "q3": "cat", "q4": "red", "q5": "B", "q6": "Two"}
    assert result.accuracy == pytest.approx(100 * 5 / 6)
    assert result.per_task == {"animal": 100.0, "count": 50.0, "dot": 100.0, "mc": 100.0, "unseen": 100.0}
    assert result.coverage == pytest.approx(100 * 5 / 6) and result.num_questions == 6
    assert json.loads(json.dumps(result.as_dict()))["accuracy"] == result.accuracy


def test_majority_does_not_depend_on_the_file_order(files):
    records = load_records(files[1])
    base = score_blind(majority_answers(TRAIN), records).predictions
    rng = random.Random(0)
    for _ in range(5):
        shuffled = TRAIN[:]
        rng.shuffle(shuffled)
        assert score_blind(majority_answers(shuffled), records).predictions == base


def test_question_key_ignores_image_placeholders_and_spacing():
    assert question_key("<image>\n  What   is it?\n") == question_key("What is it?") == "What is it?"


def test_bad_training_record_is_named():
    bad = [{"id": "broken", "conversations": [{"from": "gpt", "value": "hi"}]}]
    with pytest.raises(BadRecordError, match="broken"):
        majority_answers(bad)
    with pytest.raises(ValueError, match="no question-answer pair"):
        majority_answers([])
