"""LaCoConfig / LaCoForConditionalGeneration on tiny models built in code (no downloads)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import laco
from laco.model.testing import TINY_IMAGE_TOKEN_ID, tiny_laco_config, tiny_laco_model

IMG = TINY_IMAGE_TOKEN_ID


def _inputs(model, n_images=1, size=64, batch=1, seed=0):
    """input_ids with n_images image blocks per row; pixel_values for all of them."""
    g = torch.Generator().manual_seed(seed)
    t = model.num_image_tokens
    rows = []
    for _ in range(batch):
        row = [1, 10, 11]
        for _ in range(n_images):
            row += [IMG] * t + [12]
        rows.append(row + [13, 14])
    ids = torch.tensor(rows)
    pv = torch.randn(batch * n_images, 3, size, size, generator=g)
    return ids, pv


def _encoder_tokens(model, pv):
    """Compressed feature length from the tower itself (minus prefix for strategy default)."""
    out = model.vision_tower(pv, interpolate_pos_encoding=pv.shape[-1] != model.config.vision_config.image_size)
    keep = model.config.vision_feature_select_strategy == "full"
    return out.last_hidden_state.shape[1] - (0 if keep else out.num_prefix_tokens)


def test_forward_loss_backward_and_groups():
    model = tiny_laco_model().train()
    ids, pv = _inputs(model, n_images=2, batch=2)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, labels=ids)
    assert out.logits.shape == (*ids.shape, model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    groups = model.parameter_groups()
    assert set(groups) == {"compressor", "encoder", "projector", "llm"}
    ids_of = {k: {id(p) for p in v} for k, v in groups.items()}
    all_ids = {id(p) for p in model.parameters()}
    assert set().union(*ids_of.values()) == all_ids
    assert sum(len(v) for v in ids_of.values()) == len(all_ids)  # disjoint
    for name in ("projector", "compressor", "llm"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[name]), name


def test_laco_projection_is_zero_initialised():
    model = tiny_laco_model()
    pml = model.vision_tower.compressors["1"]
    assert torch.count_nonzero(pml.proj[-1].weight) == 0
    assert model.projector[0].weight.std() > 0


def test_image_labels_are_masked():
    model = tiny_laco_model()
    ids, pv = _inputs(model)
    labels = ids.clone()
    base = model(input_ids=ids, pixel_values=pv, labels=labels).loss
    masked = labels.masked_fill(ids == IMG, -100)
    assert torch.allclose(base, model(input_ids=ids, pixel_values=pv, labels=masked).loss)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(compression={"method": "laco", "layer": "1/4", "ratio": 2}),
        dict(compression={"method": "laco", "layer": "post", "ratio": 2}),
        dict(compression={"method": "none"}),
        dict(compression={"method": "laco", "layer": [1, 3], "ratio": 2}),
        # odd grid: 72 px / patch 8 -> 9x9, replicate pad -> 5x5
        dict(compression={"method": "laco", "layer": "1/4", "ratio": 2}, vision={"image_size": 72}),
        dict(compression={"method": "avg_pool", "layer": 2, "ratio": 2}),
        # 80 px input on a 64 px encoder: position embeddings interpolated, 10x10 -> 5x5
        dict(compression={"method": "laco", "layer": "1/4", "ratio": 2}, image_size=80),
    ],
)
def test_num_image_tokens_matches_compressed_features(overrides):
    model = tiny_laco_model(**overrides)
    size = model.config.image_size
    _, pv = _inputs(model, size=size)
    n = _encoder_tokens(model, pv)
    assert model.num_image_tokens == n == model.config.num_image_tokens
    assert model.get_image_features(pv).shape == (1, n, model.config.text_config.hidden_size)
    if overrides.get("vision", {}).get("image_size") == 72 or overrides.get("image_size") == 80:
        assert n == 25


def test_full_strategy_keeps_cls_for_clip():
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=2, image_size=64, patch_size=8)
    for strategy, expected in (("default", 16), ("full", 17)):
        model = tiny_laco_model(vision_config=vision, vision_feature_select_strategy=strategy)
        assert model.num_image_tokens == expected
        ids, pv = _inputs(model)
        feats = model.get_image_features(pv)
        assert feats.shape[1] == expected
        # the forward path (OneVision's packing, a plain image here) hands the LLM those tokens, CLS included
        torch.testing.assert_close(torch.stack(model.get_visual_tokens(pv)), feats)
        assert model(input_ids=ids, pixel_values=pv).logits.shape[:2] == ids.shape


def test_count_mismatch_is_value_error_before_llm():
    model = tiny_laco_model()
    ids, pv = _inputs(model, n_images=1)
    calls = []
    model.get_decoder().register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="image tokens and image features do not match"):
        model(input_ids=ids[:, :-4], pixel_values=pv)  # cuts the last image token too
    with pytest.raises(ValueError, match="1 image"):
        model(input_ids=torch.cat([ids[:, :5], ids[:, 6:]], 1), pixel_values=pv)  # one image token short
    with pytest.raises(ValueError, match="2 image"):
        model(input_ids=ids, pixel_values=torch.cat([pv, pv]))  # an extra image
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)
    assert not calls


def test_bad_config_errors():
    with pytest.raises(ValueError, match="unknown compression method"):
        tiny_laco_config(compression={"method": "nope"})
    with pytest.raises(ValueError, match="unknown compression keys"):
        tiny_laco_config(compression={"method": "laco", "layers": 2})
    with pytest.raises(ValueError, match="unknown projector"):
        tiny_laco_model(projector_type="mlp0x_relu")
    with pytest.raises(ValueError, match="outside the LLM vocabulary"):
        tiny_laco_config(image_token_id=10_000)


def test_projectors():
    from laco.model.projectors import create_projector

    assert create_projector("mlp3x_gelu", 8, 16)(torch.zeros(2, 8)).shape == (2, 16)
    assert create_projector("linear", 8, 16)(torch.zeros(2, 8)).shape == (2, 16)
    with pytest.raises(ValueError, match="identity"):
        create_projector("identity", 8, 16)


def _greedy(model, ids, pv, **kw):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, max_new_tokens=6,
                          do_sample=False, **kw)


def test_generate_cache_equals_no_cache():
    model = tiny_laco_model(seed=1)
    ids, pv = _inputs(model, n_images=1)
    with_cache = _greedy(model, ids, pv)
    assert with_cache.shape[1] > ids.shape[1]
    assert torch.equal(with_cache, _greedy(model, ids, pv, use_cache=False))


def test_generate_uses_image():
    model = tiny_laco_model(seed=1)
    ids, pv = _inputs(model)
    a = model(input_ids=ids, pixel_values=pv).logits[0, -1]
    b = model(input_ids=ids, pixel_values=pv.flip(-1) * 3).logits[0, -1]
    assert not torch.allclose(a, b)


def test_save_auto_load_same_generation(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    model = tiny_laco_model(seed=2, compression={"method": "laco", "layer": [1, "post"], "ratio": 2})
    ids, pv = _inputs(model)
    before = _greedy(model, ids, pv)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, laco.LaCoConfig) and cfg.compression["layer"] == [1, "post"]
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(loaded, laco.LaCoForConditionalGeneration)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert torch.equal(before, _greedy(loaded.eval(), ids, pv))


def test_from_parts(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModel, Qwen2Config, SiglipVisionConfig

    from laco.model.testing import tiny_text_config, tiny_vision_config

    torch.manual_seed(0)
    vcfg = {k: v for k, v in tiny_vision_config().items() if k != "model_type"}
    tcfg = {k: v for k, v in tiny_text_config().items() if k != "model_type"}
    vision = AutoModel.from_config(SiglipVisionConfig(**vcfg))
    llm = AutoModelForCausalLM.from_config(Qwen2Config(**tcfg))
    vision.save_pretrained(tmp_path / "vision")
    llm.save_pretrained(tmp_path / "llm")
    model = laco.LaCoForConditionalGeneration.from_parts(
        tmp_path / "vision", tmp_path / "llm", compression={"method": "laco", "layer": "post"}, image_token_id=IMG
    )
    assert torch.equal(model.vision_tower.vision_model.embeddings.patch_embedding.weight,
                       vision.embeddings.patch_embedding.weight)
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    assert torch.equal(model.get_decoder().embed_tokens.weight, llm.model.embed_tokens.weight)
    assert not any(p.is_meta for p in model.parameters())
    assert model.num_image_tokens == 16
    ids, pv = _inputs(model)
    out = model(input_ids=ids, pixel_values=pv, labels=ids)
    assert torch.isfinite(out.loss)
    model.save_pretrained(tmp_path / "mllm")
    from transformers import AutoModelForImageTextToText

    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "mllm")
    assert torch.allclose(again(input_ids=ids, pixel_values=pv).logits, model(input_ids=ids, pixel_values=pv).logits)
    with pytest.raises(FileNotFoundError):
        laco.LaCoForConditionalGeneration.from_parts(tmp_path / "missing", tmp_path / "llm", image_token_id=IMG)
    with pytest.raises(ValueError, match="image_token_id"):
        laco.LaCoForConditionalGeneration.from_parts(tmp_path / "vision", tmp_path / "llm")


def test_batched_left_padded_generate_matches_single():
    model = tiny_laco_model(seed=4)
    t = model.num_image_tokens
    rows = [[1, 10] + [IMG] * t + [12, 13], [1, 10, 20, 21, 22] + [IMG] * t + [12]]
    pv = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left padding with pad id 0
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=5, do_sample=False)
    for i, row in enumerate(rows):
        single = _greedy(model, torch.tensor([row]), pv[i : i + 1])[:, len(row):len(row) + 5]
        assert torch.equal(batched[i, width:], single[0]), i


@pytest.mark.compat  # also in the oldest-transformers CI venv: the checkpointing API's name differs in 5.17
def test_activation_checkpointing_same_loss_and_grads():
    from laco.model.compat import set_activation_checkpointing

    model = tiny_laco_model().train()
    ids, pv = _inputs(model, batch=2)

    def grads():
        model.zero_grad()
        loss = model(input_ids=ids, pixel_values=pv, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss1, g1 = grads()
    set_activation_checkpointing(model, True)  # activation_ (5.24) or gradient_checkpointing_enable (5.17)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.vision_tower.modules())
    loss2, g2 = grads()
    assert torch.allclose(loss1, loss2)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
    set_activation_checkpointing(model, False)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.vision_tower.modules())


def test_tied_embeddings_round_trip(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = tiny_laco_model(text={"tie_word_embeddings": True})
    assert model.lm_head.weight is model.get_decoder().embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert "language_model.lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # stored once
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.get_decoder().embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_from_parts_takes_image_token_from_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from laco.model.testing import tiny_text_config, tiny_tokenizer, tiny_vision_config

    vcfg = {k: v for k, v in tiny_vision_config().items() if k != "model_type"}
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(**vcfg)).save_pretrained(tmp_path / "vision")
    tcfg = {**{k: v for k, v in tiny_text_config().items() if k != "model_type"}, "vocab_size": 300}
    AutoModelForCausalLM.from_config(Qwen2Config(**tcfg)).save_pretrained(tmp_path / "llm")
    tok = tiny_tokenizer()  # 384 tokens > the LLM's 300: embeddings grow
    model = laco.LaCoForConditionalGeneration.from_parts(tmp_path / "vision", tmp_path / "llm", tokenizer=tok)
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.get_input_embeddings().num_embeddings >= len(tok)
    ids, pv = _inputs(model)
    assert model(input_ids=ids, pixel_values=pv).logits.shape[-1] >= len(tok)


def test_real_shapes_on_meta_device():
    """SigLIP-so400m-384 + Qwen2-0.5B shapes (no memory): 27x27 patches -> 14x14 = 196 tokens at 1/4."""
    from laco.encoders import vision_config

    qwen05 = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    cfg = laco.LaCoConfig(vision_config=vision_config("siglip-so400m-384").to_dict(), text_config=qwen05,
                          image_token_id=151669)
    assert cfg.num_image_tokens == 196
    assert laco.LaCoConfig(**{**cfg.to_dict(), "compression": {"method": "none"}}).num_image_tokens == 729
    with torch.device("meta"):
        model = laco.LaCoForConditionalGeneration(cfg)
    sizes = {k: sum(p.numel() for p in v) for k, v in model.parameter_groups().items()}
    assert sizes["projector"] == 1152 * 896 + 896 + 896 * 896 + 896  # mlp2x_gelu, LLaVA-OneVision's
    assert 490e6 < sizes["llm"] < 500e6  # Qwen2-0.5B with tied embeddings
