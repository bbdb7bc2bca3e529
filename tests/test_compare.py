"""The embedded pretrained encoder (cache + checksum) and ``laco compare`` (smoke preset end to end)."""

from __future__ import annotations

import json

import pytest
import torch

from laco.data.embedded import EmbeddedDataConfig
from laco.experiments import pretrain as P

TINY_DATA = EmbeddedDataConfig(num_train=48, num_val=8, num_test=16)
TINY_PRE = P.PretrainConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, steps=2,
                            batch_size=8, pool_size=32, eval_size=16, warmup_steps=1, data=TINY_DATA)


TORCH_THREADS = 1  # tiny models: one thread is fastest, and the machine is shared (tests/conftest.py)


def test_pretrained_encoder_is_cached_and_verified(tmp_path, monkeypatch):
    from transformers import SiglipVisionModel

    enc, head, metrics = P.load_pretrained_encoder(tmp_path, TINY_PRE, progress=False, with_head=True)
    assert isinstance(enc, SiglipVisionModel) and not enc.training
    assert {"quadrant_acc", "dot_acc", "source"} <= set(metrics)
    path = P.encoder_cache_path(TINY_PRE, tmp_path)
    assert P.verify_checksums(path) and (path / "model.safetensors").is_file()

    # second call: loaded from disk, never retrained, same weights
    def boom(*a, **k):
        raise AssertionError("should have been loaded from the cache")

    monkeypatch.setattr(P, "pretrain_encoder", boom)
    again = P.load_pretrained_encoder(tmp_path, TINY_PRE, progress=False)
    for (k, v), (_, w) in zip(enc.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k

    # a corrupt file is detected and the cache rebuilt (with a warning)
    monkeypatch.undo()
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(blob))
    assert not P.verify_checksums(path)
    with pytest.warns(UserWarning, match="corrupt"):
        P.load_pretrained_encoder(tmp_path, TINY_PRE, progress=False)
    assert P.verify_checksums(path)


def test_pretrain_config_key_and_errors():
    assert TINY_PRE.key() != P.PretrainConfig().key()
    with pytest.raises(ValueError, match="canvas"):
        P.PretrainConfig(image_size=32)


def test_readout_pools_quadrants():
    head = P.QuadrantReadout(8, 10)
    x = torch.randn(2, 64, 8)
    cls, dot = head(x, (8, 8))
    assert cls.shape == (2, 4, 10) and dot.shape == (2, 4)
    # changing only the top-left quadrant's tokens changes only quadrant 0's logits
    y = x.clone().view(2, 8, 8, 8)
    y[:, :4, :4] += torch.randn(2, 4, 4, 8)  # not a constant: the LayerNorm would remove it
    cls2, _ = head(y.view(2, 64, 8), (8, 8))
    assert not torch.allclose(cls2[:, 0], cls[:, 0]) and torch.allclose(cls2[:, 1:], cls[:, 1:])


# -- laco compare -------------------------------------------------------------------------------------
from laco.compressors.spec import parse_method  # noqa: E402
from laco.experiments import compare as C  # noqa: E402
from laco.experiments.compare import presets as CP  # noqa: E402


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    preset = C.load_preset("smoke", cache_dir=str(root / "cache"))
    return C.run_compare(preset, root / "out", command="laco compare --preset smoke", log=lambda *a: None), root / "out"


def test_smoke_preset_end_to_end(smoke_results):
    results, out = smoke_results
    for name in ("results.json", "results.md", "acc_vs_flops.png", "acc_vs_depth.png", "command.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["preset"] == "smoke" and saved["data_source"] in ("fashion_mnist", "generated")
    rows = {(r["scenario"], r["method"]): r for r in saved["table"]}
    # every method produced a number in every scenario, with its costs; ToMe's read-out is not applicable
    assert set(rows) == {(s, m) for s in C.SCENARIOS for m in C.DEFAULT_METHODS}
    assert rows[("readout", "laco@1/4")]["before_mean"] == rows[("readout", "avg_pool@1/4")]["before_mean"]
    for (scenario, method), r in rows.items():
        if (scenario, method) == ("readout", "tome@1/4"):
            assert r["acc_mean"] is None and "unordered" in r["not_applicable"]
            continue
        assert 0.0 <= r["acc_mean"] <= 100.0, (scenario, method)
        assert r["visual_tokens"] == (64 if method == "none" else 16)
        assert r["encoder_gflops"] > 0
        if scenario == "retrofit":
            assert r["before_mean"] is not None
    # in-encoder merges save encoder FLOPs, external ones cost a little more than none
    assert rows[("train", "laco@1/4")]["encoder_flop_ratio"] < 1.0 <= rows[("train", "laco@post")]["encoder_flop_ratio"]
    # retrofit trains only the compressor: parameter-free compressors have nothing to train
    assert rows[("retrofit", "avg_pool@1/4")]["trainable_params"] == 0
    assert rows[("retrofit", "laco@1/4")]["trainable_params"] < rows[("train", "laco@1/4")]["trainable_params"]
    # train_encoder also trains the encoder's layers (not its embeddings: the cached states start after them)
    from transformers import SiglipVisionModel

    vis = SiglipVisionModel(C.load_preset("smoke").pretrain.vision_config())
    extra = rows[("train_encoder", "none")]["trainable_params"] - rows[("train", "none")]["trainable_params"]
    assert extra == sum(q.numel() for n, q in vis.named_parameters() if "embeddings." not in n)
    # the reference rows: blind baseline (from the data) and the text-only LLM, in every MLLM table
    names = [b["name"] for b in saved["baselines"]]
    assert names == ["blind (majority answer)", "text-only LLM (no image)"]
    md = (out / "results.md").read_text()
    for scenario in C.SCENARIOS:
        assert f"## Scenario: {scenario}" in md
    assert md.count("*blind (majority answer)*") == 2 * 3  # accuracy and per-task tables of 3 MLLM scenarios
    assert "laco@1/4" in md and "ldpv2(residual=true)@1/4" in md and "samples/s" not in md


def test_blind_row_is_computed_from_the_data(smoke_results):
    from laco.eval.blind import blind_baseline

    results, _ = smoke_results
    data_dir = __import__("pathlib").Path(results["data_dir"])
    ref = blind_baseline(data_dir / "train.json", data_dir / "test.jsonl")
    assert results["blind"]["accuracy"] == ref.accuracy and results["baselines"][0]["acc_mean"] == round(ref.accuracy, 2)
    text = [r for r in results["runs"] if r["scenario"] == "baseline"]
    assert [r["seed"] for r in text] == [0] and results["baselines"][1]["acc_mean"] == text[0]["after"]["accuracy"]


@pytest.fixture(scope="module")
def smoke_ctx(tmp_path_factory):
    preset = C.load_preset("smoke", cache_dir=str(tmp_path_factory.mktemp("ctx")), methods=["none", "laco@1/4"])
    return C.prepare(preset, log=lambda *a: None), preset


def _batch(ctx, model, n: int = 6):
    """The first ``n`` training samples at the model's image-token count: (ids, mask, labels, pixels)."""
    n_tok = model.num_image_tokens
    key = ("train", n_tok)
    data = ctx.splits[key] if key in ctx.splits else C.tokenize_split(ctx.tok, C.conversations(ctx.ds, "train"), n_tok)
    idx = torch.arange(n)
    ids, mask, labels = data.batch(idx)
    return ids, mask, labels, ctx.ds.scenes["train"].images[data.image_index[idx].numpy()]


def test_inserted_laco_starts_as_avg_pool(smoke_ctx):
    """Right after insertion (zero-initialised projection) LaCo's MLLM logits equal average pooling's, tensor
    for tensor (the retrofit scenario's 'before' rows rely on it); a non-zero projection makes them differ."""
    ctx, preset = smoke_ctx
    laco_m, avg = (C.build_model(parse_method(n), preset, ctx.encoder, ctx.llm, ctx.tok, seed=0).eval()
                   for n in ("laco@1/4", "avg_pool@1/4"))
    avg.projector.load_state_dict(laco_m.projector.state_dict())  # retrofit: both load the same base projector
    ids, mask, labels, images = _batch(ctx, laco_m)
    pix = P.to_pixel_values(images)
    with torch.no_grad():
        ref = avg(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        torch.testing.assert_close(laco_m(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, ref,
                                   rtol=1e-5, atol=1e-5)
        for p in laco_m.vision_tower.compressors.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert not torch.allclose(laco_m(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, ref, atol=1e-3)


def test_cached_features_give_the_models_loss(smoke_ctx):
    """Training from cached encoder states == the model's own forward from pixels (same loss, same logits)."""
    ctx, preset = smoke_ctx
    for name in ("laco@1/4", "laco@post", "none", "tome@1/4", "laco@1/12"):
        model = C.build_model(parse_method(name), preset, ctx.encoder, ctx.llm, ctx.tok, seed=0).eval()
        # make the compressor non-trivial (LaCo starts as avg pooling)
        with torch.no_grad():
            for p in model.vision_tower.compressors.parameters():
                p.add_(0.05 * torch.randn_like(p))
        start = C.start_layer(model)
        ids, mask, labels, images = _batch(ctx, model)
        hidden = C.cache_hidden_states(ctx.encoder, images, [start])[start]
        with torch.no_grad():
            logits, loss = C.lm_logits_and_loss(model, C.image_features_from_hidden(model, hidden, start), ids, mask, labels)
            ref = model(input_ids=ids, attention_mask=mask, pixel_values=P.to_pixel_values(images), labels=labels)
        torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-4, msg=name)


def test_a_seed_is_a_replicate_encoder_llm_and_order(smoke_ctx):
    """Seed 1 pretrains its own encoder and text LLM (seed 0's are untouched and rebuilt identically)."""
    ctx0, preset = smoke_ctx
    ctx1 = C.prepare(preset, seed=1, log=lambda *a: None)
    again = C.prepare(preset, seed=0, log=lambda *a: None)
    for a, b, c in ((ctx0.encoder, ctx1.encoder, again.encoder), (ctx0.llm, ctx1.llm, again.llm)):
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert any(not torch.equal(sa[k], sb[k]) for k in sa)  # another replicate
        assert all(torch.equal(sa[k], sc[k]) for k in sa)  # the same seed: the same weights
    k = max(ctx0.hidden["train"])  # the cached states come from the seed's own encoder
    assert ctx1.seed == 1 and not torch.equal(ctx0.hidden["train"][k], ctx1.hidden["train"][k])
    assert C.derive_seed(0, "stage1") != C.derive_seed(1, "stage1") != C.derive_seed(1, "stage2")


def test_projector_init_is_the_same_for_every_method_of_a_seed(smoke_ctx):
    """The projector starts from the seed's own stream, whatever compressor is built (and drawn) first."""
    ctx, preset = smoke_ctx
    names = ["none", "laco@1/4", "pixel_shuffle@1/4", "tokenpacker@1/4", "ldpv2(residual=true)@1/4", "laco@post"]
    state = {n: C.build_model(parse_method(n), preset, ctx.encoder, ctx.llm, ctx.tok, seed=3).projector.state_dict()
             for n in names}
    for n in names[1:]:
        assert state[n].keys() == state["none"].keys()
        assert all(torch.equal(state[n][k], state["none"][k]) for k in state[n]), n
    other = C.build_model(parse_method("none"), preset, ctx.encoder, ctx.llm, ctx.tok, seed=4).projector.state_dict()
    assert any(not torch.equal(other[k], state["none"][k]) for k in other)
    # the compressor of a method is also a function of the seed alone
    a, b = (C.build_model(parse_method("pixel_shuffle@1/4"), preset, ctx.encoder, ctx.llm, ctx.tok, seed=3)
            .vision_tower.compressors.state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_encoder_trains_the_encoder_layers_only_in_stage_2(smoke_ctx):
    ctx, preset = smoke_ctx
    out = C.run_train(ctx, "laco@1/4", ["train", "train_encoder"])
    ref = ctx.encoder.state_dict()
    frozen = out["train"][1].vision_tower.vision_model.state_dict()
    trained = out["train_encoder"][1].vision_tower.vision_model.state_dict()
    assert all(torch.equal(frozen[k], ref[k]) for k in ref)
    changed = {k for k in ref if not torch.equal(trained[k], ref[k])}
    assert changed and not any("embeddings." in k for k in changed)  # the cached states start after the embeddings
    assert all(".layers." in k or "post_layernorm" in k for k in changed)
    assert any(".layers.0." in k for k in changed)  # layers before the merge (k = 2) train too
    # both scenarios share stage 1, so their projectors differ only by stage 2
    assert out["train"][0]["trainable_params"] < out["train_encoder"][0]["trainable_params"]


def test_labels_cover_only_the_answer(tmp_path):
    preset = C.load_preset("smoke", cache_dir=str(tmp_path))
    from laco.data.embedded import build_embedded_dataset

    ds = build_embedded_dataset(preset.data, tmp_path / "data", progress=False)
    tok = C.build_tokenizer(ds, preset.llm.vocab_size)
    convs = C.conversations(ds, "test")
    data = C.tokenize_split(tok, convs, 16)
    for i in range(len(convs)):
        scored = data.labels[i][data.labels[i] != -100]
        answer = convs[i][0][-1]["content"]
        assert tok.decode(scored) == answer + "<|im_end|>"
        assert int((data.input_ids[i] == tok.convert_tokens_to_ids("<image>")).sum()) == 16


def test_presets_and_overrides(tmp_path):
    assert C.load_preset("full").seeds == [0, 1, 2]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage1_steps: 7\nllm:\n  hidden_size: 64\nmethods: [none, laco@1/4]\n")
    p = C.load_preset("quick", cfg, seeds=[3])
    assert (p.stage1_steps, p.llm.hidden_size, p.methods, p.seeds) == (7, 64, ["none", "laco@1/4"], [3])
    with pytest.raises(ValueError, match="unknown config key 'llm.width'"):
        CP._merge(p, {"llm": {"width": 3}})
    with pytest.raises(ValueError, match="unknown compressor 'foo'"):
        C.load_preset("quick", methods=["foo@1/4"])
    # any method of the grammar; deprecated spellings of committed results become canonical names
    assert C.load_preset("quick", methods="laco@1/3,ext_laco").methods == ["laco@1/3", "laco@post"]
    with pytest.raises(ValueError, match="unknown preset"):
        C.load_preset("huge")
    with pytest.raises(FileNotFoundError):
        C.load_preset("quick", tmp_path / "missing.yaml")


def test_cli_reports_bad_methods_in_one_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from laco.cli import main; main()", "compare", "--methods", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "method 'nope': expected 'none' or '<compressor>@<layer>'" in r.stderr and "Traceback" not in r.stderr


def test_merge_parts_run_per_seed(smoke_results, tmp_path):
    """Seeds run as separate processes merge into one table whose mean/std span all seeds."""
    results, out = smoke_results
    other = json.loads((out / "results.json").read_text())
    for r in other["runs"]:  # the same runs relabelled as seed 7, accuracy shifted so the std is known
        r["seed"] = 7
        if r["after"]["accuracy"] is not None:  # (ToMe's read-out is not applicable)
            r["after"] = {**r["after"], "accuracy": r["after"]["accuracy"] + 2.0}
    other["config"]["seeds"], other["config"]["threads"] = [7], 2
    # seed 7 pretrained its own encoder (v2): other weights and metrics, the same encoder config
    seven = {"quadrant_acc": 1.0, "dot_acc": 2.0}
    other["encoder"] = {**other["encoder"], "pretrain_metrics": seven, "per_seed": {"7": seven}}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(other))
    merged = C.merge_results([out, tmp_path / "b"], command="laco compare --merge a --merge b")
    assert merged["config"]["seeds"] == [0, 7] and len(merged["runs"]) == 2 * len(results["runs"])
    assert merged["encoder"]["per_seed"]["7"] == seven and set(merged["encoder"]["per_seed"]) == {"0", "7"}
    row = next(r for r in merged["table"] if (r["scenario"], r["method"]) == ("train", "laco@1/4"))
    one = next(r for r in results["table"] if (r["scenario"], r["method"]) == ("train", "laco@1/4"))
    assert row["seeds"] == 2 and row["acc_mean"] == pytest.approx(one["acc_mean"] + 1.0, abs=0.01)
    assert row["acc_std"] == pytest.approx(2.0 ** 0.5, abs=0.01)
    assert merged["timings_s"]["total_s"] == pytest.approx(2 * results["timings_s"]["total_s"], abs=0.2)
    from laco.experiments.report import markdown

    assert "Merged from 2 runs" in markdown(merged) and "Paired differences" in markdown(merged)
    q0 = merged["encoder"]["per_seed"]["0"]["quadrant_acc"]  # every seed's own encoder, in the header
    assert f"seed 0: held-out quadrant accuracy {q0}%" in markdown(merged)
    assert "seed 7: held-out quadrant accuracy 1.0%, dot colour 2.0%" in markdown(merged)
    pair = next(c for c in merged["contrasts"] if (c["scenario"], c["a"], c["b"]) == ("train", "laco@1/4", "laco@post"))
    assert pair["seeds"] == [0, 7]

    with pytest.raises(ValueError, match="repeats .* seed 0, already in another part"):
        C.merge_results([out, out])
    other["config"]["stage2_steps"] += 1
    (tmp_path / "b" / "results.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="differ in stage2_steps"):
        C.merge_results([out, tmp_path / "b"])
    with pytest.raises(FileNotFoundError, match="no results.json"):
        C.merge_results([out, tmp_path / "missing"])


def test_cli_merge_writes_the_merged_report(smoke_results, tmp_path):
    from typer.testing import CliRunner

    from laco.cli import app

    _, out = smoke_results
    other = json.loads((out / "results.json").read_text())
    for r in other["runs"]:
        r["seed"] = 1
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(other))
    res = CliRunner().invoke(app, ["compare", "--merge", str(out), "--merge", str(tmp_path / "b"),
                                   "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["config"]["seeds"] == [0, 1] and (tmp_path / "m" / "acc_vs_flops.png").is_file()
    res = CliRunner().invoke(app, ["compare", "--merge", str(out), "--merge", str(tmp_path / "b")])
    assert res.exit_code != 0 and "--merge needs --out" in str(res.exception)
    res = CliRunner().invoke(app, ["compare", "--merge", str(out), "--merge", str(tmp_path / "b"), "--out",
                                   str(tmp_path / "m2"), "--data", "train.json"])
    assert res.exit_code != 0 and "--data would be ignored" in str(res.exception) and not (tmp_path / "m2").exists()


def _greedy_answers(model, data, images, rows, max_new: int) -> tuple[list, list]:
    """``model.generate`` (greedy) after each row's prompt -> (prompt ids, generated ids incl. <|im_end|> if emitted)."""
    prompts, answers = [], []
    for i in rows:
        keep = data.attention_mask[i].bool()
        first = int((data.labels[i][keep] != -100).nonzero()[0])  # the first scored (answer) token
        prompt = data.input_ids[i][keep][:first]
        pixels = P.to_pixel_values(images[[int(data.image_index[i])]])
        out = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, first, dtype=torch.long),
                             pixel_values=pixels, max_new_tokens=max_new, do_sample=False)
        prompts.append(prompt)
        answers.append(out[0, first:])
    return prompts, answers


def test_one_pass_exact_match_equals_greedy_generation(tmp_path):
    """compare's teacher-forced score equals decoding every test question with ``model.generate``.

    Half the questions keep their reference answer (a barely trained model gets most wrong), half get the
    model's own greedy answer as the reference (right by construction), whatever the image source
    (Fashion-MNIST or generated scenes): both outcomes occur, so an off-by-one shift of predictions
    against labels, which turns the right ones wrong, fails the test.
    """
    preset = C.load_preset("smoke", cache_dir=str(tmp_path), methods=["none", "laco@1/4"], stage2_steps=40)
    ctx = C.prepare(preset, log=lambda *a: None)
    _, model = C.run_train(ctx, "laco@1/4", ["train"])["train"]
    start, data = C.start_layer(model), ctx.splits[("test", model.num_image_tokens)]
    images, n = ctx.ds.scenes["test"].images, 24
    own = list(range(0, n, 2))  # these rows get the model's own greedy answer as the reference
    prompts, answers = _greedy_answers(model, data, images, own, max_new=8)
    rows = {i: (p, a) for i, p, a in zip(own, prompts, answers)}
    pad = ctx.tok.pad_token_id
    seqs, labs = [], []
    for i in range(n):
        keep = data.attention_mask[i].bool()
        if i in rows:
            p, a = rows[i]
            seqs.append(torch.cat([p, a]))
            labs.append(torch.cat([torch.full_like(p, -100), a]))
        else:
            seqs.append(data.input_ids[i][keep])
            labs.append(data.labels[i][keep])
    width = max(len(s) for s in seqs)
    ids = torch.full((n, width), pad, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        ids[i, :len(s)], labels[i, :len(s)], mask[i, :len(s)] = s, lab, 1
    mixed = C.TokenizedSplit(ids, mask, labels, data.image_index[:n], data.task[:n], data.turn[:n])

    one_pass = C.evaluate_cached(model, ctx.hidden["test"][start], start, mixed, batch_size=8)
    correct = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        reference = mixed.labels[i][mixed.labels[i] != -100]  # the answer tokens (then <|im_end|>)
        _, (out,) = _greedy_answers(model, mixed, images, [i], max_new=len(reference))
        correct[i] = out.tolist() == reference.tolist()
    decoded = C.summarize(correct, mixed.task, mixed.turn)
    assert bool(correct[own].all()) and not bool(correct.all())  # both outcomes: the comparison can fail both ways
    assert one_pass == decoded


def test_contrasts_pair_seeds():
    def run(method, seed, acc, scenario="train"):
        return {"scenario": scenario, "method": method, "seed": seed, "after": {"accuracy": acc}}

    runs = [run("laco@1/4", 0, 50.0), run("laco@1/4", 1, 52.0), run("laco@1/4", 2, 47.0),
            run("pixel_shuffle@1/4", 0, 30.0), run("pixel_shuffle@1/4", 1, 40.0), run("pixel_shuffle@1/4", 2, 49.0),
            run("ext_laco", 0, 60.0), run("ext_laco", 2, 58.0),  # seed 1 missing: paired over 0 and 2 only
            run("laco@1/4", 0, 40.0, "readout")]
    got = {(c["scenario"], c["a"], c["b"]): c for c in C.contrasts(runs)}
    c = got[("train", "laco@1/4", "pixel_shuffle@1/4")]
    assert c["diffs"] == [20.0, 12.0, -2.0] and c["mean"] == pytest.approx(10.0) and c["verdict"] == "mixed across seeds"
    c = got[("train", "laco@1/4", "ext_laco")]
    assert c["seeds"] == [0, 2] and c["diffs"] == [-10.0, -11.0] and c["verdict"] == "ext_laco higher on every seed"
    assert set(got) == {("train", "laco@1/4", "pixel_shuffle@1/4"), ("train", "laco@1/4", "ext_laco")}
    # results before #15 spell laco@post "ext_laco" (as above); canonical names pair the same way
    canon = [{**r, "method": "laco@post"} if r["method"] == "ext_laco" else r for r in runs]
    c = {(c["scenario"], c["a"], c["b"]): c for c in C.contrasts(canon)}[("train", "laco@1/4", "laco@post")]
    assert c["diffs"] == [-10.0, -11.0] and c["verdict"] == "laco@post higher on every seed"


def test_learning_curve_ends_at_the_final_accuracy(tmp_path):
    preset = C.load_preset("smoke", cache_dir=str(tmp_path / "cache"), methods=["none", "laco@1/4"], scenarios=["train"],
                           stage2_steps=4, curve_every=3, curve_limit=None)
    results = C.run_compare(preset, tmp_path / "out", log=lambda *a: None)
    for r in (r for r in results["runs"] if r["scenario"] != "baseline"):
        # points after stage-2 steps 3 and 4 (the last), counted from the start of stage 1
        assert [s for s, _ in r["curve"]] == [preset.stage1_steps + 3, preset.stage1_steps + 4]
        assert r["curve"][-1][1] == r["after"]["accuracy"]
    assert all(row["curve"] for row in results["table"]) and (tmp_path / "out" / "acc_vs_step.png").is_file()
    with pytest.raises(ValueError, match="curve_every"):
        C.load_preset("smoke", curve_every=-1)


def test_readout_only_builds_no_llm(tmp_path, monkeypatch):
    """A readout-only run needs no LLM, token splits or blind row (and does not pretrain an LLM)."""
    from laco.experiments.compare import pipeline

    def boom(*a, **k):
        raise AssertionError("a readout-only run must not pretrain an LLM")

    monkeypatch.setattr(pipeline, "pretrain_llm", boom)
    preset = C.load_preset("smoke", cache_dir=str(tmp_path / "cache"), methods=["none", "laco@1/4", "tome@1/4"],
                           scenarios=["readout"])
    results = C.run_compare(preset, tmp_path / "out", log=lambda *a: None)
    assert {(r["scenario"], r["method"]) for r in results["table"]} == {
        ("readout", "none"), ("readout", "laco@1/4"), ("readout", "tome@1/4")}
    assert results["blind"] is None and results["baselines"] == [] and (tmp_path / "out" / "results.md").is_file()


def test_eval_split_val_scores_the_val_questions(tmp_path):
    """eval_split: val (for choosing a recipe) scores the val questions, blind row included; test is untouched."""
    from laco.eval.blind import blind_baseline

    preset = C.load_preset("smoke", cache_dir=str(tmp_path / "cache"), methods=["none"], scenarios=["train"],
                           eval_split="val")
    results = C.run_compare(preset, tmp_path / "out", log=lambda *a: None)
    data_dir = __import__("pathlib").Path(results["data_dir"])
    row = next(r for r in results["runs"] if r["scenario"] == "train")
    assert results["eval_split"] == "val" and row["after"]["n"] == len((data_dir / "val.jsonl").read_text().splitlines())
    assert results["blind"]["accuracy"] == blind_baseline(data_dir / "train.json", data_dir / "val.jsonl").accuracy
    with pytest.raises(ValueError, match="eval_split"):
        C.load_preset("smoke", eval_split="train")


def test_scenario_methods_run_a_subset_per_scenario(tmp_path):
    """scenario_methods: a costly scenario runs fewer methods; the retrofit base is trained even when `none` is
    not one of train's rows; hand-chosen --methods run everywhere; a method outside `methods` is refused."""
    preset = C.load_preset("smoke", cache_dir=str(tmp_path / "cache"),
                           methods=["none", "laco@1/4", "pixel_shuffle@1/4"],
                           scenarios=["readout", "train", "train_encoder", "retrofit"])
    preset = CP._merge(preset, {"scenario_methods": {"readout": ["laco@1/4"], "train": ["laco@1/4", "pixel_shuffle@1/4"],
                                                     "train_encoder": ["none", "laco@1/4"], "retrofit": ["laco@1/4"]}})
    results = C.run_compare(preset, tmp_path / "out", log=lambda *a: None)
    ran = {(r["scenario"], r["method"]) for r in results["runs"] if r["scenario"] != "baseline"}
    assert ran == {("readout", "laco@1/4"), ("train", "laco@1/4"), ("train", "pixel_shuffle@1/4"),
                   ("train_encoder", "none"), ("train_encoder", "laco@1/4"), ("retrofit", "laco@1/4")}
    full = C.load_preset("full")
    assert full.methods_for("train_encoder") == ["none", "laco@1/4", "pixel_shuffle@1/4"]
    assert C.load_preset("full", methods="none,laco@1/4").methods_for("train_encoder") == ["none", "laco@1/4"]
    with pytest.raises(ValueError, match="not in methods"):
        CP._merge(preset, {"scenario_methods": {"train": ["laco@1/2"]}})
    with pytest.raises(ValueError, match="unknown scenario 'trian'"):
        CP._merge(preset, {"scenario_methods": {"trian": ["none"]}})


def test_workers_give_the_same_results_as_one_process(tmp_path):
    """Methods run in forked workers (workers: 2) give the rows of a serial run, in the same order: every job
    draws from its own seeded streams; the retrofit base comes back from its worker intact."""
    kw = dict(cache_dir=str(tmp_path / "cache"), methods=["none", "laco@1/4", "pixel_shuffle@1/4", "avg_pool@1/4"],
              scenarios=["readout", "train", "retrofit"])
    serial = C.run_compare(C.load_preset("smoke", **kw), tmp_path / "w1", log=lambda *a: None)["runs"]
    forked = C.run_compare(C.load_preset("smoke", workers=2, **kw), tmp_path / "w2", log=lambda *a: None)["runs"]

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]

    assert strip(forked) == strip(serial)
    losses = {r["method"]: r["final_loss"] for r in serial if r["scenario"] == "train"}
    assert len(set(losses.values())) == len(losses) and all(v > 0 for v in losses.values())
    retro = [r for r in serial if r["scenario"] == "retrofit" and r["method"] == "laco@1/4"]
    assert retro and retro[0]["final_loss"] is not None
