"""Classification as denoising of a label embedding (SPEC section 5, ViT row).

The target is the class's fixed, L2-normalised embedding E[y]. The network reads the image and the noisy
embedding and returns class logits; the denoiser output is the expected embedding softmax(logits) @ E,
the posterior mean of a discrete target, and the loss is lambda(sigma)-weighted cross-entropy on the logits.
"""

from __future__ import annotations

import torch

from dblocks import edm
from dblocks.tasks.base import Task


def label_embeddings(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """The shared target space: a fixed, seed-derived, L2-normalised embedding per class.

    Every block job derives the same table from the experiment seed with its own generator, so blocks
    agree on the target space without communicating."""
    g = torch.Generator().manual_seed(int(seed))
    table = torch.randn(num_classes, dim, generator=g, dtype=torch.float32)
    return table / table.norm(dim=1, keepdim=True)


class ClassificationTask(Task):
    def __init__(self, num_classes: int, embedding_dim: int, seed: int, sigma_data: float = 0.5) -> None:
        self.num_classes = num_classes
        self.embedding = label_embeddings(num_classes, embedding_dim, seed)
        self.sigma_data = sigma_data

    def condition(self, batch):
        return batch["image"]

    def target(self, batch):
        return self.embedding.to(batch["label"].device)[batch["label"]]

    @property
    def target_shape(self):
        return (self.embedding.shape[1],)

    def denoise(self, raw, z, sigma):
        return raw.softmax(dim=-1) @ self.embedding.to(raw.device, raw.dtype)

    def loss(self, raw, denoised, batch, weight):
        return edm.weighted_cross_entropy(raw, batch["label"], weight)

    def buffers(self):
        return {"task/label_embedding": self.embedding}
