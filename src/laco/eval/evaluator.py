"""Batched, resumable VQA-style evaluation of a LaCo MLLM on a JSONL file.

One question per line (see docs/evaluation.md)::

    {"id": "q1", "image": "imgs/1.png", "question": "What is shown?", "answer": "cat", "metric": "exact",
     "task": "objects", "turn": 1, "history": [["earlier question", "earlier answer"]]}

``evaluate`` validates the whole file first (every bad line is reported with its line number and id
before any generation), then generates greedily in left-padded batches, appends one line per sample
to ``predictions.jsonl`` as it goes (so an interrupted run resumes where it stopped), and writes
``summary.json``, ``summary.md`` and ``summary.png`` (accuracy per task) at the end.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from laco.eval.metrics import list_metrics, parse_number, score_prediction
from laco.io import atomic_write_text
from laco.safety import OutputLock, check_output_path, open_image

__all__ = [
    "EvalRecord", "build_messages", "evaluate", "generate_texts", "load_records", "render_prompt", "summarize",
]

IMAGE_PLACEHOLDER = "<image>"
PREDICTIONS_FILE = "predictions.jsonl"
FINGERPRINT_FILE = "fingerprint.json"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass
class EvalRecord:
    """One evaluation question, validated. ``images`` are absolute paths (empty for text-only)."""

    id: str
    question: str
    answer: Any
    metric: str
    images: list[Path] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)
    task: str = "default"
    turn: int = 1
    line: int = 0  # 1-based line number in the data file, for error messages

    def scoring_view(self) -> dict[str, Any]:
        return {"id": self.id, "metric": self.metric, "answer": self.answer, "choices": self.choices}


# --- reading and validating the data file --------------------------------------------------------

def _where(path: Path, line: int, rid: Any = None) -> str:
    return f"{path}:{line}" + (f" (record {rid!r})" if rid is not None else "")


def _parse_record(raw: str, path: Path, line: int, image_dir: Path) -> EvalRecord:
    """One JSONL line -> EvalRecord; ValueError/FileNotFoundError naming the file, line and id."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{_where(path, line)}: malformed JSON line ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{_where(path, line)}: expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        raise ValueError(f"{_where(path, line)}: missing or invalid 'id' (a non-empty string), got {rid!r}")
    rid = str(rid)
    where = _where(path, line, rid)
    for key in ("question", "answer", "metric"):
        if key not in obj:
            raise ValueError(f"{where}: missing required field {key!r}")
    if not isinstance(obj["question"], str):
        raise ValueError(f"{where}: 'question' must be a string, got {type(obj['question']).__name__}")
    metric = obj["metric"]
    answers = obj["answer"] if isinstance(obj["answer"], list) else [obj["answer"]]
    if not answers or any(a is None or isinstance(a, (dict, list)) or str(a).strip() == "" for a in answers):
        raise ValueError(f"{where}: 'answer' must be a non-empty string or number (or a list of them), "
                         f"got {obj['answer']!r}")
    if metric == "numeric" and any(parse_number(a) is None for a in answers):
        raise ValueError(f"{where}: metric 'numeric' needs a numeric 'answer', got {obj['answer']!r}")
    if metric not in list_metrics():
        raise ValueError(f"{where}: unknown metric {metric!r}; expected one of {list_metrics()}")
    choices = obj.get("choices") or []
    if metric == "mc" and (not isinstance(choices, list) or len(choices) < 2):
        raise ValueError(f"{where}: metric 'mc' needs a 'choices' list of at least 2 options, got {choices!r}")
    if "image" in obj and "images" in obj:
        raise ValueError(f"{where}: give either 'image' or 'images', not both")
    names = obj.get("images", [obj["image"]] if "image" in obj else [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: 'images' must be a list of relative paths, got {names!r}")
    images = [image_dir / n for n in names]
    for img in images:
        if not img.is_file():
            raise FileNotFoundError(f"{where}: image not found: {img}")
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history
    ):
        raise ValueError(f"{where}: 'history' must be a list of [question, answer] string pairs, got {history!r}")
    if any(IMAGE_PLACEHOLDER in text for text in [obj["question"], *(x for turn in history for x in turn)]):
        raise ValueError(f"{where}: the text contains {IMAGE_PLACEHOLDER!r}; the evaluator adds one placeholder "
                         f"per image itself, remove it from the question/history")
    turn = obj.get("turn", len(history) + 1)
    if not isinstance(turn, int) or isinstance(turn, bool) or turn < 1:
        raise ValueError(f"{where}: 'turn' must be a positive integer, got {turn!r}")
    record = EvalRecord(
        id=rid, question=obj["question"], answer=obj["answer"], metric=metric, images=images,
        choices=[str(c) for c in choices], history=[(q, a) for q, a in history],
        task=str(obj.get("task", "default")), turn=turn, line=line,
    )
    try:  # an unusable gold answer (e.g. an mc answer naming no option) is a data error: report it now
        score_prediction("", record.scoring_view())
    except ValueError as err:
        raise ValueError(f"{_where(path, line)}: {err}") from None
    return record


def load_records(data_file: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> list[EvalRecord]:
    """Read and validate a JSONL eval file; images are resolved against ``image_dir`` (default: the file's folder).

    Blank lines are skipped; duplicate ids are an error (resume is keyed by id).
    """
    path = Path(data_file)
    if not path.is_file():
        raise FileNotFoundError(f"eval data file not found: {path}")
    root = Path(image_dir) if image_dir is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image directory not found: {root}")
    records: list[EvalRecord] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            rec = _parse_record(raw, path, line_no, root)
            if rec.id in first_line:
                raise ValueError(f"{_where(path, line_no, rec.id)}: duplicate id (first on line {first_line[rec.id]})")
            first_line[rec.id] = line_no
            records.append(rec)
    if not records:
        raise ValueError(f"eval data file {path} has no records")
    return records


# --- prompts --------------------------------------------------------------------------------------

def format_question(record: EvalRecord) -> str:
    """The user text of the final turn: the question, plus lettered options for multiple choice."""
    if record.metric != "mc":
        return record.question
    options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(record.choices))
    return f"{record.question}\n{options}\n{MC_INSTRUCTION}"


def build_messages(record: EvalRecord) -> list[dict[str, str]]:
    """History turns (teacher-forced) + the question; one "<image>\\n" per image before the first user turn."""
    turns = [*record.history, (format_question(record), None)]
    messages: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(turns):
        if i == 0 and record.images:
            question = f"{IMAGE_PLACEHOLDER}\n" * len(record.images) + question
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def render_prompt(processor: Any, messages: list[dict[str, str]]) -> str:
    """Chat template -> prompt text ending with the assistant generation prefix."""
    templater = processor if hasattr(processor, "apply_chat_template") else processor.tokenizer
    return templater.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --- generation -----------------------------------------------------------------------------------

def _load_images(record: EvalRecord) -> list[Any]:
    try:
        return [open_image(p) for p in record.images]
    except ValueError as err:
        raise ValueError(f"record {record.id!r} (line {record.line}): {err}") from None


def check_images(records: Sequence[EvalRecord], data_file: Path) -> None:
    """Decode every image once before any generation: a bad image fails the run up front, naming its line."""
    seen: set[Path] = set()
    for rec in records:
        for p in rec.images:
            if p not in seen:
                seen.add(p)
                try:
                    open_image(p)
                except ValueError as err:
                    raise ValueError(f"{_where(data_file, rec.line, rec.id)}: {err}") from None


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


@torch.inference_mode()
def generate_texts(
    model: Any, processor: Any, prompts: Sequence[str], images: Sequence[Any], max_new_tokens: int, **gen_kwargs: Any
) -> list[str]:
    """Generate one continuation per rendered prompt; ``images`` is flat, in placeholder order across the batch.

    Prompts are left-padded so every row ends at the generation point; greedy unless ``gen_kwargs`` say otherwise.
    Returns the decoded new tokens, special tokens removed, whitespace stripped.
    """
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = processor(text=list(prompts), images=list(images) or None, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side
    device, dtype = _model_device_dtype(model)
    inputs = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device))
              for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_kwargs.setdefault("do_sample", False)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **gen_kwargs)
    new_tokens = out[:, inputs["input_ids"].shape[1]:]  # (B, <= max_new_tokens): drop the prompt
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_answers(model: Any, processor: Any, records: Sequence[EvalRecord], max_new_tokens: int) -> list[str]:
    """Greedy answers for one batch of eval records."""
    prompts = [render_prompt(processor, build_messages(r)) for r in records]
    images = [img for r in records for img in _load_images(r)]
    return generate_texts(model, processor, prompts, images, max_new_tokens)


# --- predictions file (resume) --------------------------------------------------------------------

def _read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """id -> saved prediction. A torn last line (a run killed mid-write) is dropped and the file rewritten."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    done: dict[str, dict[str, Any]] = {}
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            pred = json.loads(raw)
            done[str(pred["id"])] = pred
        except (json.JSONDecodeError, KeyError, TypeError):
            if i == len(lines) - 1:
                lines = lines[:-1]
                break
            raise ValueError(f"{path}:{i + 1}: corrupt predictions line; delete the file to start over") from None
    clean = "".join(line + "\n" for line in lines if line.strip())
    if clean != text:  # torn or unterminated last line: rewrite so the next append starts a fresh line
        atomic_write_text(path, clean)
    return done


def _prediction_row(record: EvalRecord, prediction: str) -> dict[str, Any]:
    return {
        "id": record.id, "task": record.task, "turn": record.turn, "metric": record.metric,
        "question": record.question, "answer": record.answer, "prediction": prediction,
        "score": score_prediction(prediction, record.scoring_view()),
    }


def _batches(items: Sequence[EvalRecord], size: int) -> Iterator[Sequence[EvalRecord]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- summary --------------------------------------------------------------------------------------

def _group(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        groups[str(row[key])].append(row["score"])
    return {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(groups.items())}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean score overall, per task, per turn and per metric (ANLS counts its fractional score)."""
    if not rows:
        raise ValueError("no predictions to summarise")
    return {
        "num_samples": len(rows),
        "accuracy": sum(r["score"] for r in rows) / len(rows),
        "per_task": _group(rows, "task"),
        "per_turn": _group(rows, "turn"),
        "per_metric": _group(rows, "metric"),
    }


def _markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Evaluation: {summary['data_file']}", "",
             f"model: `{summary['model']}`  ", f"samples: {summary['num_samples']}, "
             f"accuracy: **{100 * summary['accuracy']:.2f}**", ""]
    for title, key in (("task", "per_task"), ("turn", "per_turn"), ("metric", "per_metric")):
        lines += [f"| {title} | n | accuracy (%) |", "|---|---:|---:|"]
        lines += [f"| {name} | {g['n']} | {100 * g['accuracy']:.2f} |" for name, g in summary[key].items()]
        lines.append("")
    return "\n".join(lines)


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("task", summary["per_task"]), ("turn", summary["per_turn"])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"width_ratios": [max(len(g), 1) for _, g in groups]})
    for ax, (title, group) in zip(axes, groups):
        names = list(group)
        bars = ax.bar(names, [100 * group[n]["accuracy"] for n in names], color="tab:blue")
        ax.bar_label(bars, labels=[f"{100 * group[n]['accuracy']:.0f}%\nn={group[n]['n']}" for n in names], fontsize=8)
        ax.set_ylim(0, 115)  # room for the labels above a 100 % bar
        ax.set_title(f"accuracy per {title}")
        ax.set_ylabel("accuracy (%)")
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(f"{summary['model']}: {100 * summary['accuracy']:.1f}% on {Path(summary['data_file']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- entry point ----------------------------------------------------------------------------------

def evaluate(
    model: Any,
    processor: Any,
    data_file: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "eval_out",
    batch_size: int = 8,
    max_new_tokens: int = 16,
    limit: int | None = None,
    progress: bool = True,
    fresh: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on a JSONL file; returns the summary (also written to ``out_dir``).

    Resumable: ids already in ``out_dir/predictions.jsonl`` are not generated again; their saved
    predictions are re-scored against the current file. ``limit`` keeps the first N records.
    The folder records a fingerprint (model weights, data file content, generation settings) and is
    locked while a run writes to it: a resume with another fingerprint is refused (``fresh=True``
    discards the old predictions instead), and a second concurrent run into it is refused.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    records = load_records(data_file, image_dir)[:limit]
    check_images(records, Path(data_file))  # before any generation
    out = check_output_path(out_dir, "eval output folder")
    with OutputLock(out, "eval output folder"):
        fingerprint = eval_fingerprint(model, data_file, image_dir, max_new_tokens)
        _check_fingerprint(out, fingerprint, fresh)
        return _evaluate_locked(model, processor, records, data_file, out, batch_size, max_new_tokens, progress)


def model_identity(model: Any) -> dict[str, Any]:
    """The saved folder's weights hash when the model was loaded from one, else a hash of its parameters."""
    import hashlib

    from laco.safety import weights_identity

    src = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if src and (Path(src) / "config.json").is_file():
        return weights_identity(src)
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"path": type(model).__name__, "sha256": h.hexdigest()}


def eval_fingerprint(model: Any, data_file: str | os.PathLike, image_dir: str | os.PathLike | None,
                     max_new_tokens: int) -> dict[str, Any]:
    """What produced an eval folder's predictions: model, data file, images and generation settings."""
    from laco.safety import file_identity

    dtype = str(_model_device_dtype(model)[1]).removeprefix("torch.")
    root = Path(image_dir) if image_dir is not None else Path(data_file).parent
    return {"model": model_identity(model), "data": file_identity(data_file), "images": str(root.resolve()),
            "generation": {"max_new_tokens": max_new_tokens, "do_sample": False, "dtype": dtype}}


def _check_fingerprint(out: Path, now: dict[str, Any], fresh: bool) -> None:
    """Refuse to resume predictions made by another model / data / setting; ``fresh`` discards them."""
    from laco.safety import fingerprint_mismatch, output_kind, read_json_object, write_marker

    saved_path = out / FINGERPRINT_FILE
    has_predictions = (out / PREDICTIONS_FILE).is_file()
    if has_predictions and not fresh:
        if not saved_path.is_file() or output_kind(out) != "eval":
            raise ValueError(f"{out} holds predictions without a fingerprint, so they cannot be trusted to match "
                             f"this model and data; pass --fresh (fresh=True) to discard them or use another --out")
        changed = fingerprint_mismatch(read_json_object(saved_path, "eval fingerprint"), now)
        if changed:
            raise ValueError(f"{out} holds predictions of another {' and '.join(changed)}; pass --fresh "
                             f"(fresh=True) to discard them and start over, or choose another --out")
    if fresh:
        for name in (PREDICTIONS_FILE, "summary.json", "summary.md", "summary.png", FINGERPRINT_FILE):
            (out / name).unlink(missing_ok=True)
    atomic_write_text(saved_path, json.dumps(now, indent=2) + "\n")
    write_marker(out, "eval")


def _evaluate_locked(model: Any, processor: Any, records: list[EvalRecord], data_file: str | os.PathLike, out: Path,
                     batch_size: int, max_new_tokens: int, progress: bool) -> dict[str, Any]:
    pred_path = out / PREDICTIONS_FILE
    done = _read_predictions(pred_path)
    todo = [r for r in records if r.id not in done]

    from tqdm.auto import tqdm

    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with pred_path.open("a", encoding="utf-8") as f, tqdm(
            total=len(records), initial=len(records) - len(todo), desc="eval", unit="q", disable=not progress
        ) as bar:
            for batch in _batches(todo, batch_size):
                answers = generate_answers(model, processor, batch, max_new_tokens)
                for rec, ans in zip(batch, answers):
                    row = _prediction_row(rec, ans)
                    done[rec.id] = row
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())  # a finished batch survives a crash: resume starts after it
                bar.update(len(batch))
    finally:
        model.train(was_training)

    rows = [_prediction_row(r, str(done[r.id]["prediction"])) for r in records]
    summary = {
        "data_file": str(data_file),
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
        "max_new_tokens": max_new_tokens,
        **summarize(rows),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "summary.md", _markdown(summary))
    _plot(summary, out / "summary.png")
    return summary
