"""`laco convert`: tiny random LLaVA / LLaVA-OneVision checkpoints -> LaCo models (no downloads).

The key check builds the expected vision features independently of laco: its own loop over the
Hugging Face tower's modules with ``F.avg_pool2d`` after layer k, read the way HF LLaVA reads them
(``hidden_states[vision_feature_layer]``, then the select strategy).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

import laco
from laco.model.convert import (
    SUPPORTED_ARCHITECTURES,
    build_converted_model,
    convert_checkpoint,
    hf_feature_layer_to_core,
)
from laco.model.testing import TINY_IMAGE_TOKEN_ID, tiny_tokenizer

pytestmark = pytest.mark.compat  # also runs in the oldest-transformers CI venv (passes on 5.17)


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=64,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=384, max_position_embeddings=512, eos_token_id=2, pad_token_id=0)


def llava_config(**kw) -> LlavaConfig:
    """LLaVA-1.5 style: CLIP tower read at -2 (penultimate), CLS dropped ("default"), projector without bias."""
    base = dict(vision_config=CLIPVisionConfig(**VISION), text_config=Qwen2Config(**TEXT, tie_word_embeddings=False),
                image_token_index=TINY_IMAGE_TOKEN_ID, vision_feature_layer=-2,
                vision_feature_select_strategy="default", multimodal_projector_bias=False)
    return LlavaConfig(**{**base, **kw})


def onevision_config(**kw) -> LlavaOnevisionConfig:
    """LLaVA-OneVision style: SigLIP tower read at -1 (un-normed), all tokens ("full"), tied embeddings, AnyRes."""
    base = dict(vision_config=SiglipVisionConfig(**VISION, vision_use_head=False),
                text_config=Qwen2Config(**TEXT, tie_word_embeddings=True), image_token_index=TINY_IMAGE_TOKEN_ID,
                video_token_index=5, vision_feature_layer=-1, vision_feature_select_strategy="full",
                image_grid_pinpoints=[[64, 64], [64, 128]])
    return LlavaOnevisionConfig(**{**base, **kw})


BUILDERS = {
    "llava": (LlavaForConditionalGeneration, llava_config),
    "llava_onevision": (LlavaOnevisionForConditionalGeneration, onevision_config),
}


def save_source(path, arch: str, seed: int = 0, with_tokenizer: bool = True, **kw):
    cls, make = BUILDERS[arch]
    torch.manual_seed(seed)
    model = cls(make(**kw)).eval()
    model.save_pretrained(path)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def converted(request, tmp_path_factory):
    """(arch, source model, converted dir) with the merge after layer 1 of the layers that run, r = 2."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    src = save_source(root / "src", arch)
    report = convert_checkpoint(root / "src", root / "out", layer=1, ratio=2)
    return arch, src, root / "out", report


# -- the independent reference ------------------------------------------------------------------------
def reference_features(hf_tower, pixel_values, *, merge_after: int | None, ratio: int, feature_layer: int,
                       strategy: str) -> torch.Tensor:
    """HF LLaVA's image features (before the projector), with r x r average pooling after layer ``merge_after``.

    Written against the HF modules directly (no laco code): embeddings (+ CLIP's pre-norm), encoder layers,
    ``hidden_states[feature_layer]`` (never normed), then "default" drops token 0 as HF LLaVA does.
    """
    inner = getattr(hf_tower, "vision_model", hf_tower)
    prefix = 1 if hasattr(inner, "pre_layrnorm") else 0  # CLIP has a CLS token, SigLIP none
    x = inner.embeddings(pixel_values)
    if prefix:
        x = inner.pre_layrnorm(x)
    layers = inner.encoder.layers
    n_run = feature_layer % (len(layers) + 1)  # hidden_states[f] is the output of layer n_run
    side = pixel_values.shape[-1] // hf_tower.config.patch_size
    for i in range(n_run):
        if i == merge_after:
            cls_tok, patches = x[:, :prefix], x[:, prefix:]
            b, n, c = patches.shape
            grid = patches.transpose(1, 2).reshape(b, c, side, side)  # (B, C, H, W), raster order
            pooled = F.avg_pool2d(grid, ratio)  # (B, C, H/r, W/r)
            side //= ratio
            x = torch.cat([cls_tok, pooled.flatten(2).transpose(1, 2)], dim=1)
        out = layers[i](x, None)
        x = out[0] if isinstance(out, tuple) else out
    return x[:, 1:] if strategy == "default" else x


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_reference_loop_matches_hf_llava_without_merge(arch):
    """The test's own loop reproduces HF LLaVA's image features exactly when nothing is merged."""
    cls, make = BUILDERS[arch]
    torch.manual_seed(1)
    model = cls(make()).eval()
    px = torch.randn(2, 3, 64, 64)
    cfg = model.config
    with torch.no_grad():
        mine = model.model.multi_modal_projector(reference_features(
            model.model.vision_tower, px, merge_after=None, ratio=2, feature_layer=cfg.vision_feature_layer,
            strategy=cfg.vision_feature_select_strategy))
        if arch == "llava":
            hf_out = model.model.get_image_features(px, vision_feature_layer=cfg.vision_feature_layer,
                                                    vision_feature_select_strategy=cfg.vision_feature_select_strategy)
            hf = torch.stack(list(hf_out.pooler_output))
        else:  # OV's get_image_features also tiles (AnyRes) and packs; its per-tile step is this:
            states = model.model.vision_tower(px, output_hidden_states=True).hidden_states
            hf = model.model.multi_modal_projector(states[cfg.vision_feature_layer])
    torch.testing.assert_close(mine, hf)


def test_converted_tower_equals_independent_inner_average_pool(converted):
    arch, src, out, report = converted
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    cfg = src.config
    assert model.vision_tower.merge_layers == [1]
    px = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference_features(src.model.vision_tower, px, merge_after=1, ratio=2,
                                      feature_layer=cfg.vision_feature_layer,
                                      strategy=cfg.vision_feature_select_strategy)
        got = model.get_image_features(px)
        expected_proj = src.model.multi_modal_projector(expected)
    # CLIP "default": HF drops the CLS token, which is laco's one prefix token; SigLIP "full": all 16 tokens
    assert got.shape == expected_proj.shape == (3, model.num_image_tokens, TEXT["hidden_size"])
    assert model.num_image_tokens == report.tokens_per_image_after == 16
    torch.testing.assert_close(got, expected_proj)
    # and it is a real change: the unmerged features differ
    with torch.no_grad():
        unmerged = reference_features(src.model.vision_tower, px, merge_after=None, ratio=2,
                                      feature_layer=cfg.vision_feature_layer,
                                      strategy=cfg.vision_feature_select_strategy)
    assert unmerged.shape[1] > got.shape[1]


def test_weights_bit_identical_after_save_and_load(converted):
    arch, src, out, _ = converted
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    src_sd = src.state_dict()

    def check(prefix_src: str, module: torch.nn.Module) -> int:
        sd = module.state_dict()
        keys = [k for k in src_sd if k.startswith(prefix_src)]
        assert keys, prefix_src
        for k in keys:
            assert torch.equal(sd[k[len(prefix_src):]], src_sd[k]), k
        return len(keys)

    n_vis = check("model.vision_tower.", model.vision_tower.vision_model)
    n_llm = check("model.language_model.", model.get_decoder())
    assert n_vis == len(model.vision_tower.vision_model.state_dict())
    assert n_llm == len(model.get_decoder().state_dict())
    assert torch.equal(model.get_output_embeddings().weight, src_sd["lm_head.weight"])
    proj = model.projector
    assert torch.equal(proj[0].weight, src_sd["model.multi_modal_projector.linear_1.weight"])
    assert torch.equal(proj[2].weight, src_sd["model.multi_modal_projector.linear_2.weight"])
    if src.config.multimodal_projector_bias:
        assert torch.equal(proj[0].bias, src_sd["model.multi_modal_projector.linear_1.bias"])
    else:
        assert not proj[0].bias.any() and not proj[2].bias.any()
    # the PML's projection is zero-initialised (it starts as average pooling) and survives save/load
    last = model.vision_tower.compressors["1"].proj[-1]
    assert not last.weight.any() and not last.bias.any()
    if src.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_convert_load_generate_with_processor(converted):
    arch, src, out, report = converted
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.num_image_tokens == model.num_image_tokens
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    batch = processor(text=["<image>\nWhat is here?", "Compare <image> and <image>."], images=[images[:1], images],
                      return_tensors="pt")
    if arch == "llava_onevision":  # AnyRes: the lone image is tiled (base + 1 tile + 4 newlines), the pair is not
        expected = (16 + 16 + 4) + 2 * (16 + 1)
    else:
        expected = 3 * model.num_image_tokens
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == expected
    out_ids = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out_ids.shape[1] > batch["input_ids"].shape[1]
    saved = json.loads((out / "conversion.json").read_text())
    assert saved["tokens_per_image_after"] == model.num_image_tokens
    assert saved["merge_after_layers"] == [1]
    if arch == "llava_onevision":
        assert saved["final_norm"] is False  # HF reads hidden_states[-1]: SigLIP's post_layernorm is not applied
        assert not any("image_newline" in n or "pinpoints" in n for n in saved["notes"])  # carried over now
        assert processor.image_grid_pinpoints == src.config.image_grid_pinpoints and processor.image_newline
        assert saved["tokens_per_image_before"] == 64
    else:
        assert saved["vision_feature_layer"] == -2 and saved["encoder_layers_run"] == 3
        assert saved["tokens_per_image_before"] == 64  # 65 tokens, HF "default" drops the CLS


def test_laco_train_stage1_from_converted_dir(converted, tmp_path):
    """`laco train`'s model source {pretrained: OUT_DIR} loads it; stage 1 changes only the PML and projector
    (+ OneVision's image_newline). LLaVA-OneVision: AnyRes images (1 x 2 tiles); then `laco eval` on the trained
    model, and save -> Auto load -> identical greedy generation."""
    import numpy as np
    from PIL import Image

    from laco.eval import evaluate
    from laco.eval.evaluator import generate_texts
    from laco.train import DataConfig, ModelSource, RunConfig, StageConfig, train
    from laco.train.build import build_from_source

    arch, _, out, _ = converted
    model, processor = build_from_source(ModelSource(pretrained=str(out)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = np.random.default_rng(0)
    hw = (40, 100) if arch == "llava_onevision" else (64, 64)
    if arch == "llava_onevision":
        assert model.config.image_layout(hw).tiles == (1, 2)
    records = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": f"thing {i}"}]})
    cfg = RunConfig(output_dir=str(tmp_path / "run"), data=DataConfig(image_folder=str(tmp_path)), progress=False,
                    stages=[StageConfig("align", trainable=["compressor", "projector"], learning_rate=1e-2,
                                        max_steps=2, batch_size=2, warmup_steps=0)])
    result = train(model, processor, records, cfg)
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.startswith("model.vision_tower.compressors.") for n in changed)
    assert any(n.startswith("model.multi_modal_projector.") for n in changed)
    assert ("model.image_newline" in changed) == (arch == "llava_onevision")
    trained = ("model.vision_tower.compressors.", "model.multi_modal_projector.", "model.image_newline")
    assert all(n.startswith(trained) for n in changed), changed
    # laco eval on the trained model, AnyRes images included
    with open(tmp_path / "test.jsonl", "w") as f:
        for i in range(2):
            f.write(json.dumps({"id": f"q{i}", "image": f"{i}.png", "question": "What is this?",
                                "answer": f"thing {i}", "metric": "exact"}) + "\n")
    summary = evaluate(result.model, processor, tmp_path / "test.jsonl", out_dir=tmp_path / "eval", batch_size=2,
                       max_new_tokens=3, progress=False)
    assert summary["num_samples"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
    # save -> Auto load -> the same greedy answers
    saved = tmp_path / "saved"
    result.model.save_pretrained(saved)
    processor.save_pretrained(saved)
    again, again_proc = AutoModelForImageTextToText.from_pretrained(saved).eval(), AutoProcessor.from_pretrained(saved)
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat is this?"}],
                                           add_generation_prompt=True)
    images = [Image.open(tmp_path / "0.png")]
    assert generate_texts(again, again_proc, [prompt], images, 6) == generate_texts(result.model.eval(), processor,
                                                                                     [prompt], images, 6)


def test_onevision_image_newline_maps_from_both_key_layouts(tmp_path):
    """LLaVA-OneVision checkpoints name the newline ``image_newline`` (the hub's layout, which transformers 5 also
    writes) or ``model.image_newline`` (with ``model.vision_tower`` / ``model.multi_modal_projector`` /
    ``model.language_model`` / ``lm_head``, as transformers 4.52-4.57 saved them). Both convert to the source's
    tensor, and every carried weight is the same."""
    from safetensors.torch import load_file, save_file

    src = save_source(tmp_path / "hub", "llava_onevision")
    hub = load_file(tmp_path / "hub" / "model.safetensors")
    assert "image_newline" in hub and "model.image_newline" not in hub  # what save_pretrained writes here
    renames = (("image_newline", "model.image_newline"), ("vision_tower.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector."),
               ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))

    def new_key(k: str) -> str:
        return next((b + k[len(a):] for a, b in renames if k.startswith(a)), k)

    (tmp_path / "new").mkdir()
    for f in (tmp_path / "hub").iterdir():
        if f.name != "model.safetensors":
            (tmp_path / "new" / f.name).write_bytes(f.read_bytes())
    new = {new_key(k): v.contiguous() for k, v in hub.items()}
    assert "model.image_newline" in new and not any(k.startswith(("vision_tower", "language_model")) for k in new)
    save_file(new, tmp_path / "new" / "model.safetensors", metadata={"format": "pt"})
    states = {}
    for name in ("hub", "new"):
        convert_checkpoint(tmp_path / name, tmp_path / f"out-{name}", layer=1, ratio=2)
        model = AutoModelForImageTextToText.from_pretrained(tmp_path / f"out-{name}")
        assert torch.equal(model.image_newline, src.model.image_newline)
        states[name] = model.state_dict()
    carried = [k for k in states["hub"] if not k.startswith("model.vision_tower.compressors.")]  # the new PML is random
    assert set(states["hub"]) == set(states["new"])
    assert all(torch.equal(states["hub"][k], states["new"][k]) for k in carried)


@pytest.mark.parametrize("processor_type", ["LlavaOnevisionImageProcessorPil", "LlavaOnevisionImageProcessor"])
def test_converted_onevision_processor_pixels_equal_the_source_processor(tmp_path, processor_type):
    """AutoProcessor from a converted OneVision folder gives the source image processor's pixel_values (base image
    first, then the tiles) and image_sizes, bit for bit, for a wide and a tall image. The source ships its own
    statistics (CLIP's, not SigLIP's) and, as on the hub, may name the torchvision class."""
    import numpy as np
    from PIL import Image
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    pinpoints = [[64, 64], [64, 128], [128, 64], [128, 128]]
    save_source(tmp_path / "src", "llava_onevision", image_grid_pinpoints=pinpoints)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    LlavaOnevisionImageProcessorPil(size={"height": 64, "width": 64}, image_grid_pinpoints=pinpoints, image_mean=mean,
                                    image_std=std).save_pretrained(tmp_path / "src")
    cfg_path = tmp_path / "src" / "preprocessor_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "image_processor_type": processor_type}))
    source = LlavaOnevisionImageProcessorPil.from_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "out", layer=1, ratio=2)
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    rng = np.random.default_rng(0)
    for hw, tiles in (((40, 110), (1, 2)), ((120, 50), (2, 1))):
        image = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
        ref = source(images=[image], return_tensors="pt")
        ours = processor(text="<image>\nWhat?", images=[image], return_tensors="pt")
        n = processor.image_layout(hw).num_inputs
        assert processor.image_layout(hw).tiles == tiles and n == 1 + tiles[0] * tiles[1]
        assert ours["pixel_values"].shape == (n, 3, 64, 64)
        assert torch.equal(ours["pixel_values"], ref["pixel_values"][0, :n])
        assert torch.equal(ours["image_sizes"], ref["image_sizes"]) and ours["image_sizes"].tolist() == [list(hw)]


def test_real_shapes_llava_onevision_0_5b_on_meta():
    """llava-onevision-qwen2-0.5b-ov-hf shapes (SigLIP-so400m with its last layer removed, 26 run, read at -1
    un-normed; Qwen2-0.5B, tied): merge after layer 7 (26/4 = 6.5 rounds up), 27x27 -> 14x14 = 196 tokens."""
    cfg = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                         num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False),
        text_config=Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        image_token_index=151646, vision_feature_layer=-1, vision_feature_select_strategy="full")
    with torch.device("meta"):
        src = LlavaOnevisionForConditionalGeneration(cfg)
        model, notes = build_converted_model(src, layer="1/4", ratio=2)
    tower = model.vision_tower
    assert tower.merge_layers == [7] and tower.num_layers == 26 and tower.apply_final_norm is False
    assert model.num_image_tokens == 196
    assert model.projector[0].weight.shape == (896, 1152)
    assert laco.encoder_cost(tower).flop_ratio < 0.5


# -- conversion details and errors ------------------------------------------------------------------------
def test_feature_layer_mapping():
    assert hf_feature_layer_to_core(-1, 4) == -1
    assert hf_feature_layer_to_core(-2, 4) == -2
    assert hf_feature_layer_to_core(4, 4) == -1  # hidden_states[4] of 4 layers: the last layer's output
    assert hf_feature_layer_to_core(3, 4) == -2
    with pytest.raises(ValueError, match="patch embeddings"):
        hf_feature_layer_to_core(0, 4)
    with pytest.raises(ValueError, match="several layers"):
        hf_feature_layer_to_core([-2, -5], 4)
    with pytest.raises(TypeError):
        hf_feature_layer_to_core("last", 4)


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics3", "architectures": ["Idefics3X"]}))
    with pytest.raises(ValueError) as err:
        convert_checkpoint(tmp_path, tmp_path / "out")
    msg = str(err.value)
    assert "idefics3" in msg and all(cls in msg for cls in SUPPORTED_ARCHITECTURES.values())
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(tmp_path / "missing", tmp_path / "out")


def test_bad_sources_and_outputs(tmp_path):
    src = LlavaForConditionalGeneration(llava_config(vision_feature_layer=[-2, -3])).eval()
    with pytest.raises(ValueError, match="several layers"):
        build_converted_model(src)
    src = LlavaForConditionalGeneration(llava_config(projector_hidden_act="relu")).eval()
    with pytest.raises(ValueError, match="activation 'relu'"):
        build_converted_model(src)
    save_source(tmp_path / "src", "llava", with_tokenizer=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="exists"):
        convert_checkpoint(tmp_path / "src", tmp_path / "out")
    report = convert_checkpoint(tmp_path / "src", tmp_path / "out", overwrite=True, layer="post")
    assert any("no processor" in n for n in report.notes)
    assert report.merge_after_layers == [3] and report.encoder_flop_ratio > 1  # external: no saving
    assert not list(tmp_path.glob(".out.*"))  # temporary folders cleaned up


def test_final_norm_switch_matches_hf_hidden_states():
    """Core: ``final_norm=False`` at -1 gives HF's un-normed hidden_states[-1] (what LLaVA reads)."""
    torch.manual_seed(0)
    vm = laco.create_vision_encoder("tiny-siglip").eval()
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hf = vm(px, output_hidden_states=True)
        normed = laco.compress_encoder(vm, None)(px).last_hidden_state
        raw = laco.compress_encoder(vm, None, final_norm=False)(px).last_hidden_state
    torch.testing.assert_close(normed, hf.last_hidden_state)
    torch.testing.assert_close(raw, hf.hidden_states[-1])
    assert not torch.allclose(raw, normed)
    assert "final_norm" not in laco.encoder_cost(laco.compress_encoder(vm, "laco", final_norm=False)).params


def test_cli_convert(tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    from laco.cli import app, main

    save_source(tmp_path / "src", "llava")
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--layer", "1/4",
                                   "--ratio", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "config.json").is_file() and "16" in res.output
    monkeypatch.setattr(sys, "argv", ["laco", "convert", str(tmp_path / "src"), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "exists" in capsys.readouterr().err


def test_cli_probe_then_convert_from_probe(tmp_path):
    """The evidence path: probe the checkpoint's tower, then convert with the recommended (k, r)."""
    from typer.testing import CliRunner

    from laco.cli import app

    save_source(tmp_path / "src", "llava_onevision")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for i in range(6):
        arr = (torch.rand(64, 64, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(imgs / f"{i}.png")
    runner = CliRunner()
    res = runner.invoke(app, ["probe", str(tmp_path / "src"), "--images", str(imgs), "--ratios", "2",
                              "--budget", "0.9", "--out", str(tmp_path / "probe")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "probe" / "probe.json").read_text())["recommendation"]["row"]
    res = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--from-probe",
                              str(tmp_path / "probe" / "probe.json"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["merge_after_layers"] == [rec["layer"]] and report["compression"]["ratio"] == rec["ratio"]
    res = runner.invoke(app, ["convert", str(tmp_path / "imgs"), str(tmp_path / "out2"), "--from-probe",
                              str(tmp_path / "probe" / "probe.json")])
    assert isinstance(res.exception, ValueError) and "probed" in str(res.exception)  # a different checkpoint
    weights = tmp_path / "src" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # the probed checkpoint's weights changed after the probe
    weights.write_bytes(bytes(data))
    res = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out3"), "--from-probe",
                              str(tmp_path / "probe" / "probe.json")])
    assert isinstance(res.exception, ValueError) and "changed since it was probed" in str(res.exception)
