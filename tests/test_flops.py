"""The analytic FLOP/param model against values worked out by hand for a tiny configuration."""

import json

import pytest
import torch
from typer.testing import CliRunner

import laco
from laco.cli import app
from laco.flops import decoder_layer_flops, vit_layer_flops


def test_vit_layer_flops_by_hand():
    # n=64 tokens, C=32, MLP 64: qkvo 2*64*32*128 = 524288, attention 2*2*64*64*32 = 524288, MLP 2*64*32*64*2 = 524288
    assert vit_layer_flops(64, 32, 64) == 3 * 524288
    # SwiGLU MLP has three matrices
    assert vit_layer_flops(64, 32, 64, 3) == 3 * 524288 + 262144


def test_decoder_layer_flops_by_hand():
    # 10 tokens, D=64, 4 heads, 2 kv heads (kv width 32), MLP 128:
    # proj 2*10*64*(128+64) = 245760; attn 2*2*10*10*64 = 25600; mlp 2*10*64*128*3 = 491520
    assert decoder_layer_flops(10, 64, 128, 4, 2) == 245760 + 25600 + 491520
    # one decoded token over a 10-token context: attention scales with the context only
    assert decoder_layer_flops(1, 64, 128, 4, 2, context=10) == 24576 + 2560 + 49152


def test_encoder_cost_tiny_siglip_by_hand():
    enc = laco.compress_encoder(laco.create_vision_encoder("tiny-siglip"), "laco", layer=1)
    cost = laco.encoder_cost(enc)
    embed = 2 * 64 * 32 * (3 * 8 * 8)  # 786432: patchify conv
    full_layer = 1572864  # vit_layer_flops(64, 32, 64)
    small_layer = 2 * 16 * 32 * 128 + 4 * 16 * 16 * 32 + 2 * 16 * 32 * 64 * 2  # 294912
    merge = 2 * 16 * 128 * 32 + 2 * 16 * 32 * 32 + 64 * 32  # mlp proj + shortcut pooling = 165888
    assert cost.flops == {"embed": embed, "layers[0:1]": full_layer, "merge@1": merge, "layers[1:4]": 3 * small_layer}
    assert cost.baseline_flops == embed + 4 * full_layer
    assert cost.total_flops == 3409920
    assert (cost.tokens_in, cost.tokens_out) == (64, 16)
    # parameters: merge = LN(128) + Linear(128,32) + Linear(32,32)
    assert cost.params["merge@1"] == 256 + 128 * 32 + 32 + 32 * 32 + 32
    assert cost.total_params == sum(p.numel() for p in enc.parameters())  # SigLIP without the MAP head


def test_encoder_cost_params_cover_the_model():
    enc = laco.compress_encoder(laco.create_vision_encoder("tiny-clip"), "ldpv2", layer=[1, 2])
    cost = laco.encoder_cost(enc)
    unused = sum(p.numel() for p in enc.vision_model.post_layernorm.parameters())  # CLIP: pooled output only
    assert cost.total_params == sum(p.numel() for p in enc.parameters()) - unused


def test_laco_info_cli_prints_the_flop_ratio():
    runner = CliRunner()
    res = runner.invoke(app, ["info", "--encoder", "siglip-so400m-384", "--layer", "1/4"])
    assert res.exit_code == 0, res.output
    assert "729 (27x27) -> 196 (14x14)" in res.output and "FLOP ratio 0.449" in res.output
    res = runner.invoke(app, ["info", "-e", "tiny-clip", "-l", "post", "--json"])
    data = json.loads(res.output)
    assert data["tokens_out"] == 16 and data["flop_ratio"] > 1.0  # external merge adds its own cost


def test_cli_errors_are_one_line(capsys):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "laco", "info", "--method", "nope"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("laco: error: unknown compressor 'nope'") and "Traceback" not in res.stderr


def test_laco_info_anyres_image_size():
    """--image-size WxH: OneVision tiles of one image, LLM tokens and encoder FLOPs with and without LaCo."""
    runner = CliRunner()
    res = runner.invoke(app, ["info", "-e", "siglip-so400m-384", "--image-size", "1152x768", "-l", "1/4", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)["anyres"]
    assert rep["tiles"] == [2, 3] and rep["encoder_inputs"] == 7  # 768 high, 1152 wide: 2 rows x 3 columns
    # a 1152x768 image fills its 2x3 pinpoint exactly: nothing unpadded, 54 rows of 81 + newline, base 27x27
    assert rep["without"]["tokens"] == 27 * 27 + 54 * (81 + 1)
    assert rep["with"]["tokens"] == 14 * 14 + 28 * (42 + 1)
    with torch.device("meta"):
        enc = laco.compress_encoder(laco.create_vision_encoder("siglip-so400m-384"), "laco", layer="1/4", ratio=2)
    per_input = laco.encoder_cost(enc).total_flops
    assert rep["with"]["encoder_gflops"] == pytest.approx(7 * per_input / 1e9)
    res = runner.invoke(app, ["info", "-e", "siglip-so400m-384", "--image-size", "1152x768"])
    assert "2x3 tiles + base = 7 encoder inputs" in res.output
    res = runner.invoke(app, ["info", "--image-size", "12x"])
    assert res.exit_code != 0


def test_laco_info_video_frames():
    """--frames T: OneVision's video budget (uncompressed tower, 2x2 pooling after the projector) against the
    compressed tower without and with that pooling; one newline per video; the encoder runs once per frame."""
    runner = CliRunner()
    res = runner.invoke(app, ["info", "-e", "siglip-so400m-384", "--frames", "32", "-l", "1/4", "--json"])
    assert res.exit_code == 0, res.output
    vid = json.loads(res.output)["video"]
    assert vid["onevision"]["tokens"] == 32 * 14 * 14 + 1  # ceil(27 / 2) = 14 after pooling
    assert vid["with"]["tokens"] == 32 * 14 * 14 + 1 and vid["with_pooling"]["tokens"] == 32 * 7 * 7 + 1
    with torch.device("meta"):
        enc = laco.compress_encoder(laco.create_vision_encoder("siglip-so400m-384"), "laco", layer="1/4", ratio=2)
        full = laco.compress_encoder(laco.create_vision_encoder("siglip-so400m-384"), "none")
    assert vid["with"]["encoder_gflops"] == pytest.approx(32 * laco.encoder_cost(enc).total_flops / 1e9)
    assert vid["onevision"]["encoder_gflops"] == pytest.approx(32 * laco.encoder_cost(full).total_flops / 1e9)
    res = runner.invoke(app, ["info", "--frames", "32"])
    assert "7x7 tokens per frame, LLM tokens 1569" in " ".join(res.output.split())
    assert runner.invoke(app, ["info", "--frames", "0"]).exit_code != 0
