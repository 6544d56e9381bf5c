"""Noise levels: the truncated log-normal training distribution, its partition into B blocks,
overlap widening, per-block sigma sampling and routing of a sigma to the block that owns it.

Conventions (docs/method.md §3):
* boundaries are kept in ascending order, ``boundaries[0] = sigma_min``, ``boundaries[B] = sigma_max``;
* blocks are numbered 1..B from the highest noise down: block 1 owns the top interval and holds the
  first layers of the stack, block B owns the interval that ends at sigma_min;
* a block owns the half-open interval ``(low, high]`` (block B also owns sigma_min itself), so that a
  sampler evaluating at the upper boundaries runs each block exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


PARTITION_KINDS = ("equiprobable", "uniform")
_STD_NORMAL = NormalDist()


def uniform_draws(n: int, generator: torch.Generator | None = None, stratified: bool = False) -> torch.Tensor:
    """n float64 draws in [0, 1): independent, or ``stratified``: one in each of the n equal strata, all
    shifted by one common draw, u_i = (u_0 + i/n) mod 1 (``train.time_sampling``; MD4's antithetic time
    sampling, MDLM's low-discrepancy sampler). Each u_i is still uniform, so the loss stays unbiased, while a
    batch covers the noise range evenly: the masked LM's 1/t-weighted loss no longer swings with how many
    small times a batch happened to draw."""
    import torch  # here, not at the top: params validation (config, the Snakefile) imports this module

    if not stratified:
        return torch.rand(n, generator=generator, dtype=torch.float64)
    offset = torch.rand(1, generator=generator, dtype=torch.float64)
    return torch.remainder(offset + torch.arange(n, dtype=torch.float64) / n, 1.0)


@dataclass(frozen=True)
class NoiseDistribution:
    """log(sigma) ~ Normal(p_mean, p_std), truncated to [sigma_min, sigma_max] (EDM defaults)."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {self.p_std}")

    def cdf(self, sigma: float) -> float:
        """Untruncated log-normal CDF, the quantile coordinate used for partitioning."""
        return _STD_NORMAL.cdf((math.log(sigma) - self.p_mean) / self.p_std)

    def quantile(self, q: float) -> float:
        return math.exp(self.p_mean + self.p_std * _STD_NORMAL.inv_cdf(q))

    def sample(
        self,
        n: int,
        low: float | None = None,
        high: float | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        stratified: bool = False,
    ) -> torch.Tensor:
        """Inverse-CDF sampling of n sigmas from the log-normal truncated to [low, high] (``stratified``:
        :func:`uniform_draws`)."""
        import torch  # here, not at the top: params validation (config, the Snakefile) imports this module

        low = self.sigma_min if low is None else low
        high = self.sigma_max if high is None else high
        q_lo, q_hi = self.cdf(low), self.cdf(high)
        u = uniform_draws(n, generator, stratified)
        q = q_lo + u * (q_hi - q_lo)
        log_sigma = self.p_mean + self.p_std * torch.special.ndtri(q)
        # Clamp: float64 round-off at the tails may step a hair outside the interval.
        return log_sigma.exp().clamp(low, high).to(device=device, dtype=torch.float32)

    def equal_mass_points(self, n: int) -> list[float]:
        """n + 1 ascending sigmas from sigma_min to sigma_max with equal probability mass between neighbours.

        The equi-probability partition and the sampler's grid both come from here, so a grid with
        N = B steps lands exactly (bit for bit) on the partition boundaries."""
        if n < 1:
            raise ValueError(f"need at least one interval, got {n}")
        q_lo, q_hi = self.cdf(self.sigma_min), self.cdf(self.sigma_max)
        inner = [self.quantile(q_lo + (i / n) * (q_hi - q_lo)) for i in range(1, n)]
        return [self.sigma_min, *inner, self.sigma_max]

    def quantile_grid(self, num_steps: int) -> list[float]:
        """num_steps + 1 sigmas, descending from sigma_max to sigma_min, equally spaced in probability."""
        return list(reversed(self.equal_mass_points(num_steps)))


def partition_boundaries(dist: NoiseDistribution, blocks: int, kind: str = "equiprobable") -> list[float]:
    """B + 1 ascending boundaries splitting [sigma_min, sigma_max] into B intervals."""
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    if kind not in PARTITION_KINDS:
        raise ValueError(f"partition kind must be one of {', '.join(PARTITION_KINDS)}; got {kind!r}")
    if kind == "equiprobable":
        return dist.equal_mass_points(blocks)
    lo, hi = math.log(dist.sigma_min), math.log(dist.sigma_max)
    inner = [math.exp(lo + (b / blocks) * (hi - lo)) for b in range(1, blocks)]
    return [dist.sigma_min, *inner, dist.sigma_max]


@dataclass(frozen=True)
class Partition:
    """A partition of the noise range into B blocks plus the training overlap gamma."""

    boundaries: tuple[float, ...]
    overlap: float = 0.0
    kind: str = "equiprobable"
    dist: NoiseDistribution = NoiseDistribution()

    @classmethod
    def make(
        cls, blocks: int, kind: str = "equiprobable", overlap: float = 0.0, dist: NoiseDistribution | None = None
    ) -> Partition:
        dist = dist or NoiseDistribution()
        if not 0.0 <= overlap < 0.5:
            raise ValueError(f"overlap gamma must be in [0, 0.5); got {overlap}")
        return cls(tuple(partition_boundaries(dist, blocks, kind)), overlap, kind, dist)

    @property
    def blocks(self) -> int:
        return len(self.boundaries) - 1

    def _check_block(self, block: int) -> None:
        if not 1 <= block <= self.blocks:
            raise ValueError(f"block must be in 1..{self.blocks}; got {block}")

    def interval(self, block: int) -> tuple[float, float]:
        """The (un-widened) interval a block owns at inference. Block 1 is the highest-noise block."""
        self._check_block(block)
        i = self.blocks - block
        return self.boundaries[i], self.boundaries[i + 1]

    def train_interval(self, block: int) -> tuple[float, float]:
        """The interval widened by the overlap: [lo/a, hi*a], a = (hi/lo)^gamma, clipped to the range."""
        lo, hi = self.interval(block)
        a = (hi / lo) ** self.overlap
        return max(lo / a, self.dist.sigma_min), min(hi * a, self.dist.sigma_max)

    def sample_sigma(
        self,
        block: int,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        stratified: bool = False,
    ) -> torch.Tensor:
        lo, hi = self.train_interval(block)
        return self.dist.sample(n, lo, hi, generator=generator, device=device, stratified=stratified)

    def route(self, sigma: float | torch.Tensor) -> int | torch.Tensor:
        """The block owning each sigma: block b owns (low, high]; sigma_min belongs to block B."""
        import torch

        inner = torch.tensor(self.boundaries[1:-1], dtype=torch.float64)
        s = torch.as_tensor(sigma, dtype=torch.float64)
        # number of inner boundaries strictly below sigma = index of the interval from the bottom
        from_bottom = torch.searchsorted(inner, s.reshape(-1), right=False).reshape(s.shape)
        owner = self.blocks - from_bottom
        return int(owner) if owner.ndim == 0 else owner

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "blocks": self.blocks,
            "overlap": self.overlap,
            "boundaries": list(self.boundaries),
            "train_intervals": [list(self.train_interval(b)) for b in range(1, self.blocks + 1)],
            "noise": {
                "p_mean": self.dist.p_mean,
                "p_std": self.dist.p_std,
                "sigma_min": self.dist.sigma_min,
                "sigma_max": self.dist.sigma_max,
            },
        }


def layer_split(num_layers: int, blocks: int, split: Sequence[int] | None = None) -> list[int]:
    """Layers per block, block 1 first. Default: equal contiguous split (remainder to the first blocks)."""
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    if split is None:
        if blocks > num_layers:
            raise ValueError(f"blocks ({blocks}) cannot exceed the number of layers ({num_layers})")
        base, extra = divmod(num_layers, blocks)
        return [base + (1 if b < extra else 0) for b in range(blocks)]
    split = [int(n) for n in split]
    if len(split) != blocks:
        raise ValueError(f"layer split {split} has {len(split)} entries; it must have exactly B={blocks}")
    if any(n < 1 for n in split):
        raise ValueError(f"layer split {split}: every block needs at least one layer")
    if sum(split) != num_layers:
        raise ValueError(f"layer split {split} sums to {sum(split)}; it must sum to the depth L={num_layers}")
    return split


def layer_ranges(split: Sequence[int]) -> list[range]:
    """Contiguous layer index ranges of blocks 1..B."""
    out, start = [], 0
    for n in split:
        out.append(range(start, start + n))
        start += n
    return out
