"""``laco compare --data``: the MLLM scenarios on a user's LLaVA-format data (``experiments/compare/userdata.py``)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from laco.cli import app
from laco.data.llava import write_toy_llava

TORCH_THREADS = 1  # tiny models (tests/conftest.py)
SMOKE = ["compare", "--preset", "smoke", "--methods", "none,laco@1/4"]


def _user_data(root, n_train: int = 24, n_eval: int = 8):
    """A toy LLaVA training file and an eval JSONL (laco eval's format) on other toy images; returns both paths."""
    train = write_toy_llava(root / "train", n=n_train, size=32)
    toy = json.loads(write_toy_llava(root / "eval", n=n_eval, size=32, seed=1).read_text())
    lines = [{"id": f"q{i}", "image": r["image"], "question": "What is in the image?",
              "answer": r["conversations"][1]["value"], "metric": "exact", "task": "shape"} for i, r in enumerate(toy)]
    ev = root / "eval" / "test.jsonl"
    ev.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return train, ev


def _invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_own_data_end_to_end_with_the_embedded_encoder(tmp_path):
    from laco.eval.blind import blind_baseline

    train, ev = _user_data(tmp_path)
    chat = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."}]
    records = json.loads(train.read_text())  # + two text-only records (as LLaVA-665K has): left out, counted
    train.write_text(json.dumps(records + [{"id": f"t{i}", "conversations": chat} for i in range(2)]))
    out = tmp_path / "out"
    res = _invoke([*SMOKE, "--scenarios", "train", "--data", train, "--eval", ev, "--out", out,
                   "--cache-dir", tmp_path / "cache"])
    assert res.exit_code == 0, (res.output, res.exception)
    results = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["scenario"]) for r in results["runs"]}
    assert {("none", "train"), ("laco@1/4", "train"), ("text-only LLM", "baseline")} <= rows
    assert {r["scenario"] for r in results["runs"]} == {"train", "baseline"}
    assert all(r["after"]["n"] == 8 for r in results["runs"])  # every eval question scored
    # the blind row is laco.eval.blind on the user's two files
    assert results["blind"]["accuracy"] == pytest.approx(blind_baseline(train, ev).accuracy)
    names = [b["name"] for b in results["baselines"]]
    assert names == ["blind (majority answer)", "text-only LLM (no image)"]
    assert results["baselines"][0]["acc_mean"] == pytest.approx(blind_baseline(train, ev).accuracy, abs=0.01)
    data = results["data"]
    assert data["train_file"] == str(train) and data["counts"] == {
        "train_conversations": 24, "train_images": 24, "train_text_only_left_out": 2, "eval_questions": 8,
        "eval_images": 8}
    assert "pretrained encoder" in data["seed_varies"] and "LLM" in data["seed_varies"]
    md = (out / "results.md").read_text()
    assert "24 conversations, 24 images; 2 text-only records left out" in md
    assert "your own" in md and str(ev) in md and "a seed varies" in md and "| *blind (majority answer)* |" in md
    assert (out / "command.txt").is_file() and (out / "acc_vs_flops.png").is_file()


def test_own_data_errors_name_the_problem(tmp_path):
    train, ev = _user_data(tmp_path, n_train=4, n_eval=2)
    base = [*SMOKE, "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache"]
    # a bad record: the loader's error, naming the record
    records = json.loads(train.read_text())
    records[2]["conversations"][0]["value"] = "<image>\n<image>\nWhat is in the image?"
    bad = train.with_name("bad.json")
    bad.write_text(json.dumps(records))
    res = _invoke([*base, "--scenarios", "train", "--data", bad, "--eval", ev])
    assert res.exit_code != 0 and "record 'toy-00002' (#2)" in str(res.exception)
    assert "2 '<image>' placeholder(s) but 1 image(s)" in str(res.exception)
    assert not (tmp_path / "out").exists()  # a run that failed before writing anything leaves no folder behind
    # several images: refused, naming the record
    records[2]["image"] = [records[2]["image"], records[3]["image"]]
    bad.write_text(json.dumps(records))
    res = _invoke([*base, "--scenarios", "train", "--data", bad, "--eval", ev])
    assert res.exit_code != 0 and "toy-00002" in str(res.exception) and "single-image" in str(res.exception)
    # only text-only records: nothing to compare on
    chat = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."}]
    bad.write_text(json.dumps([{"id": "t", "conversations": chat}]))
    res = _invoke([*base, "--scenarios", "train", "--data", bad, "--eval", ev])
    assert res.exit_code != 0 and "no record with an image (1 text-only records)" in str(res.exception)
    # readout needs the embedded encoder's head
    res = _invoke([*base, "--scenarios", "readout,train", "--data", train, "--eval", ev])
    assert res.exit_code != 0 and "readout" in str(res.exception) and "--data" in str(res.exception)
    # flags that go together, paths checked first
    res = _invoke([*base, "--data", train])
    assert res.exit_code != 0 and "--data and --eval go together" in str(res.exception)
    res = _invoke([*base, "--data", train, "--eval", tmp_path / "missing.jsonl"])
    assert res.exit_code != 0 and "missing.jsonl" in str(res.exception)
    res = _invoke([*base, "--llm", tmp_path])
    assert res.exit_code != 0 and "--llm" in str(res.exception) and "--data" in str(res.exception)


def _tiny_vision(folder, with_processor: bool = True):
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                             image_size=32, patch_size=8)  # 4 x 4 patches; a real SigLIP keeps its pooling head
    SiglipVisionModel(cfg).save_pretrained(folder)
    if with_processor:  # a resize other than the encoder's (set to its input) and statistics other than SigLIP's
        SiglipImageProcessorPil(size={"height": 48, "width": 48}, image_mean=[0.2, 0.4, 0.6],
                                image_std=[0.5, 0.25, 0.125]).save_pretrained(folder)
    return folder


#: a template that is not ChatML: the answer marks come from the template itself
TEMPLATE = ("{% for m in messages %}{{ '<s>' + m['role'] + ': ' + m['content'] + '</s>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}")


def _tiny_llm(folder, train_file, chat_template: str | None = TEMPLATE):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from laco.model.tokenizer import train_small_tokenizer

    texts = [t["value"] for r in json.loads(train_file.read_text()) for t in r["conversations"]]
    tok = train_small_tokenizer(texts, 300, image_token="<img>")  # no "<image>": compare adds it
    tok.add_tokens(["<s>", "</s>"], special_tokens=True)
    tok.chat_template = chat_template
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, len(tok)


def test_answer_marks_follow_the_chat_template(tmp_path):
    from laco.experiments.compare.text import answer_marks, tokenize_split
    from laco.experiments.compare.userdata import load_tokenizer
    from laco.model.tokenizer import train_small_tokenizer

    assert answer_marks(train_small_tokenizer(["a b"], 300)) == ("<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>")
    train, _ = _user_data(tmp_path, n_train=2, n_eval=1)
    folder, n = _tiny_llm(tmp_path / "llm", train)
    tok = load_tokenizer(folder)
    assert len(tok) == n + 1 and tok.convert_tokens_to_ids("<image>") == n  # added at the end
    assert answer_marks(tok) == ("</s>\n<s>assistant: ", "</s>")
    msgs = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A red circle."}]
    split = tokenize_split(tok, [(msgs, 0, 1, "t", 1)], 3)
    scored = split.input_ids[0][split.labels[0] != -100]
    assert tok.decode(scored) == "A red circle.</s>"
    assert int((split.input_ids[0] == tok.convert_tokens_to_ids("<image>")).sum()) == 3
    # the grown rows are drawn from nothing random: the same LLM for every seed
    import torch

    from laco.experiments.compare.userdata import load_llm

    a, b = load_llm(folder, tok), (torch.manual_seed(1), load_llm(folder, tok))[1]
    assert a.get_input_embeddings().num_embeddings == n + 1
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    assert torch.allclose(a.get_input_embeddings().weight[n], a.get_input_embeddings().weight[:n].mean(0))
    _tiny_llm(tmp_path / "nochat", train, chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(tmp_path / "nochat")


@pytest.mark.compat  # also in the oldest-transformers CI venv: 5.17's SiglipVisionConfig has no vision_use_head default
def test_own_data_with_vision_and_llm_from_disk(tmp_path):
    from laco.experiments.compare.userdata import load_vision

    train, ev = _user_data(tmp_path, n_train=16, n_eval=6)
    vision = _tiny_vision(tmp_path / "vision")
    llm, _ = _tiny_llm(tmp_path / "llm", train)
    tower = load_vision(vision)  # the saved pooling head is not built (the patch tokens are what an MLLM reads)
    assert not any("head" in name.split(".") for name, _ in tower.named_parameters())
    out = tmp_path / "out"
    # no --scenarios: the preset's MLLM scenarios (smoke: all three), without readout
    res = _invoke([*SMOKE, "--data", train, "--eval", ev, "--vision", vision, "--llm", llm, "--out", out,
                   "--cache-dir", tmp_path / "cache"])
    assert res.exit_code == 0, (res.output, res.exception)
    results = json.loads((out / "results.json").read_text())
    runs = {(r["method"], r["scenario"]): r for r in results["runs"]}
    assert {s for _, s in runs} == {"train", "train_encoder", "retrofit", "baseline"}
    assert {("none", "train"), ("laco@1/4", "train"), ("laco@1/4", "retrofit"), ("text-only LLM", "baseline")} <= set(runs)
    assert runs[("none", "train")]["visual_tokens"] == 16 and runs[("laco@1/4", "train")]["visual_tokens"] == 4
    assert results["encoder"]["config"]["image_size"] == 32 and results["encoder"]["pretrain_metrics"]["source"] == str(vision)
    assert results["data"]["vision"] == str(vision) and results["data"]["llm"] == str(llm)
    assert "same for every seed" in results["data"]["seed_varies"]
    assert "pretrained encoder" not in results["data"]["seed_varies"]
    # no image processor beside the encoder: refused before anything runs
    (vision / "preprocessor_config.json").unlink()
    res = _invoke([*SMOKE, "--scenarios", "train", "--data", train, "--eval", ev, "--vision", vision,
                   "--out", tmp_path / "out2"])
    assert res.exit_code != 0 and "preprocessor_config.json" in str(res.exception)


def test_vision_images_go_through_the_folders_image_processor(tmp_path):
    """--vision: the folder's processor (its statistics) at the encoder's input size, not SigLIP's 0.5 / 0.5."""
    import numpy as np
    from PIL import Image

    from laco.experiments.compare.userdata import processor_pixels
    from laco.safety import open_image

    train, _ = _user_data(tmp_path, n_train=2, n_eval=1)
    vision = _tiny_vision(tmp_path / "vision")
    image = train.parent / "images" / "00001.png"
    px = processor_pixels(vision, 32)([image, image])
    assert px.shape == (2, 3, 32, 32)
    raw = np.asarray(open_image(image).resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0  # (32, 32, 3)
    mean, std = np.array([0.2, 0.4, 0.6]), np.array([0.5, 0.25, 0.125])
    want = ((raw - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(px[0].numpy(), want, atol=0.05)  # resampling filters differ slightly


def test_user_dataset_rows_image_folder_and_eval_refusals(tmp_path):
    """Image rows are per distinct file; --image-folder resolves both files; <image> moves to the front of its
    turn; an eval line with several images is refused, naming its line and id."""
    from laco.experiments.compare import load_preset
    from laco.experiments.compare.userdata import UserSource, load_user_dataset

    write_toy_llava(tmp_path / "pics", n=3, size=32)  # images in pics/images/, the data files elsewhere
    (tmp_path / "data").mkdir()
    conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    train = tmp_path / "data" / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "image": "images/00000.png", "conversations": conv("What is it?\n<image>", "A red square.")},
        {"id": "b", "image": "images/00001.png", "conversations": conv("<image>\nWhat is it?", "A green square.")},
        {"id": "c", "image": "images/00000.png", "conversations": conv("<image>\nColour?", "Red.")}]))
    ev = tmp_path / "data" / "test.jsonl"
    ev.write_text(json.dumps({"id": "q", "image": "images/00002.png", "question": "What is it?",
                              "answer": ["A blue square.", "blue"], "metric": "exact"}) + "\n")
    preset = load_preset("smoke", scenarios=["train"])
    ds = load_user_dataset(UserSource(train, ev, tmp_path / "pics"), preset, log=lambda *a: None)
    assert ds.images["train"] == [tmp_path / "pics" / "images" / f"0000{i}.png" for i in (0, 1)]
    assert [c[1] for c in ds.convs["train"]] == [0, 1, 0]  # record c shows record a's image
    assert ds.convs["train"][0][0][0]["content"] == "<image>\nWhat is it?"
    assert ds.images["test"] == [tmp_path / "pics" / "images" / "00002.png"]
    assert ds.convs["test"][0][0][-1] == {"role": "assistant", "content": "A blue square."}  # the first reference
    ev.write_text(json.dumps({"id": "q2", "images": ["images/00001.png", "images/00002.png"], "question": "Same?",
                              "answer": "no", "metric": "exact"}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:1 \(record 'q2'\): 2 images: .*single-image"):
        load_user_dataset(UserSource(train, ev, tmp_path / "pics"), preset, log=lambda *a: None)
    res = _invoke([*SMOKE, "--eval", ev])
    assert res.exit_code != 0 and "--data and --eval go together" in str(res.exception)


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_own_data_with_clip_and_dinov2_towers(tmp_path, family):
    """CLS-prefixed towers with centre-cropping processors (CLIP's, DINOv2's Bit one) run end to end."""
    import transformers as tf

    train, ev = _user_data(tmp_path, n_train=8, n_eval=4)
    vision = tmp_path / family
    small = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8)
    if family == "clip":
        tf.CLIPVisionModel(tf.CLIPVisionConfig(**small, intermediate_size=64)).save_pretrained(vision)
        proc = tf.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40})
    else:
        tf.Dinov2Model(tf.Dinov2Config(**small, mlp_ratio=2)).save_pretrained(vision)
        proc = tf.BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 36, "width": 36})
    proc.save_pretrained(vision)
    llm, _ = _tiny_llm(tmp_path / "llm", train)
    out = tmp_path / "out"
    res = _invoke([*SMOKE, "--scenarios", "train", "--data", train, "--eval", ev, "--vision", vision, "--llm", llm,
                   "--out", out, "--cache-dir", tmp_path / "cache"])
    assert res.exit_code == 0, (res.output, res.exception)
    runs = {(r["method"], r["scenario"]): r for r in json.loads((out / "results.json").read_text())["runs"]}
    # 4 x 4 patches (the CLS token is dropped), 2 x 2 after the merge
    assert runs[("none", "train")]["visual_tokens"] == 16 and runs[("laco@1/4", "train")]["visual_tokens"] == 4
