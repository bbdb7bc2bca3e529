"""A model saved by laco 0.1.0 (``tests/fixtures/laco_layout_v0``, state-dict layout ``vision_tower.*``,
``projector.*``, ``language_model.{model,lm_head}.*``, ``image_newline``) still loads, every weight in place,
and generates the tokens it generated when it was saved. Guards any change of the state-dict layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.compat  # also runs in the oldest-transformers CI venv

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "laco_layout_v0"


def test_layout_v0_checkpoint_loads_and_generates_the_recorded_tokens():
    import laco.model  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageTextToText

    expected = json.loads((FIXTURE / "expected.json").read_text())
    model, info = AutoModelForImageTextToText.from_pretrained(FIXTURE, output_loading_info=True)
    model.eval()
    assert {k: v for k, v in info.items() if v} == {}  # no missing / unexpected / mismatched key
    ids = torch.tensor([expected["input_ids"]])
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             max_new_tokens=len(expected["generated"]), do_sample=False)
        logits = model(input_ids=ids, pixel_values=pixels).logits[0, -1, :8]
    assert out[0, ids.shape[1]:].tolist() == expected["generated"]
    torch.testing.assert_close(logits, torch.tensor(expected["last_logits_first8"]), rtol=1e-4, atol=1e-5)
