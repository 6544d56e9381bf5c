"""EDM pieces (Karras et al. 2022), each a small function: preconditioning, loss weight, losses and
the Euler step. Nothing here knows about blocks or architectures."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preconditioning:
    c_in: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_noise: torch.Tensor


def per_example(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example sigma (N,) so it broadcasts over a tensor shaped (N, ...)."""
    return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def preconditioning(sigma: torch.Tensor, sigma_data: float = 0.5) -> Preconditioning:
    s2, sd2 = sigma**2, sigma_data**2
    return Preconditioning(
        c_in=1.0 / torch.sqrt(s2 + sd2),
        c_skip=sd2 / (s2 + sd2),
        c_out=sigma * sigma_data / torch.sqrt(s2 + sd2),
        c_noise=torch.log(sigma) / 4.0,
    )


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5, max_weight: float | None = None) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2; spans ~1e5 over [0.002, 80], hence the optional clamp."""
    w = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return w if max_weight is None else w.clamp(max=max_weight)


def add_noise(y: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z_sigma = y + sigma * eps."""
    device = y.device if generator is None else generator.device
    return noisy(y, sigma, torch.randn(y.shape, generator=generator, dtype=y.dtype, device=device))


def noisy(y: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z_sigma = y + sigma * eps for a given draw eps (on any device)."""
    return y + per_example(sigma, y) * eps.to(device=y.device, dtype=y.dtype)


def skip_combine(z: torch.Tensor, raw: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """D = c_skip * z + c_out * F: the preconditioned denoiser output for a continuous target."""
    p = preconditioning(sigma, sigma_data)
    return per_example(p.c_skip, z) * z + per_example(p.c_out, z) * raw


def weighted_l2(denoised: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """E[w(sigma) * ||D - y||^2], mean over elements of each example, then over the batch."""
    per_item = ((denoised - target) ** 2).flatten(1).mean(1)
    return (weight * per_item).mean()


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """E[w(sigma) * CE(logits, y)] for discrete targets read out through logits."""
    per_item = F.cross_entropy(logits, labels, reduction="none")
    return (weight * per_item).mean()


def euler_step(z: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One probability-flow ODE step from sigma to sigma_next (< sigma).

    dz/dsigma = (z - D) / sigma, so z <- z + (sigma_next - sigma) * (z - D) / sigma, which moves z toward D
    (docs/method.md §2; the paper's printed equations have this sign flipped)."""
    return z + (sigma_next - sigma) * (z - denoised) / sigma
