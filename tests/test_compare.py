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


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


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
