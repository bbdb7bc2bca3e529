"""Two-stage training on accelerate: configs, freezing, loss, checkpoints, exact resume, NaN stop, CLI.

The slow tests run real subprocesses: a SIGKILL mid-run then ``--resume``, and two gloo processes
(``torchrun``) against one process on the same global batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from laco.data import load_llava, write_toy_llava
from laco.model.testing import tiny_laco_model, tiny_laco_processor
from laco.train import (
    LoraConfig,
    NonFiniteLossError,
    RunConfig,
    StageConfig,
    freeze_for_stage,
    latest_checkpoint,
    list_checkpoints,
    load_run_config,
    train,
)
from laco.train import loop as loop_module


ALIGN = ["compressor", "projector"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    return load_llava(write_toy_llava(folder, n=8))


def tiny(seed=0, **kw):
    model = tiny_laco_model(seed=seed, **kw)
    return model, tiny_laco_processor(model.config)


def run_config(out, stages, **kw):
    kw = {"progress": False, "log_every": 1, "save_every": 0, **kw}
    return RunConfig(output_dir=str(out), stages=stages, **kw)


def align(**kw):
    kw = {"learning_rate": 1e-2, "max_steps": 6, "batch_size": 4, "warmup_steps": 0, **kw}
    return StageConfig("align", list(ALIGN), **kw)


def groups_of(model):
    names = {"compressor": "model.vision_tower.compressors.", "encoder": "model.vision_tower.vision_model.",
             "projector": "model.multi_modal_projector.", "llm": ("model.language_model.", "lm_head.")}
    return {g: {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(p)} for g, p in names.items()}


# -- configs -----------------------------------------------------------------------------------------
def test_yaml_config_roundtrip_and_example_configs(tmp_path):
    cfg = run_config(tmp_path / "r", [align(group_lr={"projector": 2e-3}), StageConfig("ft", ["projector", "llm"])])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_run_config(path) == cfg
    text = path.read_text().replace("learning_rate: 0.01", "learning_rate: 1e-2")  # YAML 1.1 reads 1e-2 as a string
    path.write_text(text)
    assert load_run_config(path).stages[0].learning_rate == 1e-2
    shipped = sorted((Path(__file__).parent.parent / "configs" / "train").glob("*.yaml"))
    assert shipped, "example run configs are missing"
    for p in shipped:
        c = load_run_config(p)
        assert c.stages[0].trainable == ALIGN  # stage 1 of every example: PML + projector


BAD_CONFIGS = {
    "unknown group": ({"stages": [{"name": "a", "trainable": ["vit"]}]}, ValueError, "unknown group 'vit'"),
    "unknown key": ({"stages": [{"name": "a", "trainable": ["llm"], "lr": 1}]}, ValueError, r"unknown key\(s\) \['lr'\]"),
    "wrong type": ({"stages": [{"name": "a", "trainable": ["llm"], "batch_size": "8"}]}, TypeError, "batch_size must be an integer"),
    "no stages": ({"stages": []}, ValueError, "at least one stage"),
    "empty trainable": ({"stages": [{"name": "a", "trainable": []}]}, ValueError, "at least one of"),
    "group_lr not trained": ({"stages": [{"name": "a", "trainable": ["llm"], "group_lr": {"projector": 1.0}}]},
                             ValueError, "not in trainable"),
    "lora without llm": ({"stages": [{"name": "a", "trainable": ["projector"], "lora": {}}]}, ValueError, "add 'llm'"),
    "duplicate names": ({"stages": [{"name": "a", "trainable": ["llm"]}, {"name": "a", "trainable": ["llm"]}]},
                        ValueError, "unique"),
    "bad name": ({"stages": [{"name": "a/b", "trainable": ["llm"]}]}, ValueError, "simple folder name"),
    "zero lr": ({"stages": [{"name": "a", "trainable": ["llm"], "learning_rate": 0}]}, ValueError, "learning_rate must be > 0"),
    "bad scheduler": ({"stages": [{"name": "a", "trainable": ["llm"], "scheduler": "step"}]}, ValueError, "scheduler must be one of"),
    "two model sources": ({"model": {"tiny": {}, "pretrained": "x"}}, ValueError, "exactly one of"),
    "vision without llm": ({"model": {"vision": "v"}}, ValueError, "go together"),
    "bad mixed precision": ({"mixed_precision": "fp8"}, ValueError, "mixed_precision must be one of"),
    "missing stage name": ({"stages": [{"trainable": ["llm"]}]}, ValueError, r"missing required key\(s\) \['name'\]"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_are_clear_errors(case):
    patch, exc, match = BAD_CONFIGS[case]
    data = {"output_dir": "runs/x", "stages": [{"name": "a", "trainable": ["projector"]}], **patch}
    with pytest.raises(exc, match=match):
        load_run_config(data)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_run_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("stages: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")


# -- freezing ----------------------------------------------------------------------------------------
def test_freeze_for_stage():
    model, _ = tiny()
    params = freeze_for_stage(model, ALIGN)
    groups = model.parameter_groups()
    assert {id(p) for p in params} == {id(p) for g in ALIGN for p in groups[g]}
    for g, ps in groups.items():
        assert all(p.requires_grad == (g in ALIGN) for p in ps), g
    with pytest.raises(ValueError, match="unknown parameter group"):
        freeze_for_stage(model, ["vision"])
    with pytest.raises(TypeError, match="list of group names"):
        freeze_for_stage(model, "llm")


# -- training ----------------------------------------------------------------------------------------
def test_stage1_trains_exactly_pml_and_projector(tmp_path, toy):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = tiny()
    before = groups_of(model)
    result = train(model, processor, toy, run_config(tmp_path / "run", [align()]))
    losses = result.losses
    assert len(losses) == 6 and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.03, losses  # loss falls
    after = groups_of(model)
    for g in ("encoder", "llm"):  # frozen: bit-identical
        assert all(torch.equal(before[g][k], after[g][k]) for k in before[g]), g
    for g in ("compressor", "projector"):  # every tensor of the trained parts moved
        changed = [k for k in before[g] if not torch.equal(before[g][k], after[g][k])]
        assert changed == list(before[g]), g
    # outputs: the stage's model dir (safetensors + processor), metrics, the resolved config
    out = tmp_path / "run"
    assert result.model_dir == out / "align" and (out / "align" / "model.safetensors").is_file()
    assert load_run_config(out / "run_config.yaml") == load_run_config(run_config(out, [align()]).to_dict())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"loss", "lr", "tokens_per_s", "samples_per_s", "grad_norm"} <= set(rows[0])
    assert set(rows[0]["lr"]) == set(ALIGN) and rows[0]["samples_per_s"] > 0
    assert [r["loss"] for r in rows] == pytest.approx(losses)
    # the chain: trained -> save_pretrained -> Auto classes after `import laco` -> same generation
    reloaded = AutoModelForImageTextToText.from_pretrained(result.model_dir)
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in reloaded.state_dict().items())
    proc2 = AutoProcessor.from_pretrained(result.model_dir)
    prompt = [{"role": "user", "content": "<image>\nWhat is in the image?"}]
    texts = [p.apply_chat_template(prompt, add_generation_prompt=True) for p in (processor, proc2)]
    image = toy[0]["images"]
    outs = [m.generate(**p(text=[t], images=image, return_tensors="pt"), max_new_tokens=6, do_sample=False)
            for m, p, t in ((model, processor, texts[0]), (reloaded, proc2, texts[1]))]
    assert torch.equal(outs[0], outs[1])


def test_grad_accumulation_matches_the_full_batch(tmp_path, toy):
    # one optimizer step over the same 4 samples: 1 x 4 vs 2 x 2 micro-batches (token-mean over the global batch)
    results = []
    for bs, acc in ((4, 1), (2, 2)):
        model, processor = tiny()
        stage = align(max_steps=1, batch_size=bs, grad_accum=acc, max_grad_norm=None)
        r = train(model, processor, toy, run_config(tmp_path / f"b{bs}", [stage]))
        results.append((r.losses[0], {k: v.clone() for k, v in model.state_dict().items()}))
    (l1, w1), (l2, w2) = results
    assert l1 == pytest.approx(l2, rel=1e-6)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)


@pytest.mark.compat  # also in the oldest-transformers CI venv: the checkpointing API's name differs in 5.17
def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path, toy):
    # non-reentrant activation checkpointing recomputes the same forward: same losses and weights
    runs = []
    for ckpt in (False, True):
        model, processor = tiny()
        stage = StageConfig("ft", ["projector", "llm"], learning_rate=1e-2, max_steps=2, batch_size=4,
                            gradient_checkpointing=ckpt)
        r = train(model, processor, toy, run_config(tmp_path / str(ckpt), [stage], tensorboard=ckpt))
        runs.append((r.losses, model.state_dict()))
    (l0, w0), (l1, w1) = runs
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert all(torch.allclose(w0[k], w1[k], atol=1e-6) for k in w0)
    assert any((tmp_path / "True" / "tensorboard").rglob("events.out.tfevents*"))
    assert (tmp_path / "True" / "training.png").stat().st_size > 0


def test_tensorboard_without_the_package_is_an_early_error(tmp_path, toy, monkeypatch):
    real = loop_module.importlib.util.find_spec
    monkeypatch.setattr(loop_module.importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    model, processor = tiny()
    with pytest.raises(ValueError, match="needs the tensorboard package"):
        train(model, processor, toy, run_config(tmp_path, [align(max_steps=1)], tensorboard=True))


class Crash(RuntimeError):
    pass


def _crash_after(monkeypatch, n_steps):
    real = loop_module._optimizer_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        if calls["n"] == n_steps:
            raise Crash("simulated crash")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "_optimizer_step", step)


def _two_stages():
    return [align(max_steps=2, batch_size=2),
            StageConfig("finetune", ["projector", "llm"], learning_rate=5e-3, max_steps=4, batch_size=3,
                        warmup_steps=1, scheduler="cosine")]


def test_resume_is_exact(tmp_path, toy, monkeypatch):
    # dropout in the trained LLM: the resumed run must also restore the RNG states to match
    kw = {"text": {"attention_dropout": 0.2}}
    model, processor = tiny(**kw)
    train(model, processor, toy, run_config(tmp_path / "full", _two_stages(), save_every=2))
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    out = tmp_path / "killed"
    cfg = run_config(out, _two_stages(), save_every=2)
    model, processor = tiny(**kw)
    _crash_after(monkeypatch, 2 + 3)  # stage 1 done, stage 2 checkpointed at step 2, crash during step 4
    with pytest.raises(Crash):
        train(model, processor, toy, cfg)
    monkeypatch.undo()
    assert (out / "align" / "laco_stage.json").is_file()
    ckpt = latest_checkpoint(out)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    with pytest.raises(ValueError, match="already holds a run"):
        train(*tiny(**kw), toy, cfg)
    model, processor = tiny(seed=123, **kw)  # different initial weights: everything must come from disk
    result = train(model, processor, toy, cfg, resume=True)
    assert result.global_step == 6 and len(result.stages[1].losses) == 2
    state = model.state_dict()
    assert all(torch.equal(reference[k], state[k]) for k in reference)
    steps = [json.loads(x)["global_step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # lines written after the checkpoint by the killed run were dropped
    assert list_checkpoints(out) == []  # superseded by the finished stages' model directories


def test_resume_refuses_a_changed_config_or_data(tmp_path, toy, monkeypatch):
    cfg = run_config(tmp_path / "r", [align(max_steps=1)])
    train(*tiny(), toy, cfg)
    changed = run_config(tmp_path / "r", [align(max_steps=1, learning_rate=1.0)])
    with pytest.raises(ValueError, match="config changed.*stages"):
        train(*tiny(), toy, changed, resume=True)
    cfg = run_config(tmp_path / "d", [align(max_steps=4)], save_every=1)
    _crash_after(monkeypatch, 2)
    with pytest.raises(Crash):
        train(*tiny(), toy, cfg)
    monkeypatch.undo()
    fewer = load_llava(toy.records.select(range(6)).to_list(), toy.image_folder)
    with pytest.raises(ValueError, match="written for 8 samples .* now has 6"):
        train(*tiny(), fewer, cfg, resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, toy, monkeypatch):
    real = loop_module.token_loss_sum
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(loop_module, "token_loss_sum", poisoned)
    model, processor = tiny()
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="loss is nan.*stopped before updating"):
        train(model, processor, toy, run_config(out, [align(max_steps=6)], save_every=3))
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "checkpoint-00000003"
    from safetensors.torch import load_file

    saved = load_file(ckpt / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(saved[k], state[k]) for k in saved)  # the NaN step changed nothing


def test_lora_stage_trains_adapters_and_merges_them(tmp_path, toy):
    model, processor = tiny()
    before = groups_of(model)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    stage = StageConfig("lora", ["projector", "llm"], learning_rate=1e-2, max_steps=3, batch_size=4, lora=lora)
    result = train(model, processor, toy, run_config(tmp_path / "r", [stage]))
    assert not any("lora" in k for k in model.state_dict())  # merged and removed
    after = groups_of(model)
    moved = {k for k in before["llm"] if not torch.equal(before["llm"][k], after["llm"][k])}
    assert moved and all(("q_proj" in k or "v_proj" in k) and k.endswith("weight") for k in moved)
    assert all(torch.equal(before["encoder"][k], after["encoder"][k]) for k in before["encoder"])
    assert result.losses[-1] < result.losses[0]


def test_data_errors_come_before_training(tmp_path, toy):
    model, processor = tiny()
    with pytest.raises(ValueError, match="stage 'align' has no data"):
        train(model, processor, None, run_config(tmp_path / "a", [align()]))
    with pytest.raises(ValueError, match="needs a run config"):
        train(model, processor, toy)
    assert not (tmp_path / "a").exists()


def test_build_from_each_model_source(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, SiglipImageProcessorPil

    from laco.model.testing import save_tiny_mllm, tiny_text_config, tiny_tokenizer, tiny_vision_config
    from laco.train import ModelSource
    from laco.train.build import build_from_source

    model, processor = build_from_source(ModelSource(tiny={}), seed=3)
    assert processor.num_image_tokens == model.num_image_tokens == 16
    save_tiny_mllm(tmp_path / "saved")
    model, processor = build_from_source(ModelSource(pretrained=str(tmp_path / "saved")))
    assert type(model).__name__ == "LaCoForConditionalGeneration" and processor.num_image_tokens == 16
    # pretrained parts on disk: a vision encoder folder and an LLM folder with its tokenizer
    AutoModel.from_config(AutoConfig.for_model(**tiny_vision_config())).save_pretrained(tmp_path / "vision")
    own = dict(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])  # not the SigLIP family's 0.5 / 0.5
    SiglipImageProcessorPil(size={"height": 224, "width": 224}, **own).save_pretrained(tmp_path / "vision")
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_text_config())).save_pretrained(tmp_path / "llm")
    tiny_tokenizer().save_pretrained(tmp_path / "llm")
    source = ModelSource(vision=str(tmp_path / "vision"), llm=str(tmp_path / "llm"),
                         compression={"method": "laco", "layer": "post", "ratio": 2})
    model, processor = build_from_source(source)
    assert processor.num_image_tokens == model.num_image_tokens == 16
    assert model.vision_tower.merge_layers == [4]  # "post": after the last of 4 layers
    ip = processor.image_processor  # the encoder's own statistics, its size set to the model's 64 px
    assert (list(ip.image_mean), list(ip.image_std), ip.size["height"]) == (own["image_mean"], own["image_std"], 64)
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        build_from_source(ModelSource(pretrained=str(tmp_path)))
    with pytest.raises(ValueError, match="no 'model' section"):
        build_from_source(None)


# -- CLI ---------------------------------------------------------------------------------------------
def _write_cli_config(tmp_path, **extra):
    data = write_toy_llava(tmp_path / "data", n=4)
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"tiny": {}}, "progress": False,
           "data": {"path": str(data)}, "stages": [{"name": "align", "trainable": ALIGN, "max_steps": 2, "batch_size": 2}],
           **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_train_and_its_errors(tmp_path, monkeypatch, capsys):
    from laco.cli import main

    def laco(*args):
        monkeypatch.setattr(sys, "argv", ["laco", *args])
        try:
            main()
        except SystemExit as e:
            return e.code
        return 0

    path = _write_cli_config(tmp_path)
    assert laco("train", str(path)) == 0
    assert "final model in" in capsys.readouterr().out and (tmp_path / "run" / "align" / "config.json").is_file()
    assert laco("train", str(path)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert laco("train", str(path), "--resume") == 0  # nothing left to do
    assert "2 steps" in capsys.readouterr().out
    bad = _write_cli_config(tmp_path, stages=[{"name": "align", "trainable": ["vit"]}])
    assert laco("train", str(bad)) == 2
    err = capsys.readouterr().err
    assert "unknown group 'vit'" in err and len(err.strip().splitlines()) == 1


def test_cli_train_stage1_on_onevision_video_and_multi_image(tmp_path, monkeypatch, capsys):
    """`laco train` stage 1 on a tiny OneVision-layout model (AnyRes, image_newline, <video>) saved to a folder,
    with a video sample (a frame folder, max_frames from the YAML), a 2-image sample and a tiled image sample:
    the PML, projector and image_newline train, nothing else; the trained folder loads and runs a video."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from laco.cli import main
    from laco.model.testing import tiny_onevision

    model, processor = tiny_onevision()
    model.save_pretrained(tmp_path / "ov")
    processor.save_pretrained(tmp_path / "ov")
    data = tmp_path / "data"
    (data / "clip").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (80, 48), (40 * i, 90, 250 - 40 * i)).save(data / "clip" / f"{i:03d}.jpg")
    Image.new("RGB", (128, 64), (200, 30, 30)).save(data / "wide.png")  # 1x2 tiles + base when alone
    Image.new("RGB", (50, 70), (30, 30, 200)).save(data / "tall.png")
    records = [
        {"id": "video", "video": "clip", "conversations": [{"from": "human", "value": "<video>\nWhat changes?"},
                                                            {"from": "gpt", "value": "The colour."}]},
        {"id": "pair", "image": ["wide.png", "tall.png"], "conversations": [
            {"from": "human", "value": "<image> or <image>: which is red?"}, {"from": "gpt", "value": "The first."}]},
        {"id": "one", "image": "wide.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                              {"from": "gpt", "value": "Red."}]},
    ]
    (data / "train.json").write_text(json.dumps(records))
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"pretrained": str(tmp_path / "ov")}, "progress": False,
           "data": {"path": str(data / "train.json"), "max_frames": 4, "max_length": 512},
           "stages": [{"name": "align", "trainable": ALIGN, "max_steps": 2, "batch_size": 3, "learning_rate": 1e-2,
                       "warmup_steps": 0}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(sys, "argv", ["laco", "train", str(tmp_path / "run.yaml")])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    assert "final model in" in capsys.readouterr().out
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "align").eval()
    before, after = model.state_dict(), trained.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.image_newline" in changed and any(k.startswith("model.vision_tower.compressors.") for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    trained_parts = ("model.vision_tower.compressors.", "model.multi_modal_projector.", "model.image_newline")
    assert all(k.startswith(trained_parts) for k in changed), changed
    proc = AutoProcessor.from_pretrained(tmp_path / "run" / "align")
    frames = [Image.open(data / "clip" / f"{i:03d}.jpg") for i in range(4)]
    batch = proc(text="<video>\nWhat changes?", videos=[frames])
    assert int((batch["input_ids"] == trained.config.video_token_id).sum()) == proc.video_tokens(4) == 4 * 16 + 1
    with torch.no_grad():
        assert trained(**batch).logits.shape[1] == batch["input_ids"].shape[1]


# -- slow: real processes ----------------------------------------------------------------------------
SLOW_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from laco.train import loop
real = loop._optimizer_step
delay = float(sys.argv[2])
def slow(*a, **k):
    time.sleep(delay)
    return real(*a, **k)
loop._optimizer_step = slow
sys.argv = ["laco", "train", sys.argv[1], *sys.argv[3:]]
from laco.cli import main
main()
"""


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    data = write_toy_llava(tmp_path / "data", n=8)
    base = {"model": {"tiny": {}}, "progress": False, "save_every": 3, "seed": 1, "data": {"path": str(data)},
            "stages": [{"name": "align", "trainable": ALIGN, "max_steps": 4, "batch_size": 2, "learning_rate": 1e-2},
                       {"name": "finetune", "trainable": ["projector", "llm"], "max_steps": 12, "batch_size": 2,
                        "learning_rate": 5e-3}]}
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_SCRIPT)
    paths = {}
    for name in ("full", "killed"):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({**base, "output_dir": str(tmp_path / name)}))
    subprocess.run([sys.executable, str(script), str(paths["full"]), "0"], check=True, env=_env(), timeout=600)

    proc = subprocess.Popen([sys.executable, str(script), str(paths["killed"]), "0.3"], env=_env())
    killed_dir = tmp_path / "killed"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a mid-stage-2 checkpoint, then kill without warning
        ckpt = latest_checkpoint(killed_dir)
        if ckpt is not None and json.loads((ckpt / "trainer_state.json").read_text())["stage_index"] == 1:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "finetune" / "laco_stage.json").exists(), "killed too late"
    subprocess.run([sys.executable, str(script), str(paths["killed"]), "0", "--resume"], check=True, env=_env(),
                   timeout=600)

    from safetensors.torch import load_file

    full = load_file(tmp_path / "full" / "finetune" / "model.safetensors")
    resumed = load_file(killed_dir / "finetune" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


DDP_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from laco.data import load_llava
from laco.model.testing import tiny_laco_model, tiny_laco_processor
from laco.train import RunConfig, StageConfig, train
out, data, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = tiny_laco_model(seed=0)
stages = [StageConfig("align", ["compressor", "projector"], learning_rate=1e-2, max_steps=3, batch_size=batch_size,
                      warmup_steps=0),
          StageConfig("finetune", ["projector", "llm"], learning_rate=5e-3, max_steps=2, batch_size=batch_size)]
cfg = RunConfig(output_dir=out, stages=stages, progress=False, log_every=1, save_every=0)
result = train(model, tiny_laco_processor(model.config), load_llava(data), cfg)
import accelerate
rank = accelerate.PartialState().process_index
torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/weights-rank{rank}.pt")
json.dump(result.losses, open(f"{out}/losses-rank{rank}.json", "w"))
"""


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    # 8 samples; 1 process x batch 4 vs 2 processes x batch 2: the same samples form each global batch
    data = write_toy_llava(tmp_path / "data", n=8)
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), str(data), "4"], check=True, env=_env(),
                   timeout=600)
    # torchrun: accelerate launch needs mpirun for several CPU processes; the Accelerator sees a gloo group either way
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    subprocess.run([*launch, str(script), str(tmp_path / "two"), str(data), "2"], check=True, env=_env(), timeout=600)

    def weights(run, rank):
        return torch.load(tmp_path / run / f"weights-rank{rank}.pt", weights_only=True)

    one, r0, r1 = weights("one", 0), weights("two", 0), weights("two", 1)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # both ranks end identical
    # the same up to float summation order (gloo all-reduce vs one batch); Adam's m/sqrt(v) turns a 1e-9 gradient
    # difference on a near-zero gradient into ~1e-5 weight differences, 1% of one step at these learning rates
    assert all(torch.allclose(one[k], r0[k], atol=1e-4) for k in one)
    l_one = json.loads((tmp_path / "one" / "losses-rank0.json").read_text())
    l_two = json.loads((tmp_path / "two" / "losses-rank0.json").read_text())
    assert l_two == pytest.approx(l_one, rel=1e-5)
