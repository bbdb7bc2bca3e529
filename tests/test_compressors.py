"""Registry-parametrised tests: every compressor honours the uniform interface on odd, non-square grids."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import laco
from laco.compressors import PatchMergeLayer, ToMe
from laco.compressors.attention import _bipartite_merge
from laco.ops import pool_tokens

DIM = 16
ALL = laco.list_compressors()


def test_registry_lists_the_issue_methods():
    assert {"laco", "pixel_shuffle", "avg_pool", "ldpv2", "tokenpacker", "c_abstractor", "tome"} <= set(ALL)


def test_unknown_compressor_lists_known_ones():
    with pytest.raises(ValueError, match="unknown compressor 'nope'; known: .*laco.*tome"):
        laco.create_compressor("nope", DIM)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=8, deadline=None)
@given(h=st.integers(2, 9), w=st.integers(2, 9), r=st.sampled_from([2, 3]))
def test_token_count_and_grid(name, h, w, r):
    if r > min(h, w) and name == "tome":
        return
    comp = laco.create_compressor(name, DIM, ratio=r)
    x = torch.randn(2, h * w, DIM)
    y, grid = comp(x, (h, w))
    expected = (-(-h // r), -(-w // r))  # replicate padding by default: ceil
    assert grid == expected == comp.output_grid((h, w))
    assert y.shape == (2, expected[0] * expected[1], DIM) == (2, comp.num_tokens((h, w)), DIM)
    assert torch.isfinite(y).all()
    assert comp.flops((h, w)) > 0


@pytest.mark.parametrize("name", [n for n in ALL if n != "tome"])
def test_crop_policy_floors_the_grid(name):
    comp = laco.create_compressor(name, DIM, pad="crop")
    y, grid = comp(torch.randn(1, 27 * 27, DIM), (27, 27))
    assert grid == (13, 13) and y.shape[1] == 169


@pytest.mark.parametrize("name", ALL)
def test_batch_independence(name):
    """Each sample is compressed on its own: no mixing across the batch axis."""
    comp = laco.create_compressor(name, DIM).eval()
    x = torch.randn(3, 36, DIM)
    y, _ = comp(x, (6, 6))
    y1, _ = comp(x[1:2], (6, 6))
    torch.testing.assert_close(y[1:2], y1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in ALL if laco.create_compressor(n, DIM).grid_output and n != "avg_pool"])
def test_residual_adds_the_avg_pool_shortcut(name):
    torch.manual_seed(0)
    plain = laco.create_compressor(name, DIM, residual=False)
    torch.manual_seed(0)
    with_res = laco.create_compressor(name, DIM, residual=True, **({"zero_init": False} if name in ("laco", "pixel_shuffle") else {}))
    with_res.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7 * 5, DIM)
    diff = with_res(x, (7, 5))[0] - plain(x, (7, 5))[0]
    torch.testing.assert_close(diff, pool_tokens(x, (7, 5), 2)[0], rtol=1e-4, atol=1e-5)


def test_zero_init_pml_is_exactly_avg_pool():
    x = torch.randn(2, 8 * 6, DIM)
    for proj in ("mlp", "linear"):
        y, grid = PatchMergeLayer(DIM, 2, proj=proj)(x, (8, 6))
        ref = F.avg_pool2d(x.transpose(1, 2).reshape(2, DIM, 8, 6), 2).flatten(2).transpose(1, 2)
        assert grid == (4, 3)
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)


def test_pml_is_pixel_shuffle_plus_shortcut():
    """laco and pixel_shuffle share the projection; they differ by exactly the average pool."""
    ps = laco.create_compressor("pixel_shuffle", DIM)
    pml = PatchMergeLayer(DIM, 2, zero_init=False)
    pml.load_state_dict(ps.state_dict())
    x = torch.randn(2, 16, DIM)
    torch.testing.assert_close(pml(x, (4, 4))[0] - ps(x, (4, 4))[0], pool_tokens(x, (4, 4))[0], rtol=1e-4, atol=1e-5)


def test_pml_param_counts_match_the_formula():
    c, r = 64, 2
    lin = PatchMergeLayer(c, r, proj="linear")
    assert sum(p.numel() for p in lin.parameters()) == r * r * c * c + c
    mlp = PatchMergeLayer(c, r, proj="mlp")
    assert sum(p.numel() for p in mlp.parameters()) == 2 * r * r * c + (r * r * c * c + c) + (c * c + c)


def test_tome_round_merges_identical_pairs_exactly():
    """A/B pairs of identical tokens (even i == odd i) are each other's best match and merge exactly."""
    base = torch.randn(1, 8, DIM)
    x = base.repeat_interleave(2, dim=1)  # (1, 16, C): tokens 2i and 2i+1 equal
    sums, size = _bipartite_merge(x, torch.ones(1, 16, 1), 8)
    assert sums.shape == (1, 8, DIM)
    torch.testing.assert_close(size, torch.full((1, 8, 1), 2.0))
    torch.testing.assert_close(sums / size, base, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(4, 40), frac=st.floats(0.05, 0.5))
def test_tome_round_is_a_partition(n, frac):
    """Merging conserves the total size and the size-weighted sum: every input lands in exactly one output."""
    x = torch.randn(2, n, DIM, dtype=torch.float64)
    r = max(1, int(n // 2 * frac))
    sums, size = _bipartite_merge(x, torch.ones(2, n, 1, dtype=torch.float64), r)
    assert sums.shape == (2, n - r, DIM)
    torch.testing.assert_close(size.sum(1), torch.full((2, 1), float(n), dtype=torch.float64))
    torch.testing.assert_close(sums.sum(1), x.sum(1))


def test_tome_reaches_the_same_budget_as_a_2x2_merge():
    y, grid = ToMe(DIM, 2)(torch.randn(2, 27 * 27, DIM), (27, 27))
    assert grid == (14, 14) and y.shape == (2, 196, DIM)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="laco", dim=DIM, ratio=1), "ratio must be an integer >= 2"),
        (dict(name="laco", dim=0), "dim must be a positive integer"),
        (dict(name="tome", dim=DIM, residual=True), "does not output a grid"),
        (dict(name="avg_pool", dim=DIM, residual=True), "shortcut itself"),
        (dict(name="pixel_shuffle", dim=DIM, zero_init=True), "zero_init without the shortcut"),
        (dict(name="laco", dim=DIM, proj="conv"), "unknown projection"),
        (dict(name="laco", dim=DIM, pad="mirror"), "unknown pad policy"),
    ],
)
def test_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        laco.create_compressor(**kwargs)


def test_wrong_width_and_grid_errors():
    comp = laco.create_compressor("laco", DIM)
    with pytest.raises(ValueError, match="width 8 but this module was built for width 16"):
        comp(torch.randn(1, 16, 8), (4, 4))
    with pytest.raises(ValueError, match="17 tokens but grid 4x4 needs 16"):
        comp(torch.randn(1, 17, DIM), (4, 4))


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name):
    comp = laco.create_compressor(name, DIM, **({"zero_init": False} if name == "laco" else {}))
    x = torch.randn(2, 36, DIM, requires_grad=True)
    comp(x, (6, 6))[0].square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for n, p in comp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
