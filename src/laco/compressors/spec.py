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
    "<compressor>(<key>=<value>,...)@<layers>"  with compressor kwargs, e.g. "ldpv2(residual=true)@1/4",
                           "pixel_shuffle(avg_pool_init=true,proj=linear)@1/4" (values: true/false, ints,
                           floats or words; a list of methods splits on the commas outside parentheses)

Canonical names are ``none`` and ``<compressor>[(<kwargs>)]@<layers>`` with the layers as parsed (lower case,
ints as digits) and the kwargs sorted by key (``true``/``false`` for booleans). Deprecated aliases, kept
because committed results and configs use them:

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
        """The canonical name: ``none`` or ``<compressor>[(<kwargs>)]@<layers>``."""
        if self.compressor == "none":
            return "none"
        opts = f"({','.join(f'{k}={_format_value(v)}' for k, v in self.kwargs)})" if self.kwargs else ""
        return f"{self.compressor}{opts}@{format_layers(self.layers)}"

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


def _parse_value(text: str) -> bool | int | float | str:
    """A kwarg value as written: ``true``/``false`` -> bool, digits -> int, a float, else the word itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _format_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _parse_kwargs(method: str, text: str) -> tuple:
    """``"residual=true,proj=linear"`` -> sorted ``(("proj", "linear"), ("residual", True))``."""
    pairs = {}
    for item in text.split(","):
        key, eq, value = (p.strip() for p in item.partition("="))
        if not (key.isidentifier() and eq and value):
            raise ValueError(f"method {method!r}: compressor options are 'key=value' pairs joined by ',', got {item!r}")
        if key in pairs:
            raise ValueError(f"method {method!r}: option {key!r} given twice")
        pairs[key] = _parse_value(value)
    return tuple(sorted(pairs.items()))


def parse_method(text: str | MethodSpec) -> MethodSpec:
    """``"none"`` | ``"<compressor>[(<kwargs>)]@<layers>"`` | a deprecated alias -> ``MethodSpec``.

    The compressor name is checked against the registry; its kwargs are checked when it is built."""
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
    # the layer spec follows the last "@" when options are given (a layer spec never holds ")")
    comp, _, layer_text = s.rpartition("@") if ")" in s else s.partition("@")
    comp, kwargs = comp.strip(), ()
    if "(" in comp or ")" in comp:
        head, _, rest = comp.partition("(")
        if not rest.endswith(")") or "(" in rest[:-1] or ")" in rest[:-1] or not rest[:-1].strip():
            raise ValueError(f"method {text!r}: write options as '<compressor>(key=value,...)@<layer>'")
        comp, kwargs = head.strip(), _parse_kwargs(text, rest[:-1])
    if comp not in list_compressors():
        raise ValueError(f"method {text!r}: unknown compressor {comp!r}; known: {', '.join(list_compressors())}")
    if not layer_text.strip():
        raise ValueError(f"method {text!r}: empty layer spec; use e.g. 'laco@1/4', 'laco@7' or 'laco@post'")
    try:
        layer = parse_layers(layer_text)
    except ValueError as err:
        raise ValueError(f"method {text!r}: {err}") from None
    return MethodSpec(comp, tuple(layer) if isinstance(layer, list) else (layer,), kwargs)


def canonical_name(text: str) -> str:
    """The canonical name of a method as written (an alias or a canonical name)."""
    return parse_method(text).name


def split_methods(text: str) -> list[str]:
    """``"none,ldpv2(residual=true,pad=zero)@1/4"`` -> ``["none", "ldpv2(residual=true,pad=zero)@1/4"]``:
    the commas outside parentheses separate methods."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    return [*parts, "".join(cur)]


def parse_methods(text: str | Sequence[str]) -> list[MethodSpec]:
    """A comma-separated string or a list of methods; duplicates (after aliases) are an error."""
    parts = split_methods(text) if isinstance(text, str) else [str(p) for p in text]
    specs = [parse_method(p) for p in parts if p.strip()]
    if not specs:
        raise ValueError("no methods given; e.g. 'none,laco@post,laco@1/4'")
    names = [m.name for m in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"methods listed twice: {', '.join(dup)}")
    return specs
