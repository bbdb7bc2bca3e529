"""The one method/layer grammar (``laco.compressors.spec``): canonical names, aliases, errors, and agreement
with ``resolve_layer`` (the encoder's reading of a layer spec)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from laco.compressors.spec import (
    METHOD_ALIASES, MethodSpec, canonical_name, format_layers, parse_layer, parse_layers, parse_method, parse_methods,
)
from laco.encoders import resolve_layer


def test_parse_methods_canonical_names():
    specs = parse_methods("none, post, laco@1/4, pixel_shuffle@7, laco@1/4+1/2, avg_pool@POST")
    assert [s.name for s in specs] == ["none", "laco@post", "laco@1/4", "pixel_shuffle@7", "laco@1/4+1/2",
                                       "avg_pool@post"]
    assert specs[0].compression == {"method": "none"} and specs[0].layer is None
    assert specs[3].compression == {"method": "pixel_shuffle", "layer": 7}
    assert specs[4].layer == ["1/4", "1/2"]
    assert parse_methods(["laco@1/4", "none"]) == [MethodSpec("laco", ("1/4",)), MethodSpec("none")]


def test_deprecated_aliases_name_the_same_method():
    # spellings committed results files use (benchmarks/results/compare/**: ext_laco, ext_pixel_shuffle)
    assert {a: canonical_name(a) for a in METHOD_ALIASES} == {
        "post": "laco@post", "ext_laco": "laco@post", "ext_pixel_shuffle": "pixel_shuffle@post"}
    assert parse_method("ext_laco") == parse_method("laco@post") == parse_method("laco@external")
    with pytest.raises(ValueError, match="listed twice: laco@post"):
        parse_methods("ext_laco,laco@post")


@pytest.mark.parametrize("text, match", [
    ("foo@1/4", "unknown compressor 'foo'"),
    ("laco", "expected 'none' or '<compressor>@<layer>'"),
    ("laco@", "empty layer spec"),
    ("laco@1/4+", "empty part"),
    ("laco@one", "cannot parse layer 'one'"),
    ("laco@1/0", "cannot parse layer '1/0'"),
])
def test_bad_methods_name_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        parse_method(text)


def test_several_merges_are_joined_by_plus_only():
    assert parse_layers("1/4+1/2") == ["1/4", "1/2"] == parse_layers(["1/4", "1/2"])
    assert parse_layers("3") == 3 and parse_layers("Post") == "post" and parse_layers(0.25) == 0.25
    with pytest.raises(ValueError, match="joined with '\\+'"):
        parse_layers("1/4,1/2")
    with pytest.raises(TypeError):
        parse_layer(True)


@given(st.lists(st.one_of(st.integers(0, 12), st.sampled_from(["1/4", "1/2", "0.25", "post", "1/12", "3/4"])),
                min_size=1, max_size=3))
def test_format_parse_round_trip_and_resolve_agree(layers):
    """format_layers inverts parse_layers, and every parsed spec resolves to the k its raw text resolves to."""
    text = "+".join(str(x) for x in layers)
    parsed = parse_layers(text)
    assert parse_layers(format_layers(parsed)) == parsed
    items = parsed if isinstance(parsed, list) else [parsed]
    for raw, p in zip(layers, items):
        expect = 12 if raw == "post" else raw if isinstance(raw, int) else int(Fraction(raw) * 12 + Fraction(1, 2))
        assert resolve_layer(p, 12) == resolve_layer(str(raw), 12) == expect


def test_compressor_options_in_a_method_name():
    spec = parse_method("pixel_shuffle( proj=linear , avg_pool_init=TRUE )@1/4")
    assert spec.kwargs == (("avg_pool_init", True), ("proj", "linear"))
    assert spec.name == "pixel_shuffle(avg_pool_init=true,proj=linear)@1/4" == canonical_name(spec.name)
    assert spec.compression == {"method": "pixel_shuffle", "layer": "1/4",
                                "kwargs": {"avg_pool_init": True, "proj": "linear"}}
    assert parse_method("ldpv2(residual=false,depth=3,scale=0.5)@2").kwargs == (
        ("depth", 3), ("residual", False), ("scale", 0.5))
    # a list splits on the commas outside parentheses
    names = [s.name for s in parse_methods("none,ldpv2(residual=true,pad=zero)@1/4, laco@1/4")]
    assert names == ["none", "ldpv2(pad=zero,residual=true)@1/4", "laco@1/4"]
    with pytest.raises(ValueError, match="listed twice"):
        parse_methods("ldpv2(residual=true)@1/4,ldpv2( residual=True )@1/4")


@pytest.mark.parametrize("text, match", [
    ("ldpv2(residual)@1/4", "'key=value' pairs"),
    ("ldpv2(residual=true@1/4", "write options as"),
    ("ldpv2()@1/4", "write options as"),
    ("ldpv2(a=1,a=2)@1/4", "option 'a' given twice"),
    ("nope(a=1)@1/4", "unknown compressor 'nope'"),
])
def test_bad_compressor_options_name_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        parse_method(text)


def test_compressor_options_reach_the_compressor():
    """The parsed kwargs build the compressor they name (and a wrong one fails when it is built)."""
    from laco import create_compressor

    spec = parse_method("pixel_shuffle(avg_pool_init=true,proj=linear)@1/4")
    comp = create_compressor(spec.compressor, 8, **dict(spec.kwargs))
    assert comp.avg_pool_init and comp.proj_type == "linear" and not comp.residual
    with pytest.raises(TypeError):
        create_compressor("avg_pool", 8, **dict(parse_method("avg_pool(bogus=1)@1/4").kwargs))
