"""compress_encoder on real Hugging Face encoders (tiny configs built in code)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import laco
from laco.encoders import get_adapter, resolve_layer

pytestmark = pytest.mark.compat  # also runs in the oldest-transformers CI venv: each family's layers, 5.17's signatures

FAMILIES = ["tiny-siglip", "tiny-clip", "tiny-dinov2-reg"]
PREFIX = {"tiny-siglip": 0, "tiny-clip": 1, "tiny-dinov2-reg": 3}


def build(name, attn="sdpa"):
    torch.manual_seed(0)
    model = laco.create_vision_encoder(name)
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    return model.eval()


def pixels(b=2, size=64, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def avg_pool_patches(x, prefix, grid):
    """Independent reference: split prefix, F.avg_pool2d on the (C, H, W) map, re-join."""
    pre, pat = x[:, :prefix], x[:, prefix:]
    m = pat.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
    return torch.cat([pre, F.avg_pool2d(m, 2).flatten(2).transpose(1, 2)], dim=1)


def reference_forward(model, px, k):
    """The model's own modules, called by hand: embeddings -> layers[:k] -> avg pool -> layers[k:] -> norm."""
    if isinstance(model, laco.encoders.presets.SiglipVisionModel):
        x, layers, final, prefix = model.embeddings(px), model.encoder.layers, model.post_layernorm, 0
        mask = (None,)
    elif isinstance(model, laco.encoders.presets.CLIPVisionModel):
        x, layers, final, prefix = model.pre_layrnorm(model.embeddings(px)), model.encoder.layers, nn.Identity(), 1
        mask = (None,)
    else:  # DINOv2's layers take no attention mask (5.17 refuses a second positional argument)
        x, layers, final = model.embeddings(px), model.encoder.layer, model.layernorm
        prefix, mask = 1 + model.config.num_register_tokens, ()
    grid = (px.shape[-2] // model.config.patch_size, px.shape[-1] // model.config.patch_size)
    for i, layer in enumerate(layers):
        if i == k:
            x = avg_pool_patches(x, prefix, grid)
        out = layer(x, *mask)
        x = out[0] if isinstance(out, tuple) else out  # older transformers return tuples
    return final(x)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_zero_init_pml_equals_in_encoder_avg_pool(name, attn):
    model = build(name, attn)
    enc = laco.compress_encoder(model, "laco", layer=1, ratio=2)
    px = pixels()
    with torch.no_grad():
        out = enc(px)
        ref = reference_forward(model, px, 1)
    assert out.grid == (4, 4) and out.num_prefix_tokens == PREFIX[name]
    assert out.last_hidden_state.shape == (2, PREFIX[name] + 16, 32)
    torch.testing.assert_close(out.last_hidden_state, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_uncompressed_loop_reproduces_the_model(name):
    model = build(name)
    px = pixels()
    with torch.no_grad():
        ours = laco.compress_encoder(model, None)(px, output_hidden_states=True)
        theirs = model(px, output_hidden_states=True)
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sdpa_and_eager_agree_after_compression():
    px = pixels()
    outs = []
    for attn in ("sdpa", "eager"):
        enc = laco.compress_encoder(build("tiny-siglip", attn), "laco", layer=2, zero_init=False)
        torch.manual_seed(3)
        enc.compressors["2"].proj.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        outs.append(enc)
    outs[1].compressors.load_state_dict(outs[0].compressors.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(outs[0](px).last_hidden_state, outs[1](px).last_hidden_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_post_placement_compresses_the_final_features(name):
    """layer='post' == the uncompressed encoder's last_hidden_state, then the compressor (LaCo@1)."""
    model = build(name)
    enc = laco.compress_encoder(model, "laco", layer="post")
    px = pixels()
    with torch.no_grad():
        out = enc(px)
        full = model(px).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state, avg_pool_patches(full, PREFIX[name], (8, 8)), rtol=1e-5, atol=1e-5)


def test_hidden_states_have_the_lengths_of_each_stage():
    enc = laco.compress_encoder(build("tiny-clip"), "laco", layer=[1, 3])
    out = enc(pixels(), output_hidden_states=True)
    lengths = [h.shape[1] for h in out.hidden_states]
    assert lengths == [65, 65, 17, 17, 5]  # embeddings, layer1 (full), layer2-3 (8x8->4x4), layer4 (2x2), + CLS
    assert out.grid == (2, 2)


def test_odd_grid_siglip_384_shape_at_tiny_width():
    """SigLIP-so400m-384's 27x27 grid (patch 14, 384 px) -> 14x14 = 196 tokens with replicate padding."""
    model = laco.create_vision_encoder("tiny-siglip", image_size=384, patch_size=14, num_hidden_layers=4)
    enc = laco.compress_encoder(model, "laco", layer="1/4")
    out = enc(torch.randn(1, 3, 384, 384))
    assert out.grid == (14, 14) and out.last_hidden_state.shape == (1, 196, 32)
    assert enc.num_output_tokens() == 196


def test_parameters_are_shared_not_copied_and_only_compressors_are_new():
    model = build("tiny-clip")
    enc = laco.compress_encoder(model, "laco", layer=2)
    originals = {id(p) for p in model.parameters()}
    new = [n for n, p in enc.named_parameters() if id(p) not in originals]
    assert new and all(n.startswith("compressors.") for n in new)
    assert enc.vision_model.encoder.layers[0].self_attn.q_proj.weight is model.encoder.layers[0].self_attn.q_proj.weight


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_reach_every_trainable_parameter(name):
    model = laco.create_vision_encoder(name)
    enc = laco.compress_encoder(model, "laco", layer=[1, 2], zero_init=False)
    enc(pixels()).last_hidden_state.square().mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    # CLIP's post_layernorm only feeds its pooled output and DINOv2's mask token is unused without masking
    assert [n for n in missing if "post_layernorm" not in n and "mask_token" not in n] == []


@pytest.mark.parametrize(
    "spec, layers, k",
    [(0.25, 27, 7), ("1/4", 26, 7), ("1/4", 24, 6), ("1/12", 24, 2), ("1/2", 27, 14), (1.0, 12, 12), ("post", 12, 12),
     (0, 12, 0), ("3", 12, 3), (12, 12, 12)],
)
def test_resolve_layer(spec, layers, k):
    assert resolve_layer(spec, layers) == k


@pytest.mark.parametrize(
    "spec, err, match",
    [(13, ValueError, "out of range for an encoder running 12 layers"), (-1, ValueError, "out of range"),
     (1.5, ValueError, r"must be in \(0, 1\]"), ("half", ValueError, "cannot parse layer"), (True, TypeError, "layer must be")],
)
def test_resolve_layer_errors(spec, err, match):
    with pytest.raises(err, match=match):
        resolve_layer(spec, 12)


def test_feature_layer_truncates_and_skips_the_final_norm():
    model = build("tiny-siglip")
    enc = laco.compress_encoder(model, None, feature_layer=-2)
    with torch.no_grad():
        out = enc(pixels()).last_hidden_state
        ref = model(pixels(), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert enc.num_layers == 3
    assert resolve_layer("post", enc.num_layers) == 3


def test_encoder_errors():
    model = build("tiny-siglip")
    with pytest.raises(ValueError, match="unknown compressor"):
        laco.compress_encoder(model, "pml")
    with pytest.raises(ValueError, match="out of range"):
        laco.compress_encoder(model, "laco", layer=5)
    with pytest.raises(ValueError, match="same layer"):
        laco.compress_encoder(model, "laco", layer=[1, "1/4"])
    with pytest.raises(ValueError, match="outputs no grid; it must be the last merge"):
        laco.compress_encoder(model, "tome", layer=[1, 2])
    with pytest.raises(ValueError, match="feature_layer"):
        laco.compress_encoder(model, None, feature_layer=-9)
    with pytest.raises(TypeError, match="unsupported vision encoder Linear; supported: .*SiglipVisionModel"):
        laco.compress_encoder(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="smaller than the patch size"):
        laco.compress_encoder(model, "laco")(torch.randn(1, 3, 4, 4))


def test_adapter_facts():
    a = get_adapter(build("tiny-dinov2-reg"))
    assert a.num_prefix_tokens == 3 and a.mlp_dim == 64 and len(a.layers) == 4
    assert get_adapter(build("tiny-clip")).num_prefix_tokens == 1


def test_encoder_cost_counts_the_real_siglip_so400m_shape():
    with torch.device("meta"):
        enc = laco.compress_encoder(laco.create_vision_encoder("siglip-so400m-384"), "laco", layer="1/4")
    cost = laco.encoder_cost(enc)
    assert (cost.tokens_in, cost.tokens_out) == (729, 196)
    assert list(cost.flops) == ["embed", "layers[0:7]", "merge@7", "layers[7:27]"]
    assert cost.params["layers[0:7]"] + cost.params["layers[7:27]"] == 27 * cost.params["layers[0:7]"] // 7
    assert 0.40 < cost.flop_ratio < 0.50  # the METHOD.md model gives 0.4375 for a linear cost at f=1/4


@pytest.mark.slow
def test_real_siglip_so400m_forward_729_to_196():
    """The real SigLIP-so400m-patch14-384 shape (random init, ~400M params): one forward at L/4, r = 2."""
    model = laco.create_vision_encoder("siglip-so400m-384").eval()
    enc = laco.compress_encoder(model, "laco", layer="1/4", ratio=2)
    with torch.inference_mode():
        out = enc(torch.randn(1, 3, 384, 384))
    assert enc.merge_layers == [7]
    assert out.grid == (14, 14) and out.last_hidden_state.shape == (1, 196, 1152)


LAYER_SPECS = [0, "1/4", 2, "post", [1, "post"], [0, "1/2"]]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("final_norm", [None, True, False])
@pytest.mark.parametrize("layer", LAYER_SPECS, ids=str)
def test_forward_from_a_cached_state_equals_forward(name, final_norm, layer):
    """The uncompressed encoder's state after k layers (any k up to the first merge), finished by
    ``forward_from``, gives the compressed forward's output and grid (the cached-state path of compare)."""
    model = build(name)
    enc = laco.compress_encoder(model, "laco", layer=layer, ratio=2, final_norm=final_norm)
    with torch.no_grad():  # a non-zero PML, so that skipping or repeating a merge would show
        for p in enc.compressors.parameters():
            p.add_(0.1 * torch.randn_like(p))
    px = pixels()
    grid = enc.adapter.patch_grid(px)
    with torch.no_grad():
        ref = enc(px)
        states = laco.compress_encoder(model, "none").eval()(px, output_hidden_states=True).hidden_states
        for k in range(min(enc.merge_layers) + 1):
            out = enc.forward_from(states[k], grid, k)
            assert out.grid == ref.grid, k
            torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5, msg=str(k))
    seg = enc.segments()
    assert [s.merge for s in seg if s.merge is not None] == enc.merge_layers  # every merge once, in order
    assert sum(s.stop == enc.num_layers for s in seg) == 1 and seg[0].start == 0
    with pytest.raises(ValueError, match="past the merge|start must be in"):
        enc.forward_from(states[0], grid, min(enc.merge_layers) + 1)


@pytest.mark.parametrize("final_norm", [True, False])
def test_final_norm_setting_reaches_the_post_merge(final_norm):
    """``final_norm=False`` (a converted LLaVA tower) never norms, also from the state after the last layer."""
    model = build("tiny-siglip")
    enc = laco.compress_encoder(model, "avg_pool", layer="post", ratio=2, final_norm=final_norm)
    px = pixels()
    with torch.no_grad():
        last = model(px, output_hidden_states=True).hidden_states[-1]  # after the last layer, not normed
        normed = model.post_layernorm(last) if final_norm else last
        out = enc.forward_from(last, enc.adapter.patch_grid(px), enc.num_layers)
    torch.testing.assert_close(out.last_hidden_state, avg_pool_patches(normed, 0, (8, 8)))
