"""Class-conditional image generation: the image itself is denoised with EDM's L2 loss (DiT row)."""

from __future__ import annotations

from dblocks import edm
from dblocks.tasks.base import Task


class ImageGenerationTask(Task):
    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, sigma_data: float = 0.5) -> None:
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.sigma_data = sigma_data

    def condition(self, batch):
        return batch["label"]

    def target(self, batch):
        return batch["image"]

    @property
    def target_shape(self):
        return self.image_shape

    def denoise(self, raw, z, sigma):
        return edm.skip_combine(z, raw, sigma, self.sigma_data)

    def loss(self, raw, denoised, batch, weight):
        return edm.weighted_l2(denoised, batch["image"], weight)
