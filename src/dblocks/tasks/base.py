"""The task interface shared by every experiment."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from dblocks import edm


class Task(ABC):
    #: the EDM data scale used by preconditioning and the loss weight
    sigma_data: float = 0.5

    @abstractmethod
    def condition(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None: ...

    @abstractmethod
    def target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def draw_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A training batch with the task's own random inputs drawn (none by default; image generation: label
        dropout), from the step's generator, for the whole global batch."""
        return batch

    @abstractmethod
    def denoise(self, raw: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def loss(
        self, raw: torch.Tensor, denoised: torch.Tensor, batch: dict[str, torch.Tensor], weight: torch.Tensor
    ) -> torch.Tensor: ...

    @property
    @abstractmethod
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one example's target y (what the sampler starts from as pure noise)."""

    # --- the forward process; EDM's by default, a task with another one (masked text) overrides these ---
    def corrupt(self, y: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """z from the clean target y at noise level sigma (EDM: y + sigma * eps)."""
        return self.apply_noise(y, sigma, self.draw_noise(y.shape, generator, y.device))

    def draw_noise(
        self, shape: torch.Size, generator: torch.Generator | None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The random draw behind :meth:`corrupt` for targets of ``shape`` (EDM: eps ~ N(0, I)), on the
        generator's device, so that training can draw it for a whole global batch and corrupt any rows of it."""
        return torch.randn(shape, generator=generator, device=generator.device if generator is not None else device)

    def apply_noise(self, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z from y, sigma and a draw of :meth:`draw_noise` (EDM: y + sigma * eps)."""
        return edm.noisy(y, sigma, noise)

    def network_inputs(self, z: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the raw network sees: (c_in * z, c_noise) under EDM preconditioning."""
        p = edm.preconditioning(sigma.to(z.dtype), self.sigma_data)
        return edm.per_example(p.c_in, z) * z, p.c_noise

    def loss_weight(self, sigma: torch.Tensor, max_weight: float | None = None) -> torch.Tensor:
        return edm.loss_weight(sigma, self.sigma_data, max_weight)

    def buffers(self) -> dict[str, torch.Tensor]:
        """Fixed tensors that define the target space; stored in every checkpoint and compared at assembly."""
        return {}

    def load_buffers(self, tensors: dict[str, torch.Tensor]) -> None:  # noqa: B027 - optional: most tasks keep nothing
        """Take the target space from a checkpoint's ``buffers()`` tensors. Tasks whose space is always
        derived from the seed (and checked equal at assembly) need nothing here."""
