"""`laco probe`: fidelity of in-encoder merging vs FLOPs, ranking, Pareto front, recommendation, reports, CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import laco
from laco.data.images import load_image_folder
from laco.eval.probe import (
    ProbeConfig,
    ProbeRow,
    linear_probe_accuracy,
    mark_pareto,
    probe_encoder,
    recommend,
    spearman,
)
from laco.model.sources import load_encoder_source



@pytest.fixture(scope="module")
def siglip():
    torch.manual_seed(0)
    return laco.create_vision_encoder("tiny-siglip").eval()


@pytest.fixture(scope="module")
def result(siglip):
    px = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return probe_encoder(siglip, px, config=ProbeConfig(ratios=[2, 3], batch_size=3), progress=False), px


def own_cosine(model, px, k: int, r: int) -> float:
    """Independent: HF modules by hand, avg_pool2d after layer k, post_layernorm; vs pooled final features."""
    def run(merge: int | None):
        x = model.embeddings(px)
        side = 8
        for i, layer in enumerate(model.encoder.layers):
            if i == merge:
                m = F.avg_pool2d(x.transpose(1, 2).reshape(len(px), -1, side, side), r)
                side = m.shape[-1]
                x = m.flatten(2).transpose(1, 2)
            x = layer(x, None)
        return model.post_layernorm(x), side

    with torch.no_grad():
        y, side = run(k)
        full, _ = run(None)
        ref = F.avg_pool2d(full.transpose(1, 2).reshape(len(px), -1, 8, 8), r).flatten(2).transpose(1, 2)
    return F.cosine_similarity(y, ref, dim=-1).mean().item()


def test_rows_match_an_independent_computation(result, siglip):
    res, px = result
    assert {(r.layer, r.ratio) for r in res.rows} == {(k, r) for k in range(5) for r in (2, 3)}
    for row in res.rows:
        if row.layer == res.num_layers:  # external pooling *is* the reference
            assert row.cosine == pytest.approx(1.0, abs=1e-6) and row.rel_error == pytest.approx(0.0, abs=1e-5)
        if row.ratio == 2 and row.layer in (0, 1, 2):  # 8x8 grid -> 4x4 (r=3 would replicate-pad to 9x9)
            assert row.cosine == pytest.approx(own_cosine(siglip, px, row.layer, 2), abs=1e-5)
        enc = laco.compress_encoder(siglip, "laco", layer=row.layer, ratio=row.ratio)
        assert row.flop_ratio == pytest.approx(laco.encoder_cost(enc).flop_ratio)
        assert row.tokens == (16 if row.ratio == 2 else 9)
    assert res.metric == "cosine" and res.num_labelled == 0 and res.rows[0].probe_acc is None


def test_pareto_and_recommendation(result):
    res, _ = result
    rows = res.rows
    front = [r for r in rows if r.pareto]
    assert front
    for a in front:  # nobody strictly dominates a front row
        assert not any(b.flop_ratio <= a.flop_ratio and b.cosine >= a.cosine and
                       (b.flop_ratio < a.flop_ratio or b.cosine > a.cosine) for b in rows)
    for a in rows:
        if not a.pareto:
            assert any(b.flop_ratio <= a.flop_ratio and b.cosine >= a.cosine for b in front)
    rec = res.recommendation
    fits = [r for r in rows if r.flop_ratio <= res.config.budget]
    assert rec["fits_budget"] and rec["row"]["cosine"] == max(r.cosine for r in fits)
    assert rec["row"]["flop_ratio"] <= res.config.budget
    none = recommend(rows, "cosine", 0.01, res.num_layers)
    assert not none["fits_budget"] and none["row"]["flop_ratio"] == min(r.flop_ratio for r in rows)
    ranked = res.ranked()
    assert [r.cosine for r in ranked] == sorted((r.cosine for r in rows), reverse=True)


def test_rel_error_metric_is_lower_better():
    rows = [ProbeRow(0, 0.0, 2, (4, 4), 16, 0.3, 1.0, 0.9, 0.5), ProbeRow(1, 0.25, 2, (4, 4), 16, 0.5, 1.0, 0.95, 0.2)]
    mark_pareto(rows, "rel_error")
    assert all(r.pareto for r in rows)  # cheaper-but-worse and dearer-but-better: both on the front
    assert recommend(rows, "rel_error", 0.6, 4)["row"]["layer"] == 1


def test_linear_probe_separates_learnable_labels_and_not_random_ones():
    g = torch.Generator().manual_seed(0)
    n = 120
    labels = torch.randint(0, 3, (n, 2), generator=g)  # two label slots of 3 classes
    feats = torch.randn(n, 20, generator=g) * 0.1
    feats[torch.arange(n), labels[:, 0]] += 1.0  # slot 0 readable from dims 0..2
    feats[torch.arange(n), 3 + labels[:, 1]] += 1.0  # slot 1 from dims 3..5
    split = (torch.arange(30, n), torch.arange(30))
    assert linear_probe_accuracy(feats, labels, split) > 0.95
    rnd = torch.randint(0, 3, (n, 2), generator=torch.Generator().manual_seed(1))
    assert linear_probe_accuracy(feats, rnd, split) < 0.6


def test_probe_with_labels_reports_accuracy(siglip):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (24,), generator=g)
    px = torch.randn(24, 3, 64, 64, generator=g) * 0.3
    px[labels == 1, :, :32] += 1.5  # class 1: bright top half, visible through any merge
    res = probe_encoder(siglip, px, labels, ProbeConfig(layers=["1/2", "post"], ratios=[2]), progress=False)
    assert res.metric == "probe_acc" and res.num_labelled == 24
    assert [r.layer for r in sorted(res.rows, key=lambda r: r.layer)] == [2, 4]
    assert all(r.probe_acc is not None and r.ref_probe_acc is not None for r in res.rows)
    assert res.full_probe_acc > 0.9
    assert "probe_acc, r=2" in res.depth_trend


def test_spearman():
    assert spearman([0, 1, 2, 3], [0.1, 0.2, 0.5, 0.9]) == pytest.approx(1.0)
    assert spearman([0, 1, 2, 3], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([0, 1, 2], [1, 1, 1]) == 0.0
    assert spearman([0, 1, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.8)


@pytest.mark.parametrize("kw, match", [
    ({"method": "pixel_shuffle"}, "parameter-free"),
    ({"ratios": [1]}, "ratio"),
    ({"ratios": []}, "empty"),
    ({"metric": "bleu"}, "metric"),
    ({"budget": 0}, "budget"),
    ({"test_fraction": 1.0}, "test_fraction"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ProbeConfig(**kw)


def test_input_errors(siglip):
    with pytest.raises(ValueError, match="pixel_values"):
        probe_encoder(siglip, torch.randn(3, 64, 64), progress=False)
    with pytest.raises(ValueError, match="labels"):
        probe_encoder(siglip, torch.randn(4, 3, 64, 64), torch.zeros(5), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        probe_encoder(siglip, torch.randn(4, 3, 64, 64), config=ProbeConfig(layers=[9]), progress=False)


def test_save_writes_json_markdown_png(result, tmp_path):
    res, _ = result
    paths = res.save(tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert len(data["rows"]) == len(res.rows) and data["rows"][0]["label"].startswith("k=")
    assert data["recommendation"]["fits_budget"] is True
    md = paths["markdown"].read_text()
    assert "| rank | k |" in md and "Recommendation" in md and "Spearman" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*tmp*"))


def _write_images(root, classes: dict[str, int], rng) -> None:
    from PIL import Image

    for name, count in classes.items():
        d = root / name if name else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_load_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    _write_images(tmp_path / "cls", {"cat": 3, "dog": 2}, rng)
    px, labels, classes = load_image_folder(tmp_path / "cls", 32, (0.5,) * 3, (0.5,) * 3)
    assert px.shape == (5, 3, 32, 32) and classes == ["cat", "dog"] and sorted(labels.tolist()) == [0, 0, 0, 1, 1]
    assert -1.0 <= px.min() and px.max() <= 1.0
    _write_images(tmp_path / "flat", {"": 4}, rng)
    px, labels, _ = load_image_folder(tmp_path / "flat", 16, (0.5,) * 3, (0.5,) * 3, max_images=3)
    assert px.shape == (3, 3, 16, 16) and labels is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty", 16, (0.5,) * 3, (0.5,) * 3)


def test_sources_llava_laco_and_hf_encoder(tmp_path):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    from laco.model.convert import convert_checkpoint

    src = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                         image_size=64, patch_size=8, vision_use_head=False),
        text_config=Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=64), image_token_index=3, video_token_index=4,
        vision_feature_layer=-1, vision_feature_select_strategy="full")).eval()
    src.save_pretrained(tmp_path / "llava")
    s = load_encoder_source(str(tmp_path / "llava"))
    assert s.feature_layer == -1 and s.final_norm is False  # HF LLaVA semantics: no post_layernorm
    for k, v in src.model.vision_tower.state_dict().items():
        assert torch.equal(s.model.state_dict()[k], v)
    convert_checkpoint(tmp_path / "llava", tmp_path / "laco")
    s2 = load_encoder_source(str(tmp_path / "laco"))
    assert s2.feature_layer == -1 and s2.final_norm is False
    laco.create_vision_encoder("tiny-clip").save_pretrained(tmp_path / "clip")
    s3 = load_encoder_source(str(tmp_path / "clip"))
    assert type(s3.model).__name__ == "CLIPVisionModel" and s3.image_mean[0] == pytest.approx(0.4815, abs=1e-3)
    assert load_encoder_source("tiny-siglip").notes  # random preset: warned
    with pytest.raises(FileNotFoundError, match="neither"):
        load_encoder_source(str(tmp_path / "nothing"))


def test_cli_probe(tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    from laco.cli import app, main

    _write_images(tmp_path / "imgs", {"a": 5, "b": 5}, np.random.default_rng(0))
    res = CliRunner().invoke(app, ["probe", "tiny-siglip", "--images", str(tmp_path / "imgs"), "--layers", "0,1/2,post",
                                   "--ratios", "2", "--out", str(tmp_path / "out"), "--budget", "0.7"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert len(data["rows"]) == 3 and data["num_labelled"] == 10 and data["command"].startswith("laco probe")
    assert (tmp_path / "out" / "probe.png").is_file() and (tmp_path / "out" / "probe.md").is_file()
    monkeypatch.setattr(sys, "argv", ["laco", "probe", "tiny-siglip"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and "--images" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_encoder_fidelity_falls_as_merge_moves_earlier():
    """On the project's pretrained encoder (pretrains on first use: minutes on CPU)."""
    from laco.data.embedded import real_scene_images
    from laco.experiments.pretrain import load_pretrained_encoder, to_pixel_values

    enc = load_pretrained_encoder()
    imgs, labels = real_scene_images(200, split="test")
    res = probe_encoder(enc, to_pixel_values(imgs), torch.as_tensor(labels), ProbeConfig(ratios=[2]), progress=False)
    assert res.depth_trend["cosine, r=2"]["spearman"] > 0.8
