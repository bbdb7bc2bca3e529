"""Hostile input: every CLI command fed what a careless or hostile user would feed it.

Each case asserts what issue 17 asks of every failure the user can cause: exit code 2, exactly one
``laco: error:`` line that names the offending file or argument, no traceback, and no file changed
outside the case's output folder (the shared fixtures and the case's working folder are hashed before
and after). Most cases run in-process through ``laco.cli.main`` (fast); a representative subset runs the
real ``laco`` console script in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml



# -- the shared world: a tiny model, a LLaVA source, images, eval and train data --------------------
def _png_with_size(good: Path, out: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb as PIL sees it on open)."""
    data = bytearray(good.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    out.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    from laco.data import write_toy_llava
    from laco.model.testing import save_tiny_mllm
    from test_convert import save_source

    w = tmp_path_factory.mktemp("world")
    save_tiny_mllm(w / "model")
    save_source(w / "src" / "llava", "llava")
    imgs = w / "images"
    (imgs / "a").mkdir(parents=True)
    (imgs / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(imgs / cls / f"{i}.png")
    good = imgs / "a" / "0.png"
    (w / "bad").mkdir()
    (w / "bad" / "corrupt.png").write_bytes(good.read_bytes()[:60])
    _png_with_size(good, w / "bad" / "bomb.png", 60000, 60000)
    rows = [{"id": f"q{i}", "image": "a/0.png", "question": "What?", "answer": "cat", "metric": "exact"}
            for i in range(3)]
    (imgs / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_json = write_toy_llava(w / "toy", n=8)
    (w / "train.yaml").write_text(yaml.safe_dump(_train_cfg(w, train_json)))
    return w


def _train_cfg(w: Path, train_json: Path | None = None, **stage) -> dict:
    train_json = train_json or (w / "toy" / "train.json")
    return {"output_dir": "run", "seed": 0, "progress": False, "model": {"tiny": {}},
            "data": {"path": str(train_json), "image_folder": str(train_json.parent), "max_length": 128},
            "stages": [{"name": "align", "trainable": ["compressor", "projector"], "learning_rate": 1e-2,
                        "max_steps": 2, "batch_size": 4, **stage}]}


# -- setup helpers: each writes into the case's folder ``t`` ----------------------------------------
def _copy_model(t: Path, w: Path, name: str = "m") -> Path:
    dst = t / name
    shutil.copytree(w / "model", dst)
    return dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def model_truncated_weights(t, w):
    _truncate(_copy_model(t, w) / "model.safetensors")


def model_torn_config(t, w):
    _truncate(_copy_model(t, w) / "config.json")


def model_no_tokenizer(t, w):
    (_copy_model(t, w) / "tokenizer.json").unlink()


def model_torn_processor(t, w):
    _truncate(_copy_model(t, w) / "processor_config.json")


def source_truncated_weights(t, w):
    shutil.copytree(w / "src" / "llava", t / "s")
    _truncate(t / "s" / "model.safetensors")


def source_torn_config(t, w):
    shutil.copytree(w / "src" / "llava", t / "s")
    _truncate(t / "s" / "config.json")


def parent_holding_source(t, w):
    shutil.copytree(w / "src" / "llava", t / "parent" / "src")
    (t / "parent" / "notes.txt").write_text("precious")


def plain_folder(t, w):
    (t / "mine").mkdir()
    (t / "mine" / "thesis.tex").write_text("precious")


def a_file(name):
    def setup(t, w):
        (t / name).write_text("a file, not a folder")
    return setup


def json_file(name, text):
    def setup(t, w):
        (t / name).write_text(text)
    return setup


def eval_rows(*rows, name="e.jsonl"):
    """An eval file in the world's image folder (relative image paths) written into ``t``."""
    def setup(t, w):
        for sub in ("a", "b"):
            shutil.copytree(w / "images" / sub, t / sub)
        shutil.copy(w / "bad" / "corrupt.png", t / "corrupt.png")
        base = {"image": "a/0.png", "question": "What?", "answer": "cat", "metric": "exact"}
        (t / name).write_text("".join(json.dumps({"id": f"q{i}", **base, **r}) + "\n" for i, r in enumerate(rows)))
    return setup


def image_folder_with(bad: str):
    def setup(t, w):
        shutil.copytree(w / "images" / "a", t / "imgs" / "a")
        shutil.copy(w / "bad" / bad, t / "imgs" / "a" / bad)
    return setup


def train_yaml(stage=None, data=None, top=None, raw=None):
    """``t/run.yaml`` from the world's train config with ``stage`` / ``data`` / top-level overrides."""
    def setup(t, w):
        cfg = _train_cfg(w)
        cfg["stages"][0].update(stage or {})
        cfg["data"].update(data or {})
        cfg.update(top or {})
        text = yaml.safe_dump(cfg)
        for a, b in (raw or {}).items():
            text = text.replace(a, b)
        (t / "run.yaml").write_text(text)
    return setup


def train_data(text):
    def setup(t, w):
        (t / "d.json").write_text(text)
        train_yaml(data={"path": str(t / "d.json"), "image_folder": str(w / "toy")})(t, w)
    return setup


def train_bad_image(t, w):
    shutil.copytree(w / "toy", t / "toy")
    rec = json.loads((t / "toy" / "train.json").read_text())
    shutil.copy(w / "bad" / "corrupt.png", t / "toy" / rec[3]["image"])
    train_yaml(data={"path": str(t / "toy" / "train.json"), "image_folder": str(t / "toy"),
                     "check_images": "open"})(t, w)


def chain(*fns):
    def setup(t, w):
        for f in fns:
            f(t, w)
    return setup


# -- the cases -------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    args: str  # shell-like words; {M} model, {S} LLaVA source, {I} image folder, {W} world, {t} case folder
    names: str  # what the error line must name (the file or argument), case-insensitive
    setup: Callable | None = None
    out: str | None = None  # output path (relative to t) that may change
    sub: bool = False  # run the real console script in a subprocess

    def argv(self, t: Path, w: Path) -> list[str]:
        return [a.format(M=w / "model", S=w / "src" / "llava", I=w / "images", W=w, t=t) for a in self.args.split()]


P = "probe {M} --images {I} --out {t}/po"
G = "generate {M} --prompt hi"
B = "bench --dry-run --vision siglip-base-224 --llm tiny-qwen2 -m none,laco@1/4"
E = "eval {M} --data {I}/eval.jsonl --out {t}/eo"
CASES = [
    # info
    Case("info-ratio-0", "info --ratio 0", "ratio"),
    Case("info-ratio-neg", "info --ratio -2", "ratio"),
    Case("info-image-size-neg", "info --image-size -5", "image-size"),
    Case("info-unknown-encoder", "info --encoder nope-384", "nope-384", sub=True),
    Case("info-unknown-method", "info --method bogus", "bogus"),
    Case("info-layer-too-deep", "info --layer 99", "99"),
    Case("info-feature-layer", "info --feature-layer 100", "feature"),
    # probe
    Case("probe-missing-source", "probe {t}/nothing --images {I}", "nothing"),
    Case("probe-missing-images", "probe {M} --images {t}/noimgs", "noimgs"),
    Case("probe-threads-0", P + " --threads 0", "threads"),
    Case("probe-max-images-0", P + " --max-images 0", "max-images"),
    Case("probe-batch-0", P + " --batch-size 0", "batch-size"),
    Case("probe-device-tpu", P + " --device tpu", "tpu", out="po"),
    Case("probe-device-cuda", P + " --device cuda", "cuda", out="po"),
    Case("probe-budget-nan", P + " --budget nan", "budget", out="po"),
    Case("probe-ratios-word", P + " --ratios two", "ratios", out="po"),
    Case("probe-out-is-file", "probe {M} --images {I} --out {t}/f", "f", setup=a_file("f")),
    Case("probe-truncated-weights", "probe {t}/m --images {I} --out {t}/po", "model.safetensors",
         setup=model_truncated_weights, out="po"),
    Case("probe-torn-config", "probe {t}/m --images {I} --out {t}/po", "config.json", setup=model_torn_config,
         out="po"),
    Case("probe-corrupt-image", "probe {M} --images {t}/imgs --out {t}/po", "corrupt.png",
         setup=image_folder_with("corrupt.png"), out="po", sub=True),
    Case("probe-bomb-image", "probe {M} --images {t}/imgs --out {t}/po", "bomb.png",
         setup=image_folder_with("bomb.png"), out="po"),
    # bench
    Case("bench-ratio-0", B + " --ratio 0", "ratio"),
    Case("bench-batch-0", B + " --batch-size 0", "batch-size"),
    Case("bench-repeats-0", "bench --repeats 0 --out {t}/bo", "repeats", out="bo"),
    Case("bench-threads-0", "bench --threads 0 --out {t}/bo", "threads", out="bo"),
    Case("bench-device-tpu", "bench --device tpu --out {t}/bo", "tpu", out="bo"),
    Case("bench-device-cuda", "bench --device cuda --out {t}/bo", "cuda", out="bo", sub=True),
    Case("bench-unknown-method", "bench --dry-run -m bogus@1/4", "bogus"),
    Case("bench-image-size-neg", B + " --image-size -5", "image-size"),
    Case("bench-image-size-word", B + " --image-size wide", "image-size"),
    Case("bench-max-tiles-0", B + " --image-size 768x384 --max-tiles 0", "max-tiles"),
    Case("bench-from-json-missing", "bench --from-json {t}/r.json", "r.json"),
    Case("bench-from-json-torn", "bench --from-json {t}/r.json", "r.json", setup=json_file("r.json", '{"a": [1,')),
    Case("bench-from-json-list", "bench --from-json {t}/r.json", "r.json", setup=json_file("r.json", "[1, 2]")),
    # serve-bench: every bad argument fails before vLLM is looked for
    Case("serve-bench-output-lens", "serve-bench --output-lens 1,x", "output-lens"),
    Case("serve-bench-concurrency-0", "serve-bench --concurrency 0", "concurrency"),
    Case("serve-bench-requests-0", "serve-bench --requests 0", "requests"),
    Case("serve-bench-unknown-method", "serve-bench -m bogus@1/4", "bogus"),
    Case("serve-bench-out-is-file", "serve-bench --out {t}/r.json", "--out", setup=json_file("r.json", "{}")),
    Case("serve-bench-from-json-torn", "serve-bench --from-json {t}/r.json", "r.json",
         setup=json_file("r.json", '{"a": [1,')),
    # generate
    Case("generate-missing-model", "generate {t}/none --prompt hi", "none"),
    Case("generate-missing-image", G + " --image {t}/x.png", "x.png"),
    Case("generate-image-is-dir", G + " --image {t}", "{t}"),
    Case("generate-corrupt-image", G + " --image {W}/bad/corrupt.png", "corrupt.png", sub=True),
    Case("generate-bomb-image", G + " --image {W}/bad/bomb.png", "bomb.png"),
    Case("generate-too-many-tokens", G + " -n 100000", "max-new-tokens"),
    Case("generate-device-tpu", G + " --device tpu", "tpu"),
    Case("generate-device-cuda", G + " --device cuda", "cuda"),
    Case("generate-bad-dtype", G + " --dtype float8", "float8"),
    Case("generate-temperature-nan", G + " --temperature nan", "temperature"),
    Case("generate-truncated-weights", "generate {t}/m --prompt hi", "model.safetensors",
         setup=model_truncated_weights),
    Case("generate-torn-config", "generate {t}/m --prompt hi", "config.json", setup=model_torn_config),
    Case("generate-no-tokenizer", "generate {t}/m --prompt hi", "tokenizer.json", setup=model_no_tokenizer),
    Case("generate-torn-processor", "generate {t}/m --prompt hi", "processor_config.json",
         setup=model_torn_processor),
    # convert
    Case("convert-into-parent-of-source", "convert {t}/parent/src {t}/parent --overwrite", "parent",
         setup=parent_holding_source, sub=True),
    Case("convert-into-cwd", "convert {S} . --overwrite", "."),
    Case("convert-over-foreign-folder", "convert {S} {t}/mine --overwrite", "mine", setup=plain_folder),
    Case("convert-out-is-file", "convert {S} {t}/f --overwrite", "f", setup=a_file("f")),
    Case("convert-over-source", "convert {S} {S} --overwrite", "llava"),
    Case("convert-missing-source", "convert {t}/none {t}/out", "none"),
    Case("convert-truncated-weights", "convert {t}/s {t}/out", "model.safetensors", setup=source_truncated_weights,
         out="out"),
    Case("convert-torn-config", "convert {t}/s {t}/out", "config.json", setup=source_torn_config),
    Case("convert-ratio-0", "convert {S} {t}/out --ratio 0", "ratio", out="out"),
    Case("convert-from-probe-list", "convert {S} {t}/out --from-probe {t}/p.json", "p.json",
         setup=json_file("p.json", "[1, 2, 3]")),
    Case("convert-from-probe-torn", "convert {S} {t}/out --from-probe {t}/p.json", "p.json",
         setup=json_file("p.json", '{"recommendation": {')),
    # eval
    Case("eval-missing-data", "eval {M} --data {t}/none.jsonl --out {t}/eo", "none.jsonl"),
    Case("eval-answer-null", "eval {M} --data {t}/e.jsonl --out {t}/eo", "e.jsonl",
         setup=eval_rows({}, {"answer": None})),
    Case("eval-numeric-not-number", "eval {M} --data {t}/e.jsonl --out {t}/eo", "e.jsonl",
         setup=eval_rows({"metric": "numeric", "answer": "many"})),
    Case("eval-corrupt-image-late", "eval {M} --data {t}/e.jsonl --out {t}/eo --batch-size 1", "corrupt.png",
         setup=eval_rows({}, {}, {"image": "corrupt.png"}), sub=True),  # fails before any prediction
    Case("eval-torn-line", "eval {M} --data {t}/e.jsonl --out {t}/eo", "e.jsonl",
         setup=chain(eval_rows({}), lambda t, w: open(t / "e.jsonl", "a").write('{"id": "x", \n'))),
    Case("eval-batch-0", E + " --batch-size 0", "batch-size", out="eo"),
    Case("eval-max-new-tokens-0", E + " --max-new-tokens 0", "max-new-tokens", out="eo"),
    Case("eval-max-new-tokens-huge", E + " --max-new-tokens 100000", "max-new-tokens", out="eo"),
    Case("eval-limit-0", E + " --limit 0", "limit", out="eo"),
    Case("eval-device-tpu", E + " --device tpu", "tpu", out="eo"),
    Case("eval-bad-dtype", E + " --dtype float8", "float8", out="eo"),
    Case("eval-out-is-file", "eval {M} --data {I}/eval.jsonl --out {t}/f", "f", setup=a_file("f")),
    Case("eval-truncated-weights", "eval {t}/m --data {I}/eval.jsonl --out {t}/eo", "model.safetensors",
         setup=model_truncated_weights, out="eo"),
    Case("eval-torn-config", "eval {t}/m --data {I}/eval.jsonl --out {t}/eo", "config.json",
         setup=model_torn_config, out="eo"),
    # compare
    Case("compare-missing-config", "compare --config {t}/c.yaml --out {t}/co", "c.yaml"),
    Case("compare-invalid-yaml", "compare --config {t}/c.yaml --out {t}/co", "c.yaml",
         setup=json_file("c.yaml", "methods: [a, b\n  seeds: {")),
    Case("compare-yaml-list", "compare --config {t}/c.yaml --out {t}/co", "c.yaml",
         setup=json_file("c.yaml", "- 1\n- 2\n")),
    Case("compare-unknown-key", "compare --config {t}/c.yaml --out {t}/co", "c.yaml",
         setup=json_file("c.yaml", "not_a_field: 3\n")),
    Case("compare-seeds-words", "compare --seeds a,b --out {t}/co", "seeds"),
    Case("compare-threads-0", "compare --threads 0 --out {t}/co", "threads"),
    Case("compare-unknown-preset", "compare --preset nope --out {t}/co", "nope"),
    Case("compare-unknown-method", "compare --methods bogus --out {t}/co", "bogus"),
    Case("compare-unknown-option", "compare --methods ldpv2(bogus=1)@1/4 --out {t}/co", "bogus"),
    Case("compare-option-syntax", "compare --methods ldpv2(residual)@1/4 --out {t}/co", "key=value"),
    Case("compare-option-conflict", "compare --methods pixel_shuffle(avg_pool_init=true)@1/4 --out {t}/co",
         "avg_pool_init"),
    Case("compare-merge-no-out", "compare --merge {t}", "--out"),
    Case("compare-out-is-file", "compare --preset smoke --out {t}/f", "f", setup=a_file("f")),
    # train
    Case("train-missing-config", "train {t}/none.yaml", "none.yaml"),
    Case("train-invalid-yaml", "train {t}/run.yaml", "run.yaml", setup=json_file("run.yaml", "stages: [a\n b: {")),
    Case("train-yaml-list", "train {t}/run.yaml", "run.yaml", setup=json_file("run.yaml", "- 1\n")),
    Case("train-epochs-inf", "train {t}/run.yaml", "epochs", setup=train_yaml(stage={"max_steps": None, "epochs": 1.5},
                                                                                 raw={"epochs: 1.5": "epochs: .inf"})),
    Case("train-lr-nan", "train {t}/run.yaml", "learning_rate",
         setup=train_yaml(stage={"learning_rate": 0.5}, raw={"learning_rate: 0.5": "learning_rate: .nan"})),
    Case("train-batch-0", "train {t}/run.yaml", "batch_size", setup=train_yaml(stage={"batch_size": 0})),
    Case("train-stage-named-metrics", "train {t}/run.yaml", "metrics.jsonl",
         setup=train_yaml(stage={"name": "metrics.jsonl"})),
    Case("train-stage-named-config", "train {t}/run.yaml", "run_config.yaml",
         setup=train_yaml(stage={"name": "run_config.yaml"})),
    Case("train-stage-name-slash", "train {t}/run.yaml", "a/b", setup=train_yaml(stage={"name": "a/b"})),
    Case("train-missing-data", "train {t}/run.yaml", "nowhere.json",
         setup=train_yaml(data={"path": "nowhere.json"})),
    Case("train-torn-data", "train {t}/run.yaml", "d.json", setup=train_data('[{"id": "a", "image": ')),
    Case("train-output-is-file", "train {t}/run.yaml --output-dir {t}/f", "f", setup=chain(train_yaml(), a_file("f"))),
    Case("train-undecodable-image", "train {t}/run.yaml", "png", setup=train_bad_image, out="run", sub=True),
    Case("train-all-samples-dropped", "train {t}/run.yaml", "align",
         setup=train_yaml(data={"max_length": 8, "on_overflow": "drop"}), out="run"),
]


# -- running a case --------------------------------------------------------------------------------
def _snapshot(roots: list[Path], skip: list[Path]) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if any(p == s or s in p.parents for s in skip) or not p.is_file():
                continue
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_inprocess(argv: list[str], capsys, monkeypatch) -> tuple[int | str, str]:
    from laco.cli import main

    monkeypatch.setattr(sys, "argv", ["laco", *argv])
    try:
        main()
        code: int | str = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # an escaped exception is a traceback for the user
        code = f"traceback: {type(e).__name__}: {e}"
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def run_subprocess(argv: list[str], cwd: Path) -> tuple[int, str]:
    exe = Path(sys.executable).with_name("laco")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from laco.cli import main; main()"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([*cmd, *argv], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def check(case: Case, code, text: str, t: Path) -> None:
    assert "Traceback" not in text and not str(code).startswith("traceback"), f"traceback:\n{code}\n{text}"
    assert code == 2, f"exit code {code}, expected 2:\n{text}"
    lines = [ln for ln in text.splitlines() if ln.startswith("laco: error:")]
    assert len(lines) == 1, f"expected one 'laco: error:' line:\n{text}"
    name = case.names.format(t=t).lower()
    assert name in lines[0].lower(), f"the error line does not name {name!r}: {lines[0]}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile(case: Case, world: Path, tmp_path: Path, capsys, monkeypatch):
    t = tmp_path / "case"
    t.mkdir()
    if case.setup:
        case.setup(t, world)
    monkeypatch.chdir(t)
    monkeypatch.setenv("LACO_CACHE", str(tmp_path / "cache"))
    skip = [t / case.out] if case.out else []
    before = _snapshot([world, t], skip)
    argv = case.argv(t, world)
    code, text = run_subprocess(argv, t) if case.sub else run_inprocess(argv, capsys, monkeypatch)
    check(case, code, text, t)
    assert _snapshot([world, t], skip) == before, "a file outside the output folder changed"


def test_case_list_covers_every_command():
    commands = {c.args.split()[0] for c in CASES}
    assert commands == {"info", "probe", "bench", "generate", "convert", "eval", "compare", "train", "serve-bench"}
    assert len(CASES) >= 60 and sum(c.sub for c in CASES) >= 5
