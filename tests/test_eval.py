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


# ---------------------------------------------------------------------------------------- fixtures


def _write_image(path: Path, seed: int, size=(40, 52)) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


RECORDS = [
    {"id": "q1", "image": "imgs/0.png", "question": "What colour is the ball?", "answer": "red",
     "metric": "exact", "task": "objects", "turn": 1},
    {"id": "q2", "image": "imgs/0.png", "question": "What is behind the ball?", "answer": "a tree",
     "metric": "exact", "task": "objects", "turn": 2, "history": [["What colour is the ball?", "red"]]},
    {"id": "q3", "image": "imgs/1.png", "question": "Which animal?", "answer": "B", "metric": "mc",
     "choices": ["cat", "dog", "bird"], "task": "animals"},
    {"id": "q4", "question": "How many legs has a spider?", "answer": 8, "metric": "numeric", "task": "count"},
    {"id": "q5", "images": ["imgs/0.png", "imgs/1.png"], "question": "Read the sign.", "answer": "exit",
     "metric": "anls", "task": "docs"},
]


def write_data(folder: Path, records=RECORDS) -> Path:
    for i in range(2):
        _write_image(folder / "imgs" / f"{i}.png", seed=i)
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tiny():
    from laco.model.processing import LaCoProcessor
    from laco.model.testing import tiny_laco_model, tiny_tokenizer

    model = tiny_laco_model(seed=0)
    return model, LaCoProcessor.from_model_config(model.config, tiny_tokenizer())


class OracleModel(torch.nn.Module):
    """Answers every question with a scripted reply; checks the batch it is given like the real model would."""

    def __init__(self, processor, replies: dict[str, str]):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.processor, self.replies = processor, replies
        self.rows_generated = 0

    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens=16, pad_token_id=0, **kw):
        tok = self.processor.tokenizer
        n_image_tokens = int((input_ids == self.processor.image_token_id).sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        assert n_image_tokens == n_images * self.processor.num_image_tokens
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left-padded"
        new = []
        for row in input_ids:
            prompt = tok.decode(row, skip_special_tokens=True)
            question = max((q for q in self.replies if q in prompt), key=prompt.rindex)  # the last one asked
            new.append(tok(self.replies[question], add_special_tokens=False)["input_ids"][:max_new_tokens])
        width = max(len(t) for t in new)
        pad = [t + [pad_token_id] * (width - len(t)) for t in new]
        self.rows_generated += len(new)
        return torch.cat([input_ids, torch.tensor(pad, dtype=input_ids.dtype)], dim=1)


# -------------------------------------------------------------------------------------- evaluator


def test_build_messages_history_image_and_choices(tmp_path):
    records = {r.id: r for r in load_records(write_data(tmp_path))}
    msgs = build_messages(records["q2"])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == "<image>\nWhat colour is the ball?"   # image goes with the first turn
    assert msgs[1]["content"] == "red" and msgs[2]["content"] == "What is behind the ball?"
    assert build_messages(records["q5"])[0]["content"].startswith("<image>\n<image>\nRead")
    assert "<image>" not in build_messages(records["q4"])[0]["content"]
    assert "\nA. cat\nB. dog\nC. bird\n" in build_messages(records["q3"])[0]["content"]
    assert records["q1"].turn == 1 and records["q2"].turn == 2 and records["q4"].task == "count"


def test_evaluate_tiny_model_batched_equals_unbatched(tmp_path, tiny):
    from laco.eval.evaluator import generate_answers

    model, processor = tiny
    records = load_records(write_data(tmp_path))
    one_by_one = [generate_answers(model, processor, [r], 5)[0] for r in records]
    batched = generate_answers(model, processor, records, 5)   # mixed 0/1/2 images, left padding
    assert batched == one_by_one


def test_evaluate_tiny_model_end_to_end(tmp_path, tiny):
    model, processor = tiny
    out = tmp_path / "out"
    summary = evaluate(model, processor, write_data(tmp_path), out_dir=out, batch_size=2, max_new_tokens=4,
                       progress=False)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in RECORDS]
    assert all(isinstance(r["prediction"], str) and 0.0 <= r["score"] <= 1.0 for r in rows)
    assert summary["num_samples"] == 5
    assert summary["accuracy"] == pytest.approx(sum(r["score"] for r in rows) / 5)
    assert set(summary["per_turn"]) == {"1", "2"} and summary["per_turn"]["1"]["n"] == 4
    assert set(summary["per_task"]) == {"objects", "animals", "count", "docs"}
    assert json.loads((out / "summary.json").read_text())["num_samples"] == 5
    assert "| objects | 2 |" in (out / "summary.md").read_text()
    assert (out / "summary.png").stat().st_size > 0
    assert not model.training


def test_evaluate_scores_scripted_answers(tmp_path, tiny):
    _, processor = tiny
    replies = {"What colour is the ball?": "Red.", "What is behind the ball?": "a bush",
               "Which animal?": "B", "spider?": "eight", "Read the sign.": "exlt"}
    oracle = OracleModel(processor, replies)
    summary = evaluate(oracle, processor, write_data(tmp_path), out_dir=tmp_path / "o", batch_size=3,
                       progress=False)
    # q1 exact 1, q2 exact 0, q3 mc 1, q4 numeric 1 ("eight" vs 8), q5 anls 1 - 1/4 = 0.75
    assert summary["per_task"]["objects"]["accuracy"] == pytest.approx(0.5)
    assert summary["per_turn"]["2"]["accuracy"] == 0.0
    assert summary["per_turn"]["1"]["accuracy"] == pytest.approx((1 + 1 + 1 + 0.75) / 4)
    assert summary["per_metric"]["anls"]["accuracy"] == pytest.approx(0.75)
    assert summary["accuracy"] == pytest.approx(3.75 / 5)


def test_evaluate_resumes_without_regenerating(tmp_path, tiny):
    _, processor = tiny
    data, out = write_data(tmp_path), tmp_path / "out"
    replies = {r["question"].split()[-1]: "x" for r in RECORDS}
    first = OracleModel(processor, replies)
    evaluate(first, processor, data, out_dir=out, batch_size=2, limit=2, progress=False)
    assert first.rows_generated == 2
    # a run killed mid-write leaves a torn last line: it is dropped and that sample redone
    with (out / "predictions.jsonl").open("a") as f:
        f.write('{"id": "q3", "pred')
    second = OracleModel(processor, replies)
    summary = evaluate(second, processor, data, out_dir=out, batch_size=2, progress=False)
    assert second.rows_generated == 3
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(r["id"] for r in RECORDS) and summary["num_samples"] == 5
    third = OracleModel(processor, replies)
    evaluate(third, processor, data, out_dir=out, progress=False)
    assert third.rows_generated == 0


# ------------------------------------------------------------------------------------- bad input


def _bad(tmp_path: Path, lines: list[str]) -> Path:
    write_data(tmp_path)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps(RECORDS[0])


@pytest.mark.parametrize(
    "line, error, pattern",
    [
        ('{"id": "q9", "question": "x", ', ValueError, r"bad.jsonl:2: malformed JSON line"),
        (json.dumps({**RECORDS[0], "id": "q9", "image": "imgs/missing.png"}), FileNotFoundError,
         r"bad.jsonl:2 \(record 'q9'\): image not found: .*missing.png"),
        (json.dumps({**RECORDS[0], "id": "q9", "metric": "bleu"}), ValueError,
         r"bad.jsonl:2 \(record 'q9'\): unknown metric 'bleu'"),
        (json.dumps({"id": "q9", "question": "x", "metric": "exact"}), ValueError,
         r"bad.jsonl:2 \(record 'q9'\): missing required field 'answer'"),
        (json.dumps({**RECORDS[2], "id": "q9", "choices": None}), ValueError, r"'q9'.*'mc' needs a 'choices' list"),
        (json.dumps({**RECORDS[2], "id": "q9", "answer": "fish"}), ValueError, r"'q9'.*neither an option letter"),
        (json.dumps({**RECORDS[0], "id": "q9", "history": [["only a question"]]}), ValueError, r"'q9'.*'history'"),
        (json.dumps({**RECORDS[0], "id": "q9", "question": "<image> What?"}), ValueError, r"'q9'.*contains '<image>'"),
        (GOOD, ValueError, r"bad.jsonl:2 \(record 'q1'\): duplicate id \(first on line 1\)"),
        ("[1, 2]", ValueError, r"bad.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_input_names_record_and_line(tmp_path, line, error, pattern):
    with pytest.raises(error, match=pattern):
        load_records(_bad(tmp_path, [GOOD, line]))


def test_bad_input_fails_before_any_generation(tmp_path, tiny):
    _, processor = tiny
    oracle = OracleModel(processor, {})
    path = _bad(tmp_path, [GOOD, json.dumps({**RECORDS[0], "id": "q9", "metric": "bleu"})])
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(oracle, processor, path, out_dir=tmp_path / "o", progress=False)
    assert oracle.rows_generated == 0 and not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match="eval data file not found"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        evaluate(oracle, processor, path, out_dir=tmp_path / "o", batch_size=0)


# -------------------------------------------------------------------------------------------- CLI


def test_cli_eval_on_saved_model(tmp_path, tiny, monkeypatch, capsys):
    import sys

    from laco.cli import main

    model, processor = tiny
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data = write_data(tmp_path)
    out = tmp_path / "cli_out"
    monkeypatch.setattr(sys, "argv", ["laco", "eval", str(model_dir), "--data", str(data), "--out", str(out),
                                      "--batch-size", "5", "--max-new-tokens", "3", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_samples"] == 5 and set(summary["per_turn"]) == {"1", "2"}
    # the saved model answers exactly as the in-memory one did (same weights, same prompts)
    expected = evaluate(model, processor, data, out_dir=tmp_path / "direct", max_new_tokens=3, progress=False)
    assert summary["accuracy"] == expected["accuracy"]
    direct = (tmp_path / "direct" / "predictions.jsonl").read_text().splitlines()
    saved = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x)["prediction"] for x in saved] == [json.loads(x)["prediction"] for x in direct]

    # user errors: one line, exit code 2
    monkeypatch.setattr(sys, "argv", ["laco", "eval", str(model_dir), "--data", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "eval data file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------- multi-turn probe


def test_multiturn_probe_on_embedded_data_reports_turns(tmp_path, tiny):
    """The embedded data's two-turn probe records load, render with history and are reported per turn."""
    embedded = pytest.importorskip("laco.data.embedded", reason="embedded data module not available")
    model, processor = tiny
    ds = embedded.build_embedded_dataset(
        embedded.EmbeddedDataConfig(num_train=2, num_val=2, num_test=12, source="generated"),
        out_dir=tmp_path / "data", progress=False)
    records = load_records(ds.eval_file("test"))
    second = [r for r in records if r.turn == 2]
    assert second, "the probe should contribute turn-2 records"
    for rec in second:
        msgs = build_messages(rec)
        assert [m["role"] for m in msgs] == ["user", "assistant", "user"] and msgs[0]["content"].startswith("<image>\n")
    summary = evaluate(model, processor, ds.eval_file("test"), out_dir=tmp_path / "out", batch_size=8,
                       max_new_tokens=2, progress=False)
    assert summary["per_turn"]["2"]["n"] == len(second) == summary["per_task"]["multiturn"]["n"] // 2
    assert summary["num_samples"] == len(records)
