"""The one optimiser/schedule builder (``laco.train.optim``): per-group learning rates and weight decay, and
the warmup + cosine schedule against its closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from laco.train.optim import build_optimizer, build_scheduler, freeze_for_stage, optimizer_step, param_groups


class TwoGroups(nn.Module):
    """A stand-in with the MLLM's ``parameter_groups()`` interface."""

    def __init__(self):
        super().__init__()
        self.compressor, self.projector, self.llm = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)

    def parameter_groups(self):
        return {"compressor": list(self.compressor.parameters()), "projector": list(self.projector.parameters()),
                "llm": list(self.llm.parameters())}


def test_param_groups_split_decay_and_take_per_group_lr():
    m = TwoGroups()
    freeze_for_stage(m, ["compressor", "projector"])
    groups = param_groups(m, ["compressor", "projector"], lr=1e-3, group_lr={"projector": 5e-4}, weight_decay=0.1)
    got = [(g["name"], g["lr"], g["weight_decay"], [tuple(p.shape) for p in g["params"]]) for g in groups]
    assert got == [("compressor", 1e-3, 0.1, [(4, 4)]), ("compressor", 1e-3, 0.0, [(4,)]),
                   ("projector", 5e-4, 0.0, [(4,), (4,)])]  # LayerNorm: 1-D only, never decayed
    assert not any(p.requires_grad for p in m.llm.parameters())
    opt = build_optimizer(groups, lr=1.0)
    assert isinstance(opt, torch.optim.AdamW) and [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 5e-4]


@pytest.mark.parametrize("total, warmup", [(10, 3), (7, 1), (5, 0), (4, 4)])
def test_cosine_schedule_is_linear_warmup_then_half_cosine(total, warmup):
    p = nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], lr=2.0)
    sched = build_scheduler(opt, total, warmup_steps=warmup)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    def expect(s):  # the closed form, written independently of transformers
        if s < warmup:
            return 2.0 * s / warmup
        return 2.0 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))

    assert seen == pytest.approx([expect(s) for s in range(total)])
    with pytest.raises(ValueError, match="total_steps >= 1"):
        build_scheduler(opt, 0)


def test_optimizer_step_clips_steps_and_schedules():
    p = nn.Parameter(torch.zeros(3))
    opt = build_optimizer([p], lr=0.1)
    sched = build_scheduler(opt, 4, warmup_steps=0, name="linear")
    loss = (p * torch.tensor([300.0, 400.0, 0.0])).sum()  # gradient norm 500
    optimizer_step(loss, opt, sched, clip_params=[p], max_grad_norm=1.0)
    assert p.grad.norm().item() == pytest.approx(1.0) and p.abs().sum() > 0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 3 / 4)  # linear decay advanced one step
