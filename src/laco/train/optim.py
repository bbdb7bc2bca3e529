"""The one optimiser and learning-rate schedule of every training loop in laco.

``laco train`` (``laco.train.loop``), ``laco compare`` (its stage 1/2 and retrofit steps and the read-out
scenario), the encoder pretraining of the embedded experiment and ``laco bench``'s training steps all build
their optimiser here:

* ``freeze_for_stage(model, groups)``: train exactly the named parameter groups (names:
  ``laco.model.modeling.PARAMETER_GROUPS``, from ``model.parameter_groups()``).
* ``param_groups(model, groups, lr=, group_lr=, weight_decay=)``: per group a decayed (>= 2-D) and a
  non-decayed (1-D: biases, norms) ``torch.optim`` param group, each with its group's learning rate.
* ``build_optimizer(params, lr=, ...)``: ``torch.optim.AdamW`` (the only construction site).
* ``optimizer_step(loss, optimizer, scheduler, clip_params=)``: zero, backward, clip, step, schedule.
* ``build_scheduler(optimizer, total_steps, warmup_steps=, name=)``: ``transformers.get_scheduler``
  (default ``"cosine"``: linear warmup from 0, ``lr * step / warmup``, then a half cosine to 0 at
  ``total_steps``). Call ``scheduler.step()`` after each ``optimizer.step()``.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn


def _lora_wrapped(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, BaseTuner)


def freeze_for_stage(model: nn.Module, trainable_groups: Sequence[str]) -> list[nn.Parameter]:
    """Train exactly the parameters of ``trainable_groups``; freeze every other parameter.

    Groups come from ``model.parameter_groups()`` ("compressor", "encoder", "projector", "llm").
    When the LLM carries LoRA adapters (``apply_lora``), "llm" trains only the adapters. Returns the
    trainable parameters.
    """
    if isinstance(trainable_groups, str):
        raise TypeError(f"trainable_groups must be a list of group names, got the string {trainable_groups!r}")
    groups = model.parameter_groups()
    unknown = [g for g in trainable_groups if g not in groups]
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}; the model has {list(groups)}")
    lora_ids = set()
    llm = model.get_decoder() if hasattr(model, "get_decoder") else None  # where apply_lora puts the adapters
    if llm is not None and _lora_wrapped(llm):
        lora_ids = {id(p) for n, p in llm.named_parameters() if "lora_" in n}
    for p in model.parameters():
        p.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for g in trainable_groups:
        params = groups[g]
        if g == "llm" and lora_ids:
            params = [p for p in params if id(p) in lora_ids]
        for p in params:
            p.requires_grad_(True)
        trainable += params
    if not trainable:
        raise ValueError(f"parameter groups {list(trainable_groups)} hold no parameters in this model")
    return trainable


def param_groups(model: nn.Module, groups: Sequence[str], *, lr: float, group_lr: Mapping[str, float] | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Per trained group, a decayed (>= 2-D) and a non-decayed (1-D: biases, norms) param group with the
    group's learning rate (``group_lr.get(name, lr)``); frozen parameters are left out."""
    named = model.parameter_groups()
    out = []
    for g in groups:
        params = [p for p in named[g] if p.requires_grad]
        for decay, sel in ((weight_decay, [p for p in params if p.ndim >= 2]), (0.0, [p for p in params if p.ndim < 2])):
            if sel:
                out.append({"params": sel, "lr": (group_lr or {}).get(g, lr), "weight_decay": decay, "name": g})
    return out


def build_optimizer(params: Iterable[nn.Parameter] | list[dict], *, lr: float, weight_decay: float = 0.0,
                    betas: Sequence[float] = (0.9, 0.999), fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over ``params`` (tensors, or param groups from ``param_groups``). ``fused=True``: one kernel per
    step, no parameter-sized temporaries (what ``laco bench`` times)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, *, warmup_steps: int = 0,
                    name: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """``transformers.get_scheduler(name)`` with ``warmup_steps`` of linear warmup (``"constant"`` means
    ``"constant_with_warmup"``). The multiplier at step s < warmup is s / warmup (0 at the first step)."""
    from transformers import get_scheduler

    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps} and {warmup_steps}")
    name = {"constant": "constant_with_warmup"}.get(name, name)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler=None, *,
                   clip_params: Iterable[nn.Parameter] | None = None, max_grad_norm: float = 1.0) -> None:
    """One plain update: zero the gradients, backward, clip ``clip_params`` to ``max_grad_norm`` (if given),
    step, and advance the schedule (the loops of compare and pretraining; ``laco train`` adds accumulation)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
