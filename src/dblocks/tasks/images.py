"""Class-conditional image generation: the image itself is denoised with EDM's L2 loss (DiT row)."""

from __future__ import annotations

import torch

from dblocks import edm
from dblocks.tasks.base import Task


class ImageGenerationTask(Task):
    def __init__(
        self, image_shape: tuple[int, int, int], num_classes: int, sigma_data: float = 0.5, class_dropout: float = 0.0
    ) -> None:
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.sigma_data = sigma_data
        self.class_dropout = class_dropout

    def draw_inputs(self, batch, generator):
        """Label dropout: each label replaced by the null class (id num_classes) with probability
        class_dropout, which trains the unconditional model that classifier-free guidance needs. Drawn with
        the step's other random inputs, so a data-parallel run drops the labels one process would."""
        if not self.class_dropout:
            return batch
        labels = batch["label"]
        drop = (torch.rand(labels.shape[0], generator=generator) < self.class_dropout).to(labels.device)
        return {**batch, "label": torch.where(drop, torch.full_like(labels, self.num_classes), labels)}

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
