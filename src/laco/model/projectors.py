"""Projectors: map vision features (width C) to the LLM's embedding width D.

A registry like the compressors': ``create_projector(name, in_dim, out_dim)``, ``list_projectors()``.

* ``"mlp2x_gelu"`` (default, LLaVA-1.5 / OneVision): Linear(C, D) -> GELU -> Linear(D, D).
  Any ``"mlp{N}x_gelu"`` gives N linear layers (N >= 1) with GELU between them.
* ``"linear"``: one Linear(C, D) (LLaVA-1.0).
* ``"identity"``: no parameters; only valid when C == D (features already in the LLM's space).
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

_PROJECTORS: dict[str, Callable[[int, int], nn.Module]] = {}
_MLP_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")


def register_projector(name: str) -> Callable:
    """Decorator: ``@register_projector("my_proj")`` on a ``(in_dim, out_dim) -> nn.Module`` factory."""

    def wrap(fn):
        if name in _PROJECTORS:
            raise ValueError(f"projector {name!r} is already registered")
        _PROJECTORS[name] = fn
        return fn

    return wrap


def _mlp(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


@register_projector("mlp2x_gelu")
def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    return _mlp(in_dim, out_dim, 2)


@register_projector("linear")
def linear(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


@register_projector("identity")
def identity(in_dim: int, out_dim: int) -> nn.Module:
    if in_dim != out_dim:
        raise ValueError(f"projector 'identity' needs vision width == LLM width, got {in_dim} != {out_dim}")
    return nn.Identity()


def list_projectors() -> list[str]:
    return sorted(_PROJECTORS) + ["mlp{N}x_gelu"]


def create_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """Build projector ``name`` mapping width ``in_dim`` (vision) to ``out_dim`` (LLM)."""
    if not isinstance(name, str):
        raise TypeError(f"projector_type must be a string, got {type(name).__name__}")
    if name in _PROJECTORS:
        return _PROJECTORS[name](in_dim, out_dim)
    match = _MLP_PATTERN.match(name)
    if match and int(match.group(1)) >= 1:
        return _mlp(in_dim, out_dim, int(match.group(1)))
    raise ValueError(f"unknown projector {name!r}; known: {', '.join(list_projectors())}")
