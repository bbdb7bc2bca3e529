"""LLaVA-OneVision's visual layout: AnyRes tiles, unpadding, image_newline, multi-image, video.

Acceptance: a tiny random ``LlavaOnevisionForConditionalGeneration`` converted with compression ``none`` gives
Hugging Face's ``inputs_embeds`` and logits exactly; with LaCo at ``"post"`` (zero-initialised PML) every
tile is a 2x2 average pool of the source tile, and the token count is the processor's prediction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    Qwen2Config,
    SiglipVisionConfig,
)

from laco.model import anyres
from laco.model.convert import build_converted_model
from laco.model.testing import TINY_IMAGE_TOKEN_ID, tiny_tokenizer

torch.set_num_threads(2)

TILE, PATCH = 32, 8  # a 4x4 patch grid per tile
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [64, 96]]
VIDEO_TOKEN_ID = 5
TEXT_IDS = [10, 11, 12]


def ov_source(seed: int = 0, **kw) -> LlavaOnevisionForConditionalGeneration:
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=TILE, patch_size=PATCH, vision_use_head=False)
    text = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=384, max_position_embeddings=2048, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=True)
    cfg = dict(vision_config=vision, text_config=text, image_token_index=TINY_IMAGE_TOKEN_ID,
               video_token_index=VIDEO_TOKEN_ID, vision_feature_layer=-1, vision_feature_select_strategy="full",
               image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_3")
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**{**cfg, **kw})).eval()


def image_processor() -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS,
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pair():
    src = ov_source()
    model, notes = build_converted_model(src, method="none")
    return src, model, notes


def lm_inputs(model_lm) -> tuple[dict, object]:
    """Capture the ``inputs_embeds`` the decoder receives (a forward pre-hook on the base LM)."""
    seen: dict = {}

    def hook(_module, args, kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()

    return seen, model_lm.register_forward_pre_hook(hook, with_kwargs=True)


def run_both(src, model, batch: dict):
    out = []
    for m, lm in ((src, src.model.language_model), (model, model.get_decoder())):
        seen, handle = lm_inputs(lm)
        with torch.no_grad():
            logits = m(**batch).logits
        handle.remove()
        out.append((seen["inputs_embeds"], logits))
    return out


def prompt_ids(counts: list[int], token_id: int = TINY_IMAGE_TOKEN_ID) -> torch.Tensor:
    ids = [*TEXT_IDS]
    for n in counts:
        ids += [token_id] * n + TEXT_IDS
    return torch.tensor([ids])


# -- the layout arithmetic against Hugging Face's own functions --------------------------------------
@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 400), w=st.integers(1, 400), g=st.integers(1, 9), max_tiles=st.integers(1, 9))
def test_token_count_equals_hf_processor_formula(h, w, g, max_tiles):
    """``anyres.image_layout`` counts what ``LlavaOnevisionProcessor._get_number_of_features`` counts."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    stub = type("P", (), {"num_image_tokens": g * g, "vision_aspect_ratio": f"anyres_max_{max_tiles}",
                          "image_processor": type("I", (), {"image_grid_pinpoints": PINPOINTS})()})()
    stub._get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features.__get__(stub)
    hf = LlavaOnevisionProcessor._get_number_of_features(stub, h, w, TILE, TILE)
    lay = anyres.image_layout((h, w), tile_grid_size=(g, g), pinpoints=PINPOINTS, tile_size=TILE,
                              max_tiles=max_tiles, newline=True)
    assert lay.num_tokens == hf
    assert lay.num_inputs == image_size_to_num_patches((h, w), PINPOINTS, TILE)


@settings(max_examples=100, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), rows=st.integers(1, 4), cols=st.integers(1, 4),
       g=st.integers(1, 6))
def test_unpad_bounds_equal_hf_unpad_image(h, w, rows, cols, g):
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    grid = torch.arange(rows * g * cols * g, dtype=torch.float32).view(1, rows * g, cols * g)
    top, bottom, left, right = anyres.unpad_bounds((h, w), (rows * g, cols * g))
    torch.testing.assert_close(grid[:, top:bottom, left:right], unpad_image(grid, (h, w)))


def test_bad_layout_options_are_clear_errors():
    with pytest.raises(ValueError, match="anyres_max"):
        anyres.parse_max_tiles("anyres")
    with pytest.raises(ValueError, match="multiple of the tile size"):
        anyres.check_pinpoints([[32, 40]], 32)


# -- equality with Hugging Face, compression "none" ---------------------------------------------------
def test_conversion_keeps_the_onevision_layout(pair):
    src, model, notes = pair
    cfg = model.config
    assert cfg.image_grid_pinpoints == PINPOINTS and cfg.vision_aspect_ratio == "anyres_max_3"
    assert cfg.use_image_newline and cfg.video_token_id == VIDEO_TOKEN_ID and cfg.video_pooling
    assert model.image_newline is src.model.image_newline
    assert not any("image_newline" in n or "pinpoints" in n for n in notes)


def test_converted_parameter_names_are_hf_onevision_s(pair):
    """LLaVA-OneVision's module tree: every parameter of the converted model (method "none": no compressor) holds the
    source's values under the source's name: exactly so under ``model.language_model``, ``lm_head`` and
    ``model.image_newline``; inside the tower and projector laco's own modules rename two things, listed here."""
    src, model, _ = pair
    laco_to_hf = (("model.vision_tower.vision_model.", "model.vision_tower."),  # CompressedVisionEncoder's level
                  ("model.multi_modal_projector.0.", "model.multi_modal_projector.linear_1."),  # nn.Sequential
                  ("model.multi_modal_projector.2.", "model.multi_modal_projector.linear_2."))

    def hf_name(name: str) -> str:
        return next((hf + name[len(ours):] for ours, hf in laco_to_hf if name.startswith(ours)), name)

    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs = dict(src.named_parameters(remove_duplicate=False))
    assert {hf_name(n) for n in ours} == set(theirs)
    assert all(torch.equal(p, theirs[hf_name(n)]) for n, p in ours.items())  # the same values
    exact = {n for n in ours if n == hf_name(n)}
    assert {n.split(".")[0] if n.startswith("lm_head") else ".".join(n.split(".")[:2]) for n in exact} == {
        "model.language_model", "lm_head", "model.image_newline"}


@pytest.mark.parametrize("hw,tiles", [((20, 90), (1, 3)), ((100, 24), (3, 1)), ((50, 50), (2, 2))],
                         ids=["wide", "tall", "square"])
def test_single_image_equals_hf(pair, hw, tiles):
    """Wide and tall: unpadded on the stitched grid; square: 2x2 tiles, down-scaled by anyres_max_3."""
    src, model, _ = pair
    assert model.config.image_layout(hw).tiles == tiles
    inputs = image_processor()(images=[random_image(*hw)], return_tensors="pt")
    n = model.config.image_layout(hw).num_tokens
    batch = dict(input_ids=prompt_ids([n]), **inputs)
    (hf_emb, hf_logits), (emb, logits) = run_both(src, model, batch)
    torch.testing.assert_close(emb, hf_emb, rtol=0, atol=0)
    torch.testing.assert_close(logits, hf_logits)


def test_anyres_max_downscaling_equals_hf(pair):
    """A large, many-tile image: the unpadded grid exceeds anyres_max_3 and is bilinearly down-scaled."""
    src, model, _ = pair
    lay = model.config.image_layout((64, 96))
    assert lay.scaled and lay.tiles == (2, 3)
    inputs = image_processor()(images=[random_image(64, 96)], return_tensors="pt")
    (hf_emb, hf_logits), (emb, logits) = run_both(src, model, dict(input_ids=prompt_ids([lay.num_tokens]), **inputs))
    torch.testing.assert_close(emb, hf_emb, rtol=0, atol=0)
    torch.testing.assert_close(logits, hf_logits)


def test_two_image_prompt_equals_hf(pair):
    """Images of a multi-image prompt are not tiled: each is its base image + one newline."""
    src, model, _ = pair
    inputs = image_processor()(images=[[random_image(20, 90), random_image(60, 40, seed=1)]], return_tensors="pt")
    per_image = [model.config.image_layout((1, 1), tiled=False).num_tokens] * 2
    assert per_image == [16 + 1] * 2
    (hf_emb, hf_logits), (emb, logits) = run_both(src, model, dict(input_ids=prompt_ids(per_image), **inputs))
    torch.testing.assert_close(emb, hf_emb, rtol=0, atol=0)
    torch.testing.assert_close(logits, hf_logits)


def test_four_frame_video_equals_hf(pair):
    """Frames encoded one by one, 2x2 bilinear pooling after the projector, one newline for the video."""
    src, model, _ = pair
    video = torch.randn(1, 4, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    n = model.config.video_tokens(4)
    assert n == 4 * 2 * 2 + 1
    batch = dict(input_ids=prompt_ids([n], VIDEO_TOKEN_ID), pixel_values_videos=video)
    (hf_emb, hf_logits), (emb, logits) = run_both(src, model, batch)
    torch.testing.assert_close(emb, hf_emb, rtol=0, atol=0)
    torch.testing.assert_close(logits, hf_logits)


def test_token_mismatch_is_a_clear_error(pair):
    _, model, _ = pair
    inputs = image_processor()(images=[random_image(20, 90)], return_tensors="pt")
    n = model.config.image_layout((20, 90)).num_tokens
    with pytest.raises(ValueError, match=f"{n - 1} image tokens.*{n} features"):
        model(input_ids=prompt_ids([n - 1]), **inputs)


# -- LaCo inside every tile ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def laco_post():
    from laco.model.processing import LaCoProcessor

    src = ov_source(seed=1)
    model, _ = build_converted_model(src, method="laco", layer="post", ratio=2, video_token=None)
    return src, model, LaCoProcessor.from_model_config(model.config, tiny_tokenizer(), image_processor=image_processor())


@settings(max_examples=12, deadline=None)
@given(h=st.integers(8, 120), w=st.integers(8, 120))
def test_laco_post_tiles_are_avg_pools_of_source_tiles(laco_post, h, w):
    """Every base image / tile: LaCo's features = F.avg_pool2d(2) of the source tower's; the model's token count =
    the processor's prediction, and the processor's inputs run through the model."""
    src, model, proc = laco_post
    image = random_image(h, w, seed=h * 1000 + w)
    inputs = image_processor()(images=[image], return_tensors="pt")
    lay = model.config.image_layout((h, w))
    tiles = inputs["pixel_values"][0, : lay.num_inputs]
    with torch.no_grad():
        ref = src.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-1]  # (n, 16, C)
        c = ref.shape[-1]
        pooled = F.avg_pool2d(ref.transpose(1, 2).reshape(-1, c, 4, 4), 2).flatten(2).transpose(1, 2)
        got = model.vision_tower(tiles).last_hidden_state
        tokens = model.get_visual_tokens(inputs["pixel_values"], inputs["image_sizes"])
    torch.testing.assert_close(got, pooled)
    assert lay.tile_grid == (2, 2)
    batch = proc(text="<image>\nWhat?", images=[image])
    assert [t.shape[0] for t in tokens] == [int((batch["input_ids"] == TINY_IMAGE_TOKEN_ID).sum())] == \
        [proc._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"][0]]
    torch.testing.assert_close(batch["pixel_values"], inputs["pixel_values"][0, : lay.num_inputs])
    with torch.no_grad():
        model(**batch)


# -- video through the processor --------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", [False, True])
def test_video_processor_counts_and_runs(pooling):
    """A list of frames or a (T, H, W, 3) array per <video>: T frames x tokens per frame + 1 newline."""
    from laco.model.testing import tiny_onevision

    model, proc = tiny_onevision(video_pooling=pooling)
    frames = np.random.default_rng(0).integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
    batch = proc(text=["a <video> b", "c <video>"], videos=[frames, list(frames)])
    per_frame = 2 * 2 if pooling else 4 * 4  # the tiny tower gives 4x4 tokens per frame (LaCo r=2 inside)
    assert model.config.video_tokens(3) == proc.video_tokens(3) == 3 * per_frame + 1
    assert (batch["input_ids"] == model.config.video_token_id).sum(-1).tolist() == [3 * per_frame + 1] * 2
    assert batch["pixel_values_videos"].shape == (2, 3, 3, 64, 64)
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
    with pytest.raises(ValueError, match="1 <video> placeholder"):
        proc(text="a <video>", videos=[frames, frames])
