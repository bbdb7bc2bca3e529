"""Registry-parametrised tests: every compressor honours the uniform interface on odd, non-square grids."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import laco
from laco.compressors import CAbstractor, PatchMergeLayer, ToMe
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
    assume(not (r > min(h, w) and name == "tome"))  # ToMe cannot reach a grid coarser than its input
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


GRID_NAMES = [n for n in ALL if laco.create_compressor(n, DIM).grid_output]


def reference_avg_pool(x: torch.Tensor, grid, r: int, pad: str) -> torch.Tensor:
    """Independent r x r average pooling with the project's padding rule: F.pad then F.avg_pool2d (crop: floor)."""
    (h, w), b, c = grid, x.shape[0], x.shape[2]
    m = x.transpose(1, 2).reshape(b, c, h, w)
    if pad != "crop":
        extra = (0, -w % r, 0, -h % r)
        m = F.pad(m, extra, mode="replicate") if pad == "replicate" else F.pad(m, extra)
    return F.avg_pool2d(m, r).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("name", [n for n in GRID_NAMES if n != "avg_pool"])
@settings(max_examples=6, deadline=None)
@given(h=st.integers(3, 7), w=st.integers(3, 7), r=st.sampled_from([2, 3]), pad=st.sampled_from(["replicate", "zero", "crop"]))
def test_residual_adds_the_same_avg_pool_shortcut(name, h, w, r, pad):
    """residual=True adds exactly r x r average pooling (with the same padding) to every grid compressor."""
    torch.manual_seed(0)
    plain = laco.create_compressor(name, DIM, ratio=r, pad=pad, residual=False)
    kw = {"zero_init": False} if name in ("laco", "pixel_shuffle") else {}
    with_res = laco.create_compressor(name, DIM, ratio=r, pad=pad, residual=True, **kw)
    with_res.load_state_dict(plain.state_dict())
    x = torch.randn(2, h * w, DIM, dtype=torch.float64)
    plain, with_res = plain.double(), with_res.double()
    diff = with_res(x, (h, w))[0] - plain(x, (h, w))[0]
    torch.testing.assert_close(diff, reference_avg_pool(x, (h, w), r, pad))
    assert with_res.flops((h, w)) == plain.flops((h, w)) + h * w * DIM


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 12), r=st.sampled_from([2, 3, 4]),
       pad=st.sampled_from(["replicate", "zero", "crop"]))
def test_avg_pool_init_pixel_shuffle_is_exactly_avg_pool(h, w, c, r, pad):
    """A no-shortcut pixel shuffle started as average pooling computes F.avg_pool2d at init (odd grids padded)."""
    if pad == "crop" and min(h, w) < r:
        return
    ps = laco.create_compressor("pixel_shuffle", c, ratio=r, pad=pad, proj="linear", avg_pool_init=True).double()
    x = torch.randn(2, h * w, c, dtype=torch.float64)
    y, grid = ps(x, (h, w))
    ref = reference_avg_pool(x, (h, w), r, pad)
    assert grid == ps.output_grid((h, w)) and y.shape == ref.shape
    torch.testing.assert_close(y, ref)


def test_avg_pool_init_pixel_shuffle_is_linear_laco_reparametrised():
    """laco(proj=linear) == pixel_shuffle(proj=linear, avg_pool_init) at init and along an Adam run without decay.

    W' = W + A (A: the averaging matrix) has the same gradient as W, so the two trajectories coincide: with a
    linear projection the shortcut is only a starting point.
    """
    torch.manual_seed(0)
    pml = laco.create_compressor("laco", DIM, proj="linear").double()
    ps = laco.create_compressor("pixel_shuffle", DIM, proj="linear", avg_pool_init=True).double()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0) for m in (pml, ps)]
    x, target = torch.randn(4, 36, DIM, dtype=torch.float64), torch.randn(4, 9, DIM, dtype=torch.float64)
    for step in range(6):
        outs = [m(x, (6, 6))[0] for m in (pml, ps)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)
        for out, opt in zip(outs, opts):
            opt.zero_grad()
            (out - target).square().mean().backward()
            opt.step()
    assert not torch.allclose(outs[0], reference_avg_pool(x, (6, 6), 2, "replicate"))  # it did train


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


def reference_tokenpacker(tp, x: torch.Tensor, h: int, w: int, query_residual: bool) -> torch.Tensor:
    """TokenPacker written the original's way: bilinear /2 queries, F.unfold regions, nn.MultiheadAttention."""
    b, _, c = x.shape
    mha = torch.nn.MultiheadAttention(c, tp.num_heads, batch_first=True).to(x.dtype)
    mha.in_proj_weight.data, mha.in_proj_bias.data = tp.attn_in.weight.data, tp.attn_in.bias.data
    mha.out_proj.load_state_dict(tp.attn_out.state_dict())
    grid_map = x.transpose(1, 2).reshape(b, c, h, w)
    q = F.interpolate(grid_map, size=(h // 2, w // 2), mode="bilinear").flatten(2).transpose(1, 2)  # (B, n, C)
    q = tp.q_proj(q).reshape(-1, 1, c)  # one query per region: (B*n, 1, C)

    def regions(t):  # (B, H*W, C) -> (B*n, 4, C), the 2 x 2 block of each query
        blocks = F.unfold(t.transpose(1, 2).reshape(b, c, h, w), 2, stride=2)  # (B, C*4, n)
        return blocks.view(b, c, 4, -1).permute(0, 3, 2, 1).reshape(-1, 4, c)

    out = mha(q, regions(tp.k_proj(x)), regions(tp.v_proj(x)), need_weights=False)[0]  # (B*n, 1, C)
    out = out.reshape(b, -1, c)
    return tp.mlp(q.reshape(b, -1, c) + out if query_residual else out)


@pytest.mark.parametrize("name, dim, query_residual", [("tokenpacker", 256, False), ("tokenpacker_v1", 128, True),
                                                       ("tokenpacker", 48, False)])
def test_tokenpacker_matches_the_original_formulation(name, dim, query_residual):
    """Region-to-point attention equals nn.MultiheadAttention over each 2 x 2 region; the original outputs
    mlp(attn), v0.1's variant mlp(q + attn)."""
    tp = laco.create_compressor(name, dim).double().eval()
    assert tp.num_heads == max(1, dim // (128 if name == "tokenpacker" else 64))
    x = torch.randn(2, 6 * 4, dim, dtype=torch.float64)
    torch.testing.assert_close(tp(x, (6, 4))[0], reference_tokenpacker(tp, x, 6, 4, query_residual))


def test_tokenpacker_init_is_the_originals():
    """trunc-normal(0.02) linears with zero biases, Xavier-uniform attention in-projection, LayerNorm eps 1e-6."""
    torch.manual_seed(0)
    tp = laco.create_compressor("tokenpacker", 256)
    linears = [m for m in tp.modules() if isinstance(m, torch.nn.Linear) and m is not tp.attn_in]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 0.001 and weights.abs().max() < 0.02 * 6
    assert all(m.bias is None or not m.bias.any() for m in tp.modules() if isinstance(m, torch.nn.Linear))
    bound = (6 / (256 + 3 * 256)) ** 0.5  # xavier_uniform over the stacked (3C, C) in_proj
    assert tp.attn_in.weight.abs().max() <= bound and tp.attn_in.weight.std() > bound / 3 ** 0.5 * 0.9
    norms = [m for m in tp.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3 and all(n.eps == 1e-6 for n in norms)
    v1 = laco.create_compressor("tokenpacker_v1", 256)  # PyTorch default init: kaiming-uniform, bound 1/sqrt(C)
    assert v1.mlp[0].weight.abs().max() > 0.02 * 2 and all(n.eps == 1e-5 for n in v1.modules() if isinstance(n, torch.nn.LayerNorm))


def test_c_abstractor_block_ends_with_the_bottleneck_activation():
    """With its residual branch zeroed (timm's zero_init_last), a RegBlock is SiLU(x): the activation after the sum."""
    block = CAbstractor(DIM).stage1[0]
    torch.nn.init.zeros_(block.out[1].weight)
    torch.nn.init.zeros_(block.out[1].bias)
    x = torch.randn(2, DIM, 5, 3)
    torch.testing.assert_close(block(x), F.silu(x))
    assert block.se[1].out_channels == round(DIM / 4)


def _sources(comp, x: torch.Tensor, grid) -> list[frozenset[int]]:
    """For each output token, the input tokens it depends on (non-zero Jacobian rows)."""
    jac = torch.autograd.functional.jacobian(lambda t: comp(t, grid)[0].sum(-1), x)  # (1, m, 1, N, C)
    return [frozenset(torch.nonzero(j.abs().sum(-1)[0]).flatten().tolist()) for j in jac[0]]


def test_tome_outputs_an_unordered_set():
    """ToMe's output j is not tied to a grid position: which inputs it averages depends on the content,
    while avg_pool's output j is always block j. Hence ``grid_output`` False for ToMe alone."""
    assert [n for n in ALL if not laco.create_compressor(n, DIM).grid_output] == ["tome"]
    grid, blocks = (4, 4), [frozenset({4 * (2 * i) + 2 * j + d for d in (0, 1, 4, 5)}) for i in range(2) for j in range(2)]
    tome, pool = ToMe(DIM, 2), laco.create_compressor("avg_pool", DIM)
    torch.manual_seed(0)
    tome_sources = []
    for _ in range(3):
        x = torch.randn(1, 16, DIM, dtype=torch.float64)
        assert _sources(pool, x, grid) == blocks
        src = _sources(tome, x, grid)
        assert sorted(i for s in src for i in s) == list(range(16))  # a partition of the inputs
        tome_sources.append(src)
    assert any(src != blocks for src in tome_sources)
    assert len({tuple(src) for src in tome_sources}) > 1


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
        (dict(name="pixel_shuffle", dim=DIM, avg_pool_init=True), "proj='linear'"),
        (dict(name="laco", dim=DIM, proj="linear", avg_pool_init=True), "needs residual=False"),
        (dict(name="tokenpacker", dim=DIM, init="xavier"), "unknown init"),
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
