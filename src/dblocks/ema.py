"""Exponential moving average of a model's weights, with EDM's warm-up of the averaging horizon.

``train.ema_decay`` d is the per-step decay at full length (DiT and MD4: 0.9999), i.e. a half-life of
ln(1/2) / ln(d) optimizer steps (0.9999: 6931 steps). A fixed decay would let the initial random weights
dominate a short run (after 1,000 steps they still weigh 0.9999^1000 = 0.90), so, as NVlabs/edm does with
``ema_rampup``, the half-life is capped at ``train.ema_rampup`` x the steps done so far: the average forgets
its start at a rate that keeps pace with training, and the cap stops mattering once the run is
long (d = 0.9999, ramp-up 0.05: after 139k steps). The first update copies the weights (a half-life of
0 steps), again as in EDM. ``train.ema_rampup: null`` keeps the decay fixed from the first step.

The average is kept in float32 (the master weights' precision under bf16 autocast) for every floating
tensor of the model's ``state_dict``; integer buffers are copied. Its tensors are part of the resumable
training state, so an interrupted job resumes with the exact average it had."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def half_life(decay: float) -> float:
    """Steps after which a weight's influence on the average has halved, at decay ``decay``."""
    return math.log(0.5) / math.log(decay)


def beta(decay: float, rampup: float | None, done: int) -> float:
    """The decay of the update that follows ``done`` optimizer steps (EDM's schedule in steps, not images)."""
    horizon = half_life(decay)
    if rampup is not None:
        horizon = min(horizon, done * rampup)
    return 0.5 ** (1.0 / max(horizon, 1e-8))


class EMA:
    """The average of ``module``'s weights; :meth:`update` after each optimizer step."""

    def __init__(self, module: nn.Module, decay: float, rampup: float | None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay}: allowed: 0 < decay < 1 (0 turns the average off)")
        self.decay, self.rampup = decay, rampup
        self.tensors = {
            name: t.detach().to(torch.float32 if t.is_floating_point() else t.dtype, copy=True)
            for name, t in module.state_dict().items()
        }

    @torch.no_grad()
    def update(self, module: nn.Module, done: int) -> None:
        """Fold in the weights after optimizer step ``done + 1`` (``done`` steps were taken before it)."""
        b = beta(self.decay, self.rampup, done)
        for name, value in module.state_dict().items():
            avg = self.tensors[name]
            if avg.is_floating_point():
                avg.lerp_(value.detach().to(avg.dtype), 1.0 - b)
            else:
                avg.copy_(value)

    def averaged(self, module: nn.Module) -> nn.Module:
        """A copy of ``module`` holding the averaged weights (``module`` itself is left as trained)."""
        out = copy.deepcopy(module)
        out.load_state_dict({name: t.to(module.state_dict()[name].dtype) for name, t in self.tensors.items()})
        return out
