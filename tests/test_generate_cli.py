"""``laco generate`` on a tiny saved model (end-to-end smoke test, no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from laco.cli import app
from laco.model.testing import save_tiny_mllm



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mllm")
    save_tiny_mllm(path, seed=3)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(path / "x.png")
    return path


def test_generate_streams_the_greedy_answer(model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from laco.cli.generate import build_prompt

    result = CliRunner().invoke(app, ["generate", str(model_dir), "--image", str(model_dir / "x.png"),
                                      "--prompt", "What is in the image?", "-n", "5"])
    assert result.exit_code == 0, result.output
    # the same greedy decode through the Python API
    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    text = build_prompt(proc, "What is in the image?", 1, use_chat_template=True)
    assert text.startswith("<|im_start|>user\n<image>\nWhat is in the image?")
    inputs = proc(text=[text], images=[Image.open(model_dir / "x.png").convert("RGB")])
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=proc.tokenizer.eos_token_id,
                         pad_token_id=proc.tokenizer.pad_token_id)
    expected = proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert result.stdout.strip() == expected.strip()


def test_generate_errors(model_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["generate", str(model_dir), "--image", str(tmp_path / "missing.png"), "-p", "hi"])
    assert isinstance(res.exception, FileNotFoundError) and "missing.png" in str(res.exception)
    res = runner.invoke(app, ["generate", str(tmp_path), "-p", "hi"])
    assert isinstance(res.exception, FileNotFoundError) and "config.json" in str(res.exception)
    res = runner.invoke(app, ["generate", str(model_dir), "--image", str(model_dir / "x.png"),
                              "-p", "<image> and <image>?"])
    assert isinstance(res.exception, ValueError) and "2 <image> placeholder" in str(res.exception)
