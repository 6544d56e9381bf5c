"""The task interface shared by every experiment."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Task(ABC):
    #: the EDM data scale used by preconditioning and the loss weight
    sigma_data: float = 0.5

    @abstractmethod
    def condition(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None: ...

    @abstractmethod
    def target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def denoise(self, raw: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def loss(self, raw: torch.Tensor, denoised: torch.Tensor, batch: dict[str, torch.Tensor],
             weight: torch.Tensor) -> torch.Tensor: ...

    @property
    @abstractmethod
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one example's target y (what the sampler starts from as pure noise)."""

    def buffers(self) -> dict[str, torch.Tensor]:
        """Fixed tensors that define the target space; stored in every checkpoint and compared at assembly."""
        return {}
