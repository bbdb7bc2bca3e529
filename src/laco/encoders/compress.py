"""``compress_encoder``: run a vision encoder with compressors between (or after) its layers.

    pixels -> embed -> layers[:k] -> split prefix -> compressor(x, grid) -> join prefix -> layers[k:]
           -> final norm -> (post compressor) -> features

The wrapper owns this loop (no monkey-patching): it calls the original encoder's modules, so
parameters are shared with the model it wraps and only the compressors' are new.

Where a merge goes (``layer``), with L = the number of layers that run (see ``feature_layer``):

* ``int k`` in 0..L: after k layers. ``0`` merges the patch embeddings before the first layer
  (the reviewers' "pixel level" question); ``L`` is the same as ``"post"``.
* a fraction ``f`` in (0, 1] (float like ``0.25`` or string like ``"1/4"``): ``k = floor(f*L + 1/2)``,
  i.e. rounded half up -- SigLIP-so400m's 27 layers at 1/4 give k = 7 (6.75), 26 layers give 7 (6.5).
* ``"post"``: after the last layer and the encoder's final norm, on exactly the features a
  post-encoder compressor would see (the paper's LaCo@1, "external compression").
* a list of the above: several merges (each by ``ratio``), e.g. ``[0.25, 0.5]``.

``feature_layer`` follows Hugging Face LLaVA: ``-1`` uses the encoder's own ``last_hidden_state``
(final norm applied); ``-2`` stops after the penultimate layer and applies no final norm (the
layers after the feature layer are never run).

``final_norm`` overrides whether the final norm is applied (default ``None``: only at ``-1``).
Hugging Face LLaVA reads ``hidden_states[vision_feature_layer]``, which is never normed, so a
LLaVA(-OneVision) SigLIP tower with ``vision_feature_layer=-1`` is ``feature_layer=-1, final_norm=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from laco.compressors import Compressor, create_compressor
from laco.compressors.spec import LayerSpec, parse_layer, parse_layers
from laco.encoders.adapters import EncoderAdapter, get_adapter
from laco.ops import Grid, join_prefix, split_prefix


class Segment(NamedTuple):
    """``layers[start:stop]`` of the encoder, then the merge after ``stop`` layers (None: no merge)."""

    start: int
    stop: int
    merge: int | None


@dataclass
class CompressedEncoderOutput(BaseModelOutput):
    """``BaseModelOutput`` plus the patch ``grid`` of ``last_hidden_state`` and the prefix-token count.

    ``last_hidden_state``: (B, P + h*w, C). ``hidden_states`` (if asked): the embeddings and the output
    of every layer that ran, each at its own length (before a merge: full; after: compressed).
    """

    grid: tuple[int, int] | None = None
    num_prefix_tokens: int | None = None


def resolve_layer(spec: LayerSpec, num_layers: int) -> int:
    """Turn one layer spec (int, fraction, "a/b", "post"; grammar in ``laco.compressors.spec``) into the number
    of layers before the merge."""
    if isinstance(spec, bool):
        raise TypeError(f"layer must be an int, a fraction or 'post', got {spec!r}")
    if isinstance(spec, str):
        spec = parse_layer(spec)
        if spec == "post":
            return num_layers
        if isinstance(spec, str):
            spec = Fraction(spec)
    if isinstance(spec, int):
        if not 0 <= spec <= num_layers:
            raise ValueError(f"layer {spec} is out of range for an encoder running {num_layers} layers (0..{num_layers})")
        return spec
    if isinstance(spec, (float, Fraction)):
        if not 0 < spec <= 1:
            raise ValueError(f"fractional layer {spec} must be in (0, 1]")
        return int(Fraction(spec).limit_denominator(1000) * num_layers + Fraction(1, 2))
    raise TypeError(f"layer must be an int, a fraction or 'post', got {type(spec).__name__}")


class CompressedVisionEncoder(nn.Module):
    """A vision encoder with compressors at given depths. Build it with ``compress_encoder``."""

    def __init__(
        self, vision_model: nn.Module, stages: dict[int, Compressor], *, feature_layer: int = -1,
        final_norm: bool | None = None,
    ):
        super().__init__()
        self.vision_model = vision_model  # registered: parameters are the original tensors
        self.adapter: EncoderAdapter = get_adapter(vision_model)
        total = len(self.adapter.layers)
        if not -total <= feature_layer <= -1:
            raise ValueError(f"feature_layer must be in -{total}..-1, got {feature_layer}")
        self.feature_layer = feature_layer
        self.apply_final_norm = feature_layer == -1 if final_norm is None else bool(final_norm)
        self.num_layers = total + feature_layer + 1  # layers that run
        for k, comp in stages.items():
            if not 0 <= k <= self.num_layers:
                raise ValueError(f"merge after layer {k} is out of range 0..{self.num_layers}")
            if comp.dim != self.adapter.dim:
                raise ValueError(f"compressor width {comp.dim} != encoder width {self.adapter.dim}")
        order = sorted(stages)
        for k in order[:-1]:
            if not stages[k].grid_output:
                raise ValueError(f"{type(stages[k]).__name__} at layer {k} outputs no grid; it must be the last merge")
        self.compressors = nn.ModuleDict({str(k): stages[k] for k in order})

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def merge_layers(self) -> list[int]:
        return [int(k) for k in self.compressors]

    @property
    def num_prefix_tokens(self) -> int:
        return self.adapter.num_prefix_tokens

    @property
    def hidden_size(self) -> int:
        return self.adapter.dim

    def output_grid(self, grid: Grid | None = None) -> Grid:
        """Patch grid of the output for an input patch grid (default: the config's image size)."""
        grid = tuple(grid) if grid is not None else self.adapter.grid_for_image_size()
        for comp in self.compressors.values():
            grid = comp.output_grid(grid)
        return grid

    def num_output_tokens(self, grid: Grid | None = None, *, include_prefix: bool = False) -> int:
        h, w = self.output_grid(grid)
        return h * w + (self.num_prefix_tokens if include_prefix else 0)

    # -- the layer loop ---------------------------------------------------------------------------
    def segments(self) -> list[Segment]:
        """The loop as data: runs of layers between merges, in order (the FLOP counters walk the same list).

        ``Segment(start, stop, merge)``: ``layers[start:stop]``, then the merge at ``stop`` (``merge=None``:
        none). Exactly one segment has ``stop == num_layers``: the final norm follows its layers, before
        its merge (a "post" merge sees normed features).
        """
        out, start = [], 0
        for k in self.merge_layers:
            out.append(Segment(start, k, k))
            start = k
        if not out or out[-1].stop < self.num_layers:
            out.append(Segment(start, self.num_layers, None))
        return out

    def _merge(self, k: int, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        prefix, patches = split_prefix(x, self.num_prefix_tokens)
        patches, grid = self.compressors[str(k)](patches, grid)
        return join_prefix(prefix, patches), grid

    def forward_from(
        self, hidden: torch.Tensor, grid: Grid, start: int = 0, *, output_hidden_states: bool = False
    ) -> CompressedEncoderOutput:
        """Finish the forward from the uncompressed state after ``start`` layers.

        ``hidden``: (B, P + H*W, C), what ``forward(..., output_hidden_states=True).hidden_states[start]`` of the
        uncompressed encoder holds (before the merge at ``start``, if any); ``grid``: its (H, W).
        ``start=0`` with the embeddings is the whole forward. Used with cached states when the layers
        before the first merge are frozen (``LaCoForConditionalGeneration.get_image_features(encoder_state=...)``).
        """
        if not 0 <= start <= self.num_layers:
            raise ValueError(f"start must be in 0..{self.num_layers} (layers run), got {start}")
        if any(start > k for k in self.merge_layers):
            raise ValueError(f"start {start} is past the merge at layer {min(self.merge_layers)}: "
                             "the cached state would skip a compressor")
        a, x, grid = self.adapter, hidden, tuple(grid)
        states = [x] if output_hidden_states else None
        for seg in self.segments():
            for i in range(max(seg.start, start), seg.stop):
                x = a.call_layer(a.layers[i], x)
                if states is not None:
                    states.append(x)
            if seg.stop == self.num_layers and self.apply_final_norm:
                x = a.final_norm(x)
            if seg.merge is not None and seg.merge >= start:
                x, grid = self._merge(seg.merge, x, grid)  # (B, P + h*w, C)
        return CompressedEncoderOutput(
            last_hidden_state=x,
            hidden_states=tuple(states) if states is not None else None,
            grid=grid,
            num_prefix_tokens=self.num_prefix_tokens,
        )

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, interpolate_pos_encoding: bool = False
    ) -> CompressedEncoderOutput:
        a = self.adapter
        grid = a.patch_grid(pixel_values)  # checks the size first
        x = a.embed(pixel_values, interpolate_pos_encoding)  # (B, P + H*W, C)
        return self.forward_from(x, grid, 0, output_hidden_states=output_hidden_states)


def compress_encoder(
    vision_model: nn.Module,
    method: str | None = "laco",
    layer: LayerSpec | Sequence[LayerSpec] = 0.25,
    ratio: int = 2,
    *,
    feature_layer: int = -1,
    final_norm: bool | None = None,
    **kwargs,
) -> CompressedVisionEncoder:
    """Wrap ``vision_model`` so that ``method`` merges r x r tokens after ``layer`` (see module doc).

    ``method=None`` or ``"none"`` gives the uncompressed encoder through the same loop.
    Extra ``kwargs`` go to the compressor (e.g. ``proj="linear"``, ``residual=True``, ``pad="crop"``).
    """
    adapter = get_adapter(vision_model)
    n_run = len(adapter.layers) + feature_layer + 1
    stages: dict[int, Compressor] = {}
    if method not in (None, "none"):
        if isinstance(layer, (list, tuple)) and not layer:
            raise ValueError("layer list is empty")
        specs = parse_layers(layer) if isinstance(layer, (str, list, tuple)) else layer  # "1/4+1/2" -> a list
        specs = specs if isinstance(specs, list) else [specs]
        for spec in specs:
            k = resolve_layer(spec, n_run)
            if k in stages:
                raise ValueError(f"two merges resolve to the same layer {k} (from {specs})")
            stages[k] = create_compressor(method, adapter.dim, ratio, **kwargs)
    ref = next(adapter.model.parameters(), None)
    if ref is not None:
        for comp in stages.values():
            comp.to(device=ref.device, dtype=ref.dtype)
    return CompressedVisionEncoder(vision_model, stages, feature_layer=feature_layer, final_norm=final_norm)
