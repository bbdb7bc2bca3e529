"""Property tests of the token-grid ops against independent formulations (torch's own ops)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from laco.ops import (
    LAYOUTS,
    channel_to_space,
    convert_layout,
    merged_grid,
    pad_grid,
    pool_tokens,
    space_to_channel,
)

grids = st.tuples(st.integers(1, 7), st.integers(1, 7))  # multiples of r are built from these
ratios = st.sampled_from([2, 3, 4])
settings.register_profile("laco", max_examples=40, deadline=None)
settings.load_profile("laco")


def tokens(b, h, w, c, seed=0):
    return torch.randn(b, h * w, c, generator=torch.Generator().manual_seed(seed))


def as_nchw(x, grid):
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


@given(grids, ratios, st.integers(1, 5))
def test_space_to_channel_matches_pixel_unshuffle_after_reordering(hw, r, c):
    h, w = hw[0] * r, hw[1] * r
    x = tokens(2, h, w, c)
    z, g = space_to_channel(x, (h, w), r)
    assert g == (hw[0], hw[1]) and z.shape == (2, hw[0] * hw[1], r * r * c)
    ref = F.pixel_unshuffle(as_nchw(x, (h, w)), r).flatten(2).transpose(1, 2)  # channel-major
    torch.testing.assert_close(convert_layout(z, r, "offset_major", "channel_major"), ref, rtol=0, atol=0)


@given(grids, ratios, st.integers(1, 5))
def test_offset_major_index_formula(hw, r, c):
    """Channel (dy*r + dx)*C + c of merged token (i, j) is input token (r*i + dy, r*j + dx), channel c."""
    h, w = hw[0] * r, hw[1] * r
    x = tokens(1, h, w, c)
    z, (mh, mw) = space_to_channel(x, (h, w), r)
    grid = x.view(h, w, c)
    i, j = mh - 1, mw - 1
    for dy in range(r):
        for dx in range(r):
            ch = (dy * r + dx) * c
            torch.testing.assert_close(z[0, i * mw + j, ch:ch + c], grid[r * i + dy, r * j + dx])


@given(grids, ratios, st.integers(1, 4))
def test_round_trips(hw, r, c):
    h, w = hw[0] * r, hw[1] * r
    x = tokens(2, h, w, c)
    z, g = space_to_channel(x, (h, w), r)
    back, full = channel_to_space(z, g, r)
    assert full == (h, w)
    torch.testing.assert_close(back, x, rtol=0, atol=0)
    # and the other way: channel_to_space then space_to_channel is the identity too
    torch.testing.assert_close(space_to_channel(*channel_to_space(z, g, r), r)[0], z, rtol=0, atol=0)


@given(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS), ratios, st.integers(1, 4))
def test_layout_conversions_round_trip(a, b, r, c):
    z = torch.randn(3, 5, r * r * c)
    torch.testing.assert_close(convert_layout(convert_layout(z, r, a, b), r, b, a), z, rtol=0, atol=0)


def test_column_major_is_swin_order():
    """timm Swin PatchMerging concatenates x0=(0,0), x1=(1,0), x2=(0,1), x3=(1,1) (dy, dx)."""
    c, h, w = 3, 4, 6
    x = tokens(1, h, w, c)
    g = x.view(1, h, w, c)
    swin = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
    z, _ = space_to_channel(x, (h, w), 2)
    torch.testing.assert_close(convert_layout(z, 2, "offset_major", "column_major"), swin.reshape(1, -1, 4 * c))


@given(grids, ratios, st.integers(1, 5))
def test_pool_tokens_equals_avg_pool2d(hw, r, c):
    h, w = hw[0] * r, hw[1] * r
    x = tokens(2, h, w, c)
    y, g = pool_tokens(x, (h, w), r)
    ref = F.avg_pool2d(as_nchw(x, (h, w)), r).flatten(2).transpose(1, 2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


@given(st.integers(1, 13), st.integers(1, 13), ratios)
def test_replicate_padding_equals_ceil_mode_average_of_real_tokens(h, w, r):
    """Replicate pad: a border block averages real tokens (with the edge row/col repeated)."""
    x = tokens(1, h, w, 2)
    y, g = pool_tokens(x, (h, w), r, pad="replicate")
    assert g == (-(-h // r), -(-w // r)) == merged_grid((h, w), r)
    ref = F.avg_pool2d(F.pad(as_nchw(x, (h, w)), (0, g[1] * r - w, 0, g[0] * r - h), mode="replicate"), r)
    torch.testing.assert_close(y, ref.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)
    # a constant image stays constant: padding never changes the features' scale
    const = torch.full((1, h * w, 2), 3.0)
    torch.testing.assert_close(pool_tokens(const, (h, w), r)[0], torch.full((1, g[0] * g[1], 2), 3.0))


@given(st.integers(2, 13), st.integers(2, 13))
def test_crop_and_zero_policies(h, w):
    x = tokens(1, h, w, 2)
    yc, gc = pool_tokens(x, (h, w), 2, pad="crop")
    assert gc == (h // 2, w // 2)
    ref = F.avg_pool2d(as_nchw(x, (h, w)), 2)  # avg_pool2d floors: same as cropping
    torch.testing.assert_close(yc, ref.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)
    yz, gz = pool_tokens(x, (h, w), 2, pad="zero")
    refz = F.avg_pool2d(F.pad(as_nchw(x, (h, w)), (0, gz[1] * 2 - w, 0, gz[0] * 2 - h)), 2)
    torch.testing.assert_close(yz, refz.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)
    padded, _ = pad_grid(x, (h, w), 2, pad="zero")
    assert torch.count_nonzero(padded) == torch.count_nonzero(x)


def test_siglip_384_grid():
    assert merged_grid((27, 27), 2) == (14, 14)
    assert merged_grid((27, 27), 2, "crop") == (13, 13)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: space_to_channel(torch.randn(1, 10, 4), (3, 3), 2), "10 tokens but grid 3x3"),
        (lambda: space_to_channel(torch.randn(1, 9, 4), (3, 3), 1), "ratio must be an integer >= 2"),
        (lambda: space_to_channel(torch.randn(1, 9, 4), (3, 3), 2, pad="error"), "not divisible by ratio 2"),
        (lambda: space_to_channel(torch.randn(1, 9, 4), (3, 3), 2, pad="mirror"), "unknown pad policy"),
        (lambda: space_to_channel(torch.randn(9, 4), (3, 3), 2), r"\(batch, tokens, channels\)"),
        (lambda: convert_layout(torch.randn(1, 2, 7), 2, "offset_major", "channel_major"), "not a multiple"),
        (lambda: convert_layout(torch.randn(1, 2, 8), 2, "offset_major", "nchw"), "unknown layout"),
    ],
)
def test_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
