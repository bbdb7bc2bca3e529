"""Fault tests: corrupted checkpoints fall back, torn RNG state is an error, one writer per output folder,
fingerprinted eval resume, conversion never deletes its source, stages that train nothing fail, images
decoded right (laco.safety)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from laco.data import load_llava, write_toy_llava
from laco.model.testing import save_tiny_mllm, tiny_laco_model, tiny_laco_processor
from laco.safety import OutputLock, check_replaceable, open_image, verify_checksums, write_checksums, write_marker
from laco.train import RunConfig, StageConfig, list_checkpoints, train
from laco.train.config import DataConfig
from laco.train.loop import EmptyStageError
from test_train import Crash
from test_train import _crash_after as crash_after

ALIGN = ["compressor", "projector"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return load_llava(write_toy_llava(tmp_path_factory.mktemp("toy"), n=8))


def tiny(seed=0):
    model = tiny_laco_model(seed=seed)
    return model, tiny_laco_processor(model.config)


def cfg(out, max_steps=6, **kw):
    stage = StageConfig("align", list(ALIGN), learning_rate=1e-2, max_steps=max_steps, batch_size=4, warmup_steps=0)
    return RunConfig(output_dir=str(out), stages=[stage], progress=False, log_every=1,
                     **{"save_every": 2, "keep_checkpoints": 3, **kw})


def crashed_run(out, toy, monkeypatch, n_steps=5):
    """A run killed during step ``n_steps + 1``: checkpoints at steps 2 and 4 on disk."""
    crash_after(monkeypatch, n_steps)
    with pytest.raises(Crash):
        train(*tiny(), toy, cfg(out))
    monkeypatch.undo()
    return list_checkpoints(out)


def flip_byte(path: Path) -> None:
    """Same-size corruption: one byte in the middle changed."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- checkpoints -------------------------------------------------------------------------------------
def test_corrupt_latest_checkpoint_falls_back_and_ends_bit_exact(tmp_path, toy, monkeypatch, caplog):
    model, processor = tiny()
    train(model, processor, toy, cfg(tmp_path / "full"))
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    out = tmp_path / "killed"
    ckpts = crashed_run(out, toy, monkeypatch)
    assert [p.name for p in ckpts] == ["checkpoint-00000002", "checkpoint-00000004"]
    assert all(verify_checksums(p) is None for p in ckpts)
    weights = ckpts[-1] / "model.safetensors"
    size = weights.stat().st_size
    flip_byte(weights)
    assert weights.stat().st_size == size and verify_checksums(ckpts[-1]) == "model.safetensors does not match its checksum"

    model, processor = tiny(seed=7)  # other initial weights: everything must come from the older checkpoint
    with caplog.at_level(logging.WARNING, logger="laco.train.checkpoint"):
        result = train(model, processor, toy, cfg(out), resume=True)
    assert "checkpoint-00000004 fails verification (model.safetensors" in caplog.text
    assert "falling back" in caplog.text
    assert result.global_step == 6 and len(result.stages[0].losses) == 4  # steps 3..6 rerun from step 2
    state = model.state_dict()
    assert all(torch.equal(reference[k], state[k]) for k in reference)
    steps = [json.loads(x)["global_step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert verify_checksums(out / "align") is None  # the stage folder is checksummed too


def test_truncated_rng_state_is_a_clear_error(tmp_path, toy, monkeypatch):
    out = tmp_path / "r"
    ckpts = crashed_run(out, toy, monkeypatch)
    rng = ckpts[-1] / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[: rng.stat().st_size // 2])
    write_checksums(ckpts[-1])  # the checksums agree: only loading can tell
    with pytest.raises(ValueError, match=r"cannot restore the RNG state of checkpoint .*random_states_0\.pkl"):
        train(*tiny(), toy, cfg(out), resume=True)


def test_all_checkpoints_corrupt_restarts_the_stage(tmp_path, toy, monkeypatch, caplog):
    model, processor = tiny()
    train(model, processor, toy, cfg(tmp_path / "full"))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "k"
    for p in crashed_run(out, toy, monkeypatch):
        flip_byte(p / "optimizer.bin")
    model, processor = tiny()  # the stage restarts from the initial weights
    with caplog.at_level(logging.WARNING, logger="laco.train.checkpoint"):
        train(model, processor, toy, cfg(out), resume=True)
    assert caplog.text.count("fails verification") == 2
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())


def test_second_concurrent_resume_is_refused(tmp_path, toy, monkeypatch):
    out = tmp_path / "r"
    crashed_run(out, toy, monkeypatch)
    before = (out / "metrics.jsonl").read_text()
    # another process holds the lock, as a first `laco train --resume` does while it runs
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from laco.safety import OutputLock; "
                               "OutputLock(sys.argv[1]).acquire(); print('locked', flush=True); sys.stdin.read()",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="another laco process is writing to this run's output_dir"):
            train(*tiny(), toy, cfg(out), resume=True)
    finally:
        holder.communicate("")  # the holder exits; its lock dies with it
    assert (out / "metrics.jsonl").read_text() == before
    train(*tiny(), toy, cfg(out), resume=True)


def test_output_lock_removes_only_the_empty_folder_it_created(tmp_path):
    new, kept, existing = tmp_path / "new" / "deep", tmp_path / "kept", tmp_path / "existing"
    existing.mkdir()
    for folder, write in ((new, False), (kept, True), (existing, False)):
        with pytest.raises(RuntimeError), OutputLock(folder):
            if write:
                (folder / "results.json").write_text("{}")
            raise RuntimeError("the run failed")
    assert not new.exists() and new.parent.is_dir()  # the output folder only (a parent made on the way stays)
    assert (kept / "results.json").is_file()  # something was written: nothing is removed
    assert existing.is_dir()  # the user's folder stays
    with OutputLock(tmp_path / "ok"):  # a run that succeeds keeps its folder even if it wrote nothing
        pass
    assert (tmp_path / "ok").is_dir()


def test_stage_that_trains_nothing_fails(tmp_path, toy):
    stage = StageConfig("align", list(ALIGN), learning_rate=1e-2, max_steps=2, batch_size=4)
    run = RunConfig(output_dir=str(tmp_path / "r"), stages=[stage], progress=False,
                    data=DataConfig(max_length=8, on_overflow="drop"))  # every sample is longer than 8 tokens
    with pytest.raises(EmptyStageError, match=r"'align' made no optimizer update: 8 of 8 samples drawn were dropped"):
        train(*tiny(), toy, run)
    assert not (tmp_path / "r" / "align").exists()  # not marked complete


def test_too_many_dropped_samples_fail_the_stage(tmp_path, toy):
    long_ids = {toy.records[i]["id"] for i in range(3)}
    recs = toy.records.to_list()
    for r in recs:  # 3 of 8 samples far over max_length
        if r["id"] in long_ids:
            r["conversations"][1]["value"] = "word " * 400
    ds = load_llava(recs, toy.image_folder)
    stage = StageConfig("align", list(ALIGN), learning_rate=1e-2, max_steps=2, batch_size=4)
    for frac, ok in ((0.2, False), (0.5, True)):
        run = RunConfig(output_dir=str(tmp_path / f"r{frac}"), stages=[stage], progress=False,
                        data=DataConfig(max_length=160, on_overflow="drop", max_dropped_fraction=frac))
        if ok:
            train(*tiny(), ds, run)
            info = json.loads((tmp_path / f"r{frac}" / "align" / "laco_stage.json").read_text())
            assert info["samples_requested"] == 8 and info["samples_dropped"] == 3 and info["updates"] == 2
        else:
            with pytest.raises(EmptyStageError, match=r"more than max_dropped_fraction \(0.2\).*3 of 8"):
                train(*tiny(), ds, run)


def test_text_only_micro_batch_in_an_image_only_stage(tmp_path, toy):
    recs = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}
            for i in range(4)]
    ds = load_llava(recs)
    model, processor = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = StageConfig("align", list(ALIGN), learning_rate=1e-2, max_steps=2, batch_size=4)
    result = train(model, processor, ds, RunConfig(output_dir=str(tmp_path / "r"), stages=[stage], progress=False))
    assert result.global_step == 2 and all(np.isfinite(result.losses))
    # nothing the stage trains was used: the weights did not move (AdamW on zero gradients, no decay on them)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.compressors"))


# -- eval fingerprints -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_world(tmp_path_factory):
    from PIL import Image

    w = tmp_path_factory.mktemp("ev")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(w / "x.png")
    rows = [{"id": f"q{i}", "image": "x.png", "question": "What?", "answer": "cat", "metric": "exact"} for i in range(3)]
    (w / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (w / "b").mkdir()
    shutil.copy(w / "x.png", w / "b" / "x.png")
    rows = [{**r, "answer": "dog"} for r in rows]  # same ids, same stem, other answers
    (w / "b" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_tiny_mllm(w / "m1", seed=0)
    save_tiny_mllm(w / "m2", seed=1)
    return w


def _load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import laco  # noqa: F401

    return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("change", ["data", "model", "max_new_tokens"])
def test_eval_resume_with_another_fingerprint_is_refused_or_fresh(eval_world, tmp_path, change):
    from laco.eval import evaluate

    w = eval_world
    out = tmp_path / "eo"
    evaluate(*_load(w / "m1"), w / "a.jsonl", out_dir=out, max_new_tokens=3, progress=False)
    first = (out / "predictions.jsonl").read_text()
    kw = dict(data_file=w / "a.jsonl", max_new_tokens=3, model=w / "m1")
    kw.update({"data": {"data_file": w / "b" / "a.jsonl"}, "model": {"model": w / "m2"},
               "max_new_tokens": {"max_new_tokens": 5}}[change])
    model, proc = _load(kw.pop("model"))
    with pytest.raises(ValueError, match=rf"holds predictions of another {'generation' if change == 'max_new_tokens' else change}"):
        evaluate(model, proc, out_dir=out, progress=False, **kw)
    assert (out / "predictions.jsonl").read_text() == first  # untouched
    summary = evaluate(model, proc, out_dir=out, progress=False, fresh=True, **kw)
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and summary["num_samples"] == 3  # recomputed, not appended to the old lines
    if change == "data":
        assert {r["answer"] for r in rows} == {"dog"}


def test_eval_same_fingerprint_resumes_and_a_second_writer_is_refused(eval_world, tmp_path):
    from laco.eval import evaluate

    w = eval_world
    out = tmp_path / "eo"
    model, proc = _load(w / "m1")
    evaluate(model, proc, w / "a.jsonl", out_dir=out, max_new_tokens=3, progress=False, limit=2)
    evaluate(model, proc, w / "a.jsonl", out_dir=out, max_new_tokens=3, progress=False)  # resumes: adds q2 only
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    with OutputLock(out), pytest.raises(ValueError, match="another laco process is writing to this eval output"):
        evaluate(model, proc, w / "a.jsonl", out_dir=out, max_new_tokens=3, progress=False)


def test_eval_default_out_is_keyed_by_the_data_file(eval_world, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from laco.cli import app

    w = eval_world
    m = tmp_path / "m"
    shutil.copytree(w / "m1", m)
    runner = CliRunner()
    for data in (w / "a.jsonl", w / "b" / "a.jsonl"):
        res = runner.invoke(app, ["eval", str(m), "--data", str(data), "--max-new-tokens", "2", "--device", "cpu"])
        assert res.exit_code == 0, res.output
    folders = sorted(p.name for p in (m / "eval").iterdir())
    assert len(folders) == 2 and all(f.startswith("a-") for f in folders)


# -- conversion and output folders ---------------------------------------------------------------------
def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_convert_into_a_parent_of_its_source_is_refused(tmp_path):
    from test_convert import save_source

    from laco.model.convert import convert_checkpoint

    parent = tmp_path / "parent"
    save_source(parent / "src", "llava")
    (parent / "notes.txt").write_text("precious")
    before = _tree_hash(parent)
    with pytest.raises(ValueError, match="holds the source"):
        convert_checkpoint(parent / "src", parent, overwrite=True)
    assert _tree_hash(parent) == before
    out = tmp_path / "conv"
    convert_checkpoint(parent / "src", out)
    (out / "extra.txt").write_text("x")
    convert_checkpoint(parent / "src", out, overwrite=True)  # a previous conversion is replaced
    assert not (out / "extra.txt").exists() and (out / ".laco-output.json").is_file()
    assert not list(tmp_path.glob(".conv.*"))


def test_check_replaceable(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="not a laco output"):
        check_replaceable(tmp_path / "mine", "convert")
    write_marker(tmp_path / "mine", "eval")
    with pytest.raises(ValueError, match="a laco eval output, not a previous laco convert"):
        check_replaceable(tmp_path / "mine", "convert")
    write_marker(tmp_path / "mine", "convert")
    check_replaceable(tmp_path / "mine", "convert")
    monkeypatch.chdir(tmp_path / "mine")
    with pytest.raises(ValueError, match="current directory"):
        check_replaceable(tmp_path / "mine", "convert")


# -- images ----------------------------------------------------------------------------------------------
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(open_image(tmp_path / "g16.png"))
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 1]).all()
    expected = np.rint(ramp / 65535.0 * 255).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected)
    assert (rgb == 255).mean() < 0.01  # convert("RGB") clips almost everything to white


def test_pixel_limit(tmp_path):
    from PIL import Image

    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"100x100 pixels is over the limit of 5000 pixels: .*big\.png"):
        open_image(tmp_path / "big.png", max_pixels=5000)


def test_resume_refuses_changed_data_content(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    data = write_toy_llava(folder, n=8)
    run = cfg(tmp_path / "r")
    run.data = DataConfig(path=str(data))
    crash_after(monkeypatch, 3)
    with pytest.raises(Crash):
        train(*tiny(), None, run)
    monkeypatch.undo()
    recs = json.loads(data.read_text())
    recs[0]["conversations"][1]["value"] = "A blue square."  # same number of samples, other content
    data.write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"content of data file of stage 'align' changed since the run started"):
        train(*tiny(), None, run, resume=True)


def test_resume_refuses_a_run_started_with_another_module_layout(tmp_path, toy, monkeypatch):
    """Checkpoints hold the in-memory module names: a run started by laco 0.1 (tree ``vision_tower`` /
    ``projector`` / ``language_model``; its fingerprint has no layout) is not resumed with LLaVA's tree."""
    out = tmp_path / "r"
    assert crashed_run(out, toy, monkeypatch, n_steps=3)
    fp_file = out / "fingerprint.json"
    fp = json.loads(fp_file.read_text())
    assert fp.pop("model module layout") == "llava"
    fp_file.write_text(json.dumps(fp))  # what laco 0.1 wrote
    with pytest.raises(ValueError, match=r"cannot resume .*module names of the model layout 'laco 0\.1 .*"
                                         r"this laco builds 'llava'"):
        train(*tiny(), toy, cfg(out), resume=True)
