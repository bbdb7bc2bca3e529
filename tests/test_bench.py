"""``laco bench``: the FLOP model against hand-computed values, timers, method specs, and an end-to-end tiny run.

Speed itself is never asserted (shared CPUs): only that the benchmark runs and writes well-formed results.
"""

import json

import pytest
from typer.testing import CliRunner

import laco
from laco.bench.flops import Part, Workload, encoder_parts, training_flops
from laco.bench.presets import llm_config
from laco.bench.runner import BenchConfig, predict_all
from laco.bench.timers import Case, interleaved_order, run_cases, summarize
from laco.cli import app

# ---- FLOP model, by hand ------------------------------------------------------------------------
# tiny-siglip: 64 px / patch 8 -> 8x8 = 64 tokens, width 32, MLP 64, 4 layers, no prefix.
# laco@1: merge after layer 1 -> 4x4 = 16 tokens. tiny-qwen2: D=32, MLP 64, 2 heads, 1 kv head (kv width 16),
# 2 layers, vocab 512. Workload: 1 sample, 1 image, 8 text tokens, 2 new tokens -> LLM sequence 16 + 8 = 24.
EMBED = 2 * 64 * 32 * (3 * 8 * 8)  # patchify conv
L0_LIN = 2 * 64 * 32 * (4 * 32) + 2 * 64 * 32 * 64 * 2  # qkvo + MLP on 64 tokens
L0_ATT = 2 * 2 * 64 * 64 * 32
MERGE = 2 * 16 * (4 * 32) * 32 + 2 * 16 * 32 * 32 + 64 * 32  # LN->Linear(128,32)->GELU->Linear(32,32) + avg pool
L13_LIN = 3 * (2 * 16 * 32 * 128 + 2 * 16 * 32 * 64 * 2)  # three layers on 16 tokens
L13_ATT = 3 * (2 * 2 * 16 * 16 * 32)
PROJ1, PROJ2 = 2 * 16 * 32 * 32, 2 * 16 * 32 * 32  # mlp2x_gelu 32 -> 32 -> 32
SEQ = 24
LLM_LIN = 2 * (2 * SEQ * 32 * (2 * 32 + 2 * 16) + 2 * SEQ * 32 * 64 * 3)  # 2 layers: q,o + k,v (GQA) + SwiGLU
LLM_ATT = 2 * (2 * 2 * SEQ * SEQ * 32)
HEAD1 = 2 * 1 * 32 * 512  # LM head on the last position (prefill, logits_to_keep=1)
HEAD_ALL = 2 * SEQ * 32 * 512  # LM head on every position (training loss)


def decode_token(context: int) -> int:
    per_layer = 2 * 32 * (2 * 32 + 2 * 16) + 2 * 2 * context * 32 + 2 * 32 * 64 * 3
    return 2 * per_layer + HEAD1


@pytest.fixture(scope="module")
def tiny_pred():
    cfg = BenchConfig(vision="tiny-siglip", llm="tiny-qwen2", methods="none,laco@1",
                      work=Workload(batch_size=1, images_per_sample=1, text_tokens=8, new_tokens=2))
    return predict_all(cfg)


def test_inference_flops_by_hand(tiny_pred):
    p = tiny_pred["laco@1"]
    encoder = EMBED + L0_LIN + L0_ATT + MERGE + L13_LIN + L13_ATT
    assert (p["image_tokens"], p["sequence_length"]) == (16, SEQ)
    assert p["encoder"] == encoder == 3409920
    assert p["compressor"] == MERGE
    assert p["projector"] == PROJ1 + PROJ2
    assert p["prefill"] == LLM_LIN + LLM_ATT + HEAD1
    assert p["encode_prefill"] == encoder + PROJ1 + PROJ2 + LLM_LIN + LLM_ATT + HEAD1
    # decoding: the first new token attends to 24 prompt tokens + itself, the second to 26
    assert p["decode"] == decode_token(25) + decode_token(26)
    # generate(2): the prefill yields token 1, one decoding step yields token 2
    assert p["generate"] == p["encode_prefill"] + decode_token(25)


def test_training_flops_by_hand(tiny_pred):
    s1, s2 = tiny_pred["laco@1"]["train_split"]["stage1"], tiny_pred["laco@1"]["train_split"]["stage2"]
    forward = EMBED + L0_LIN + L0_ATT + MERGE + L13_LIN + L13_ATT + PROJ1 + PROJ2 + LLM_LIN + LLM_ATT + HEAD_ALL
    assert s1["forward"] == s2["forward"] == forward
    # stage 1 (compressor + projector train): nothing before the merge needs a backward; the merge needs its
    # weight grads only; the frozen layers after it pass gradients (dX, 2x attention); the projector needs
    # dW + dX; the frozen LLM passes gradients.
    stage1 = MERGE + (L13_LIN + 2 * L13_ATT) + 2 * (PROJ1 + PROJ2) + (LLM_LIN + 2 * LLM_ATT) + HEAD_ALL
    assert s1["backward"] == stage1
    # stage 2 (all train): 2x every matmul with weights, 2x attention; the patch conv needs no dX (pixels)
    stage2 = EMBED + 2 * (L0_LIN + MERGE + L13_LIN + PROJ1 + PROJ2 + LLM_LIN + HEAD_ALL) + 2 * (
        L0_ATT + L13_ATT + LLM_ATT)
    assert s2["backward"] == stage2
    assert tiny_pred["laco@1"]["train_stage2"] == forward + stage2


def test_training_flops_uncompressed_projector_only(tiny_pred):
    # "none" in stage 1: only the projector trains; its first matmul's input gradient is not needed
    s1 = tiny_pred["none"]["train_split"]["stage1"]
    proj = 2 * 64 * 32 * 32
    seq = 64 + 8
    llm_lin = 2 * (2 * seq * 32 * 96 + 2 * seq * 32 * 64 * 3)
    llm_att = 2 * (4 * seq * seq * 32)
    assert s1["backward"] == 2 * proj + proj + (llm_lin + 2 * llm_att) + 2 * seq * 32 * 512


def test_part_backward_rules():
    p = Part("x", "encoder", linear=10, attn=3, input_linear=4)
    assert p.backward(trainable=False, grad_in=False) == 0
    assert p.backward(trainable=False, grad_in=True) == 10 + 6
    assert p.backward(trainable=True, grad_in=False) == 10 + 6 + 6
    assert p.backward(trainable=True, grad_in=True) == 10 + 10 + 6
    with pytest.raises(ValueError, match="unknown stage"):
        training_flops([p], "stage3")


@pytest.mark.parametrize("method,layer", [("laco", "1/4"), ("pixel_shuffle", [1, 3]), ("avg_pool", "post"),
                                          ("none", None)])
def test_encoder_parts_match_core_encoder_cost(method, layer):
    with __import__("torch").device("meta"):
        enc = laco.compress_encoder(laco.create_vision_encoder("tiny-clip"), method, layer=layer)
    parts = encoder_parts(enc)
    assert sum(p.forward for p in parts) == laco.encoder_cost(enc).total_flops


def test_real_shape_predictions_follow_the_token_counts():
    cfg = BenchConfig(methods="none,post,laco@1/4", work=Workload(text_tokens=64))
    pred = predict_all(cfg)
    assert [pred[m]["image_tokens"] for m in pred] == [729, 196, 196]
    # same tokens reach the LLM, so prefill is equal; the encoder is where the inside merge saves
    assert pred["laco@post"]["prefill"] == pred["laco@1/4"]["prefill"]
    assert pred["laco@1/4"]["encoder"] < 0.5 * pred["laco@post"]["encoder"]
    for m in pred:
        assert pred[m]["train_stage2"] > pred[m]["train_stage1"] > pred[m]["encode_prefill"]


# ---- presets and method specs ------------------------------------------------------------------
def test_llm_presets_have_published_shapes():
    c = llm_config("qwen2-0.5b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (896, 24, 14, 2)
    assert llm_config("qwen2-7b").intermediate_size == 18944
    assert llm_config("qwen2-0.5b") is not llm_config("qwen2-0.5b")
    with pytest.raises(ValueError, match="unknown LLM preset 'gpt5'"):
        llm_config("gpt5")


def test_bench_config_errors():
    with pytest.raises(ValueError, match="baseline 'laco@1/2' is not among"):
        BenchConfig(methods="none,post", baseline="laco@1/2")
    with pytest.raises(ValueError, match="unknown parts"):
        BenchConfig(parts=("encoder", "warp"))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Workload(batch_size=0)
    assert BenchConfig(methods="none,laco@1/4").baseline == "none"
    assert BenchConfig(methods="none,post").baseline == "laco@post"


# ---- timers -------------------------------------------------------------------------------------
def test_summarize_statistics():
    s = summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["min"], s["max"], s["q1"], s["q3"], s["n"]) == (3.0, 1.0, 5.0, 2.0, 4.0, 5)
    assert s["rel_iqr"] == pytest.approx(2.0 / 3.0)
    with pytest.raises(ValueError):
        summarize([])


def test_interleaving_rotates_methods_within_parts():
    cases = [Case(m, p, lambda: None) for p in ("enc", "train") for m in ("a", "b", "c")]
    names = lambda r: [(c.part, c.method) for c in interleaved_order(cases, r)]  # noqa: E731
    assert names(0) == [("enc", "a"), ("enc", "b"), ("enc", "c"), ("train", "a"), ("train", "b"), ("train", "c")]
    assert names(1)[:3] == [("enc", "b"), ("enc", "c"), ("enc", "a")]


def test_run_cases_drops_warmup_and_resets():
    calls, resets = [], []
    cases = [Case("a", "p", lambda: calls.append("a"), reset=lambda: resets.append(1)),
             Case("b", "p", lambda: calls.append("b"))]
    res, rounds = run_cases(cases, warmup=2, repeats=3, progress=False)
    assert len(calls) == 10 and len(resets) == 5
    assert [len(r.times) for r in res] == [3, 3]
    d = res[0].to_dict()
    assert d["time"]["n"] == 3 and d["time"]["median"] >= 0
    with pytest.raises(ValueError, match="share"):
        run_cases([cases[0], cases[0]], progress=False)


# ---- end to end on tiny presets -----------------------------------------------------------------
def test_bench_cli_tiny_writes_wellformed_results(tmp_path):
    parts = "encoder,compressor,projector,prefill,encode_prefill,decode,generate,train_stage1,train_stage2"
    res = CliRunner().invoke(app, [
        "bench", "--vision", "tiny-siglip", "--llm", "tiny-qwen2", "--methods", "none,post,laco@1/4",
        "--text-tokens", "8", "--new-tokens", "2", "--batch-size", "2", "--warmup", "0", "--repeats", "2",
        "--parts", parts, "--threads", "1", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("cpu-")
    stem = folders[0] / "tiny-siglip_tiny-qwen2_b2"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["config"]["baseline"] == "laco@post" and data["config"]["work"]["batch_size"] == 2
    assert data["command"].startswith("laco bench --vision tiny-siglip")
    env = data["environment"]
    assert env["torch_threads"] == 1 and env["versions"]["torch"] and len(env["loadavg_start"]) == 3
    measured = {(r["method"], r["part"]) for r in data["measured"]}
    for m in ("none", "laco@post", "laco@1/4"):
        for p in parts.split(","):
            assert ((m, p) in measured) == (p != "compressor" or m != "none"), (m, p)
    for r in data["measured"]:
        assert r["time"]["n"] == 2 and r["time"]["median"] > 0 and r["memory"]["peak"] > 0
        assert r["cpu_time"]["n"] == 2 and r["cpu_time"]["median"] > 0
        if r["part"].startswith("train_"):  # timed phases of a step add up to (at most) the step
            phases = r["splits"]
            assert set(phases) == {"forward_backward", "optimizer"}
            assert phases["forward_backward"]["min"] + phases["optimizer"]["min"] <= r["time"]["max"]
    assert data["models"]["laco@1/4"]["num_image_tokens"] == 16 and data["models"]["none"]["sequence_length"] == 72
    sp = data["analysis"]["speedups"]
    assert set(sp) == {"none", "laco@1/4"} and set(data["analysis"]["speedups_cpu_time"]) == set(sp)
    assert sp["laco@1/4"]["prefill"]["predicted"] == pytest.approx(1.0)
    assert sp["laco@1/4"]["encoder"]["predicted"] > 1.5
    md = stem.with_suffix(".md").read_text()
    assert "| train step, stage 2 |" in md and "Speedup against laco@post" in md and data["command"] in md
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # the report re-renders from the saved JSON alone (same markdown)
    stem.with_suffix(".md").unlink()
    res = CliRunner().invoke(app, ["bench", "--from-json", str(stem.with_suffix(".json"))])
    assert res.exit_code == 0, res.output
    assert stem.with_suffix(".md").read_text() == md


def test_bench_cli_dry_run_and_errors():
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--dry-run", "--methods", "none,post,laco@1/4"])
    assert res.exit_code == 0, res.output
    assert "729" in res.output and "196" in res.output
    res = runner.invoke(app, ["bench", "--dry-run", "--llm", "gpt5"])
    assert res.exit_code != 0 and "unknown LLM preset" in str(res.exception)


def test_analyze_speedups_pair_rounds_and_targets():
    from laco.bench.report import analyze

    def rec(method, part, times):
        return {"method": method, "part": part, "time": summarize(times), "cpu_time": summarize(times)}

    result = {
        "config": {"baseline": "laco@post", "work": {"batch_size": 1, "new_tokens": 4}},
        "environment": {"device_type": "cpu"},
        "models": {"laco@post": {"merge_layers": [4], "encoder_layers": 4},
                   "laco@1": {"merge_layers": [1], "encoder_layers": 4}},
        "predicted": {"laco@post": {"encoder": 300, "encode_prefill": 600},
                      "laco@1": {"encoder": 100, "encode_prefill": 400, "compressor": 1}},
        # round 2 is slow for both methods (shared load): pairing by round cancels it
        "measured": [rec("laco@post", "encoder", [3.0, 9.0, 3.0]), rec("laco@1", "encoder", [1.5, 4.5, 1.2]),
                     rec("laco@post", "encode_prefill", [6.0, 6.0, 6.0]),
                     rec("laco@1", "encode_prefill", [5.0, 5.0, 5.0]),
                     rec("laco@1", "compressor", [0.1, 0.1, 0.1])],
    }
    a = analyze(result)
    enc = a["speedups"]["laco@1"]["encoder"]
    assert enc["measured"] == pytest.approx(3.0 / 1.5) and enc["predicted"] == pytest.approx(3.0)
    assert enc["efficiency"] == pytest.approx(2.0 / 3.0)
    assert enc["per_round"] == pytest.approx([2.0, 2.0, 2.5]) and (enc["low"], enc["high"]) == (2.0, 2.5)
    assert a["compressor_share"]["laco@1"] == pytest.approx(0.1 / 1.5)
    met = {t["target"]: t["met"] for t in a["targets"]}
    assert met["encode + prefill speedup >= 1.58x"] is False  # 6/5
    assert met["encode + prefill: measured/predicted >= 0.90"] is False  # 1.2 / 1.5 = 0.8
    assert met["merge time <= 2% of encoder time"] is False


def test_predictions_scale_with_batch_and_images(tiny_pred):
    cfg = BenchConfig(vision="tiny-siglip", llm="tiny-qwen2", methods="laco@1",
                      work=Workload(batch_size=2, images_per_sample=2, text_tokens=8, new_tokens=2))
    p, one = predict_all(cfg)["laco@1"], tiny_pred["laco@1"]
    assert p["sequence_length"] == 2 * 16 + 8
    assert p["encoder"] == 4 * one["encoder"] and p["projector"] == 4 * one["projector"]  # 4 images
    seq = 40  # prefill of 2 samples of 40 tokens each, LM head on the last position
    llm = 2 * (2 * seq * 32 * 96 + 2 * seq * 32 * 64 * 3) + 2 * (4 * seq * seq * 32)
    assert p["prefill"] == 2 * (llm + HEAD1)


def test_anyres_predictions_by_hand(tiny_pred):
    """--image-size WxH: every image is a base + its tiles through the encoder and projector; the LLM gets
    OneVision's packed tokens. A 128x64 (WxH) image fills the 1x2 pinpoint of 64-px tiles exactly."""
    cfg = BenchConfig(vision="tiny-siglip", llm="tiny-qwen2", methods="none,laco@1",
                      work=Workload(text_tokens=8, new_tokens=2, image_size=(64, 128)))
    pred = predict_all(cfg)
    for m, g in (("none", 8), ("laco@1", 4)):  # tile grid: 8x8 patches, 4x4 after the merge
        p, one = pred[m], tiny_pred[m]
        assert p["tiles"] == [1, 2] and p["encoder_inputs"] == 3
        assert p["image_tokens"] == g * g + g * (2 * g + 1)  # base, then g rows of 2g tokens + a newline each
        assert p["sequence_length"] == p["image_tokens"] + 8
        assert p["encoder"] == 3 * one["encoder"] and p["projector"] == 3 * one["projector"]
    # the model's own layout (config with OneVision's pinpoints) gives the same count
    from laco.bench.runner import laco_config
    from laco.model.anyres import default_pinpoints

    config = laco_config(cfg, cfg.specs[1])
    config.image_grid_pinpoints, config.use_image_newline = default_pinpoints(config.image_size), True
    assert config.image_layout((64, 128)).num_tokens == pred["laco@1"]["image_tokens"]
    # a sample with two images: each untiled (OneVision's multi-image rule), base + one newline
    cfg2 = BenchConfig(vision="tiny-siglip", llm="tiny-qwen2", methods="laco@1",
                       work=Workload(text_tokens=8, new_tokens=2, images_per_sample=2, image_size=(64, 128)))
    p2 = predict_all(cfg2)["laco@1"]
    assert (p2["tiles"], p2["encoder_inputs"], p2["image_tokens"]) == ([0, 0], 1, 16 + 1)
    with pytest.raises(ValueError, match="image_size"):
        Workload(image_size=(0, 64))


def test_bench_dry_run_image_size_matches_laco_info():
    """`laco bench --dry-run --image-size` reports what `laco info --image-size` does (one code path)."""
    runner = CliRunner()
    info = json.loads(runner.invoke(app, ["info", "--image-size", "1152x768", "-l", "1/4", "--json"]).output)["anyres"]
    cfg = BenchConfig(methods="none,laco@1/4", work=Workload(image_size=(768, 1152)))
    pred = predict_all(cfg)
    for m, key in (("none", "without"), ("laco@1/4", "with")):
        assert pred[m]["tiles"] == info["tiles"] and pred[m]["encoder_inputs"] == info["encoder_inputs"] == 7
        assert pred[m]["image_tokens"] == info[key]["tokens"]
        assert pred[m]["encoder"] / 1e9 == pytest.approx(info[key]["encoder_gflops"])
    res = runner.invoke(app, ["bench", "--dry-run", "--image-size", "1152x768", "--methods", "none,laco@1/4"])
    assert res.exit_code == 0, res.output
    assert "2x3 + base" in res.output and str(info["without"]["tokens"]) in res.output
    assert str(info["with"]["tokens"]) in res.output
    res = runner.invoke(app, ["bench", "--image-size", "1152x768"])
    assert res.exit_code != 0 and "--dry-run" in str(res.exception)
    res = runner.invoke(app, ["bench", "--dry-run", "--image-size", "12x"])
    assert res.exit_code != 0 and "--image-size" in str(res.exception)


def test_training_cases_train_exactly_their_stage():
    """Each timed step sets its own model's trainable set (the methods share the encoder and the LLM)."""
    import torch

    from laco.bench.runner import _optimizer, build_models, make_inputs, method_cases

    cfg = BenchConfig(vision="tiny-siglip", llm="tiny-qwen2", methods="none,laco@1/4",
                      work=Workload(batch_size=1, text_tokens=4), parts=("train_stage1", "train_stage2"))
    models = build_models(cfg)
    opt = _optimizer(models, 1e-3)
    gen = torch.Generator().manual_seed(0)
    cases = {(name, c.part): c for name, m in models.items()
             for c in method_cases(name, m, make_inputs(m, cfg.work, torch.device("cpu"), torch.float32, gen),
                                   cfg.work, cfg.parts, opt)}
    for name in ("laco@1/4", "none", "laco@1/4"):  # stage 2 of one method, then stage 1 of another
        for stage, groups in (("train_stage2", {"compressor", "encoder", "projector", "llm"}),
                              ("train_stage1", {"compressor", "projector"})):
            cases[(name, stage)].fn()
            for group, params in models[name].parameter_groups().items():
                assert all(p.requires_grad == (group in groups) for p in params), (name, stage, group)
