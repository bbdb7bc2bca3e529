"""The one grammar of methods and layer specs, used by every command (bench, compare, info, probe, convert).

A **layer spec** says where a merge goes (``laco.encoders.resolve_layer`` turns it into k, the number of
encoder layers before the merge)::

    k        int, after k layers (0 = on the patch embeddings)
    "1/4"    a fraction of the layers that run (also "0.25"; rounded half up)
    "post"   after the last layer and the final norm (external compression, the paper's LaCo@1)
    "1/4+1/2"  several merges, joined by "+" (each by the same ratio)

A **method** is a compressor at a layer spec::

    "none"                 no compression (every visual token reaches the LLM)
    "<compressor>@<layers>"  e.g. "laco@1/4", "pixel_shuffle@post", "avg_pool@7", "laco@1/4+1/2"

Canonical names are ``none`` and ``<compressor>@<layers>`` with the layers as parsed (lower case, ints as
digits). Deprecated aliases, kept because committed results and configs use them:

    "post"               -> "laco@post"            (``laco bench --methods``)
    "ext_laco"           -> "laco@post"            (``laco compare``: benchmarks/results/compare/**)
    "ext_pixel_shuffle"  -> "pixel_shuffle@post"   (idem)
    layer "external"     -> "post"
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence, Union

LayerSpec = Union[int, float, str]

#: joins the layers of several merges in one spec ("laco@1/4+1/2")
LAYER_SEP = "+"
#: deprecated method names -> canonical names
METHOD_ALIASES = {"post": "laco@post", "ext_laco": "laco@post", "ext_pixel_shuffle": "pixel_shuffle@post"}
#: deprecated layer names -> canonical
LAYER_ALIASES = {"external": "post"}


def parse_layer(text: LayerSpec) -> int | float | str:
    """One layer spec: ``"3"`` -> 3, ``"1/4"`` -> ``"1/4"``, ``"POST"``/``"external"`` -> ``"post"``.

    Ints and floats pass through (``resolve_layer`` checks their range against the encoder); a string that is
    neither an int, a fraction nor "post" is a ValueError naming it.
    """
    if isinstance(text, bool) or not isinstance(text, (int, float, Fraction, str)):
        raise TypeError(f"layer must be an int, a fraction or 'post', got {text!r}")
    if not isinstance(text, str):
        return text
    s = LAYER_ALIASES.get(text.strip().lower(), text.strip().lower())
    if s == "post":
        return s
    if s.lstrip("-").isdigit():
        return int(s)
    try:
        Fraction(s)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot parse layer {text!r}; use an int, a fraction like '1/4' or 'post'") from None
    return s


def parse_layers(text: LayerSpec | Sequence[LayerSpec]) -> LayerSpec | list[LayerSpec]:
    """One spec or several merges: ``"1/4"`` -> ``"1/4"``; ``"1/4+1/2"`` (or a list) -> ``["1/4", "1/2"]``."""
    if isinstance(text, (list, tuple)):
        parts = [parse_layer(p) for p in text]
    elif isinstance(text, str):
        if "," in text:
            raise ValueError(f"layer spec {text!r}: several merges are joined with '+', e.g. '1/4+1/2'")
        raw = [p.strip() for p in text.split(LAYER_SEP)]
        if not all(raw):
            raise ValueError(f"layer spec {text!r} has an empty part; use e.g. '1/4', '7', 'post' or '1/4+1/2'")
        parts = [parse_layer(p) for p in raw]
    else:
        return parse_layer(text)
    if not parts:
        raise ValueError("empty layer list; give at least one layer spec")
    return parts[0] if len(parts) == 1 else parts


def format_layers(layer: LayerSpec | Sequence[LayerSpec] | None) -> str:
    """The canonical text of a layer spec (inverse of ``parse_layers``): ``["1/4", 6]`` -> ``"1/4+6"``."""
    if layer is None:
        return ""
    items = layer if isinstance(layer, (list, tuple)) else [layer]
    return LAYER_SEP.join(str(parse_layer(x)) for x in items)


@dataclass(frozen=True)
class MethodSpec:
    """One configuration: ``compressor`` at ``layers`` (``compressor="none"``: uncompressed, no layers).

    ``kwargs``: extra compressor kwargs as sorted ``(key, value)`` pairs (hashable).
    """

    compressor: str
    layers: tuple[int | float | str, ...] = ()
    kwargs: tuple = ()

    @property
    def name(self) -> str:
        """The canonical name: ``none`` or ``<compressor>@<layers>``."""
        return "none" if self.compressor == "none" else f"{self.compressor}@{format_layers(self.layers)}"

    @property
    def layer(self) -> LayerSpec | list[LayerSpec] | None:
        """The layer spec ``compress_encoder`` takes: one spec, a list, or None (uncompressed)."""
        if not self.layers:
            return None
        return self.layers[0] if len(self.layers) == 1 else list(self.layers)

    @property
    def compression(self) -> dict[str, Any]:
        """The ``compression`` dict of ``LaCoConfig`` without the ratio (the caller adds it)."""
        if self.compressor == "none":
            return {"method": "none"}
        return {"method": self.compressor, "layer": self.layer, **({"kwargs": dict(self.kwargs)} if self.kwargs else {})}


def parse_method(text: str | MethodSpec) -> MethodSpec:
    """``"none"`` | ``"<compressor>@<layers>"`` | a deprecated alias -> ``MethodSpec`` (compressor checked)."""
    from laco.compressors import list_compressors

    if isinstance(text, MethodSpec):
        return text
    if not isinstance(text, str):
        raise TypeError(f"method must be a string like 'laco@1/4', got {type(text).__name__}")
    s = text.strip()
    s = METHOD_ALIASES.get(s.lower(), s)
    if s.lower() == "none":
        return MethodSpec("none")
    if "@" not in s:
        raise ValueError(f"method {text!r}: expected 'none' or '<compressor>@<layer>' such as 'laco@1/4'")
    comp, _, layer_text = s.partition("@")
    comp = comp.strip()
    if comp not in list_compressors():
        raise ValueError(f"method {text!r}: unknown compressor {comp!r}; known: {', '.join(list_compressors())}")
    if not layer_text.strip():
        raise ValueError(f"method {text!r}: empty layer spec; use e.g. 'laco@1/4', 'laco@7' or 'laco@post'")
    try:
        layer = parse_layers(layer_text)
    except ValueError as err:
        raise ValueError(f"method {text!r}: {err}") from None
    return MethodSpec(comp, tuple(layer) if isinstance(layer, list) else (layer,))


def canonical_name(text: str) -> str:
    """The canonical name of a method as written (an alias or a canonical name)."""
    return parse_method(text).name


def parse_methods(text: str | Sequence[str]) -> list[MethodSpec]:
    """A comma-separated string or a list of methods; duplicates (after aliases) are an error."""
    parts = text.split(",") if isinstance(text, str) else [str(p) for p in text]
    specs = [parse_method(p) for p in parts if p.strip()]
    if not specs:
        raise ValueError("no methods given; e.g. 'none,laco@post,laco@1/4'")
    names = [m.name for m in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"methods listed twice: {', '.join(dup)}")
    return specs
